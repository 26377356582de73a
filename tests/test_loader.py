"""The loader at a corpus of many shards: which samples a step reads is a pure function of seed and step (pinned
bit for bit), the rows served do not depend on how many shards stay mapped, and every shard stays mapped where the
open-file limit allows it."""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.data import BlockLoader, GlobalOrder, Mixture
from jobs.shards import ShardWriter, TokenBlocks
from orchestrator.core.plan import Batching

SHARDS, SHARD_TOKENS, BLOCK = 120, 50, 16  # blocks span shard boundaries


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split of SHARDS shards of random tokens, written by the project's ShardWriter."""
    split = tmp_path_factory.mktemp("corpus") / "train"
    writer, rng = ShardWriter(split, "uint16", SHARD_TOKENS, []), np.random.default_rng(0)
    tokens = rng.integers(3, 1000, SHARDS * SHARD_TOKENS, dtype=np.uint16)
    writer.add(tokens, np.full(SHARDS, SHARD_TOKENS))
    writer.finish({"vocab_size": 1000, "eos_id": 2})
    return split


def order_digest(order: GlobalOrder, steps: int, accumulation: int) -> str:
    indices = [
        order.block_indices(step, micro, rank)
        for step in range(steps)
        for micro in range(accumulation)
        for rank in range(order.split.world_size)
    ]
    return hashlib.sha256(np.concatenate(indices).astype("<i8").tobytes()).hexdigest()


PINNED = {  # the block indices of 40 steps, as sha256 of their int64 bytes: what checkpoints of every run rely on
    "one source, three epochs": (
        GlobalOrder(101, Batching.of(8, 2, 2), seed=7),
        "076c5d46c963c48b7ccc7a186d0a8f59d2af8ec3815208c1444c92b1f054f32e",
    ),
    "skipped data steps": (
        GlobalOrder(101, Batching.of(8, 2, 2), seed=7, skipped=((3, 5), (9, 10))),
        "5482cd4b6a597776fb8a674daff861d4750d3efdc88cd7ca19a65160d6124449",
    ),
    "mixture with a change of weights": (
        GlobalOrder(
            n_blocks=90,
            split=Batching.of(8, 4, 1),
            seed=3,
            mixture=Mixture(("cs", "en"), (60, 30), ((0, (0.8, 0.2)), (12, (0.5, 0.5)))),
        ),
        "1a933ffce6878a6e314d3aa43eb5853d6fbfcb3e193dbe4e81cf7f80f4e518a6",
    ),
}


@pytest.mark.parametrize("case", PINNED)
def test_the_samples_of_a_step_are_a_pure_function_of_seed_and_step_pinned_bit_for_bit(case):
    order, digest = PINNED[case]
    accumulation = order.split.accumulation
    assert order_digest(order, 40, accumulation) == digest


def served(blocks: TokenBlocks, steps: int) -> np.ndarray:
    order = GlobalOrder(len(blocks), Batching.of(8, 2, 1), seed=11)
    loader = BlockLoader(blocks, order, rank=0, device=torch.device("cpu"))
    return np.stack([loader.micro_batch(step, micro).numpy() for step in range(steps) for micro in range(4)])


def test_the_rows_served_do_not_depend_on_how_many_shards_stay_mapped(many_shards):
    every = TokenBlocks(many_shards, BLOCK)
    assert every.mappable == SHARDS
    expected = served(every, 60)
    assert every.opened() <= SHARDS  # each shard mapped once at most
    for mapped in (1, 2, 64):
        assert np.array_equal(served(TokenBlocks(many_shards, BLOCK, mapped), 60), expected)


def test_a_split_mapped_whole_opens_no_file_after_its_first_pass(many_shards):
    blocks = TokenBlocks(many_shards, BLOCK)
    blocks[np.arange(len(blocks))]
    first = blocks.opened()
    assert first == SHARDS
    served(blocks, 60)
    assert blocks.opened() == first


def test_the_soft_open_file_limit_is_raised_so_that_every_shard_stays_mapped(many_shards):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(os.listdir("/proc/self/fd")) + SHARDS // 2
    if hard != resource.RLIM_INFINITY and hard < low + SHARDS + 512:
        pytest.skip(f"the hard open-file limit ({hard}) leaves no room above the soft one")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        blocks = TokenBlocks(many_shards, BLOCK)
        assert blocks.mappable == SHARDS and resource.getrlimit(resource.RLIMIT_NOFILE)[0] > low
        blocks[np.arange(len(blocks))]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


LIMITED = """
import os, resource, sys
import numpy as np
from jobs.shards import TokenBlocks
limit = len(os.listdir("/proc/self/fd")) + 256 + 10
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
blocks = TokenBlocks(__import__("pathlib").Path(sys.argv[1]), int(sys.argv[2]))
rows = blocks[np.random.default_rng(0).permutation(len(blocks))]
print(blocks.mappable, blocks.opened(), int(rows.astype(np.int64).sum()))
"""


def test_under_a_hard_open_file_limit_a_split_keeps_what_it_allows_mapped_and_reads_every_block(many_shards):
    """A hard limit cannot be raised again by the process that lowers it: this runs in a process of its own."""
    result = subprocess.run(
        [sys.executable, "-c", LIMITED, str(many_shards), str(BLOCK)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    mappable, opened, total = (int(x) for x in result.stdout.split())
    blocks = TokenBlocks(many_shards, BLOCK)
    assert 1 <= mappable < SHARDS and opened > SHARDS  # shards mapped again after they were dropped
    assert total == int(blocks[np.arange(len(blocks))].astype(np.int64).sum())
