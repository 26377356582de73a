"""The Concat dataset: documents joined with EOS, cut into fixed blocks, read in a world-size-free order.

Storage: a corpus is tokenized into token shards before any job starts (`orch data prepare`; the demo corpus by
`orch submit`, see `orchestrator.tools.run_data`). A run's `data/tokens.json` names the shards it reads.

Packing: every document is followed by EOS and the stream is cut into blocks of `max_seq_len` tokens;
the labels are the inputs (`jobs.loss` shifts them), so a block trains `max_seq_len - 1` predictions.
The final partial block (fewer than `max_seq_len` tokens) is dropped and counted.

Order: global sample g is block `permutation(seed, epoch)[g % n_blocks]` with `epoch = g // n_blocks`,
and optimizer step s consumes global samples [d·B, (d+1)·B) for global batch B, where d is its data step: s itself,
or, where the run skips data steps (skips.json, docs/rollback.md), the s-th data step not skipped. Which rank
computes which of them depends on the world size; which samples a step sees does not.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jobs.shards import TokenBlocks
from orchestrator.core.errors import OrchError
from orchestrator.core.files import read_json
from orchestrator.core.runfiles import Ranges, data_step

POINTER = "tokens.json"


def pack(documents: Iterable[list[int]], eos_id: int, block_len: int) -> tuple[np.ndarray, int]:
    """Concatenate documents, each followed by EOS, into rows of `block_len`; returns (blocks, tokens dropped).

    The in-memory definition of packing: `TokenBlocks` serves the same rows from prepared shards."""
    stream = np.fromiter((t for doc in documents for t in (*doc, eos_id)), dtype=np.int64)
    n_blocks = len(stream) // block_len
    return stream[: n_blocks * block_len].reshape(n_blocks, block_len), len(stream) - n_blocks * block_len


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, n_blocks: int) -> np.ndarray:
    """Drawn once per epoch, not per sample: at corpus scale a permutation takes a noticeable fraction of a second."""
    permutation = np.random.default_rng([seed, epoch]).permutation(n_blocks)
    permutation.flags.writeable = False
    return permutation


@dataclass(frozen=True)
class GlobalOrder:
    """Maps (step, micro step, rank) to block indices; the samples of a step do not depend on the world size."""

    n_blocks: int
    global_batch: int
    micro_batch: int
    world_size: int
    seed: int
    skipped: Ranges = ()  # data steps never trained (orchestrator.core.runfiles.skipped_data)

    def permutation(self, epoch: int) -> np.ndarray:
        return epoch_permutation(self.seed, epoch, self.n_blocks)

    def data_step(self, step: int) -> int:
        return data_step(self.skipped, step)

    def skipped_before(self, step: int) -> int:
        """Data steps passed over by the first `step` training steps (those before the data of the last of them)."""
        return self.data_step(step - 1) + 1 - step if step else 0

    def global_samples(self, step: int) -> range:
        first = self.data_step(step) * self.global_batch
        return range(first, first + self.global_batch)

    def block_indices(self, step: int, micro_step: int, rank: int) -> np.ndarray:
        first = self.global_samples(step).start + (micro_step * self.world_size + rank) * self.micro_batch
        samples = np.arange(first, first + self.micro_batch)
        epochs = samples // self.n_blocks
        return np.array([self.permutation(e)[s % self.n_blocks] for e, s in zip(epochs, samples, strict=True)])


class BlockLoader:
    """Serves one rank's micro-batches as token tensors, reading the next one in the background.

    The order of requests is known (micro steps, then steps), so while the model computes on one micro-batch
    a thread gathers the next from the memory-mapped shards and, on a GPU, copies it from pinned memory."""

    def __init__(self, blocks: TokenBlocks, order: GlobalOrder, rank: int, device: torch.device) -> None:
        self.blocks, self.order, self.rank, self.device = blocks, order, rank, device
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data")
        self.ahead: tuple[tuple[int, int], Future] | None = None

    def read(self, step: int, micro_step: int) -> torch.Tensor:
        rows = torch.from_numpy(self.blocks[self.order.block_indices(step, micro_step, self.rank)].astype(np.int64))
        if self.device.type == "cuda":
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows

    def reorder(self, order: GlobalOrder) -> None:
        """Read in `order` from now on (a skip list changed); the micro-batch read ahead in the old one is dropped."""
        if self.ahead is not None:
            self.ahead[1].result()
        self.order, self.ahead = order, None

    def micro_batch(self, step: int, micro_step: int) -> torch.Tensor:
        if self.ahead is not None and self.ahead[0] == (step, micro_step):
            tokens = self.ahead[1].result()
        else:
            tokens = self.read(step, micro_step)
        following = (step, micro_step + 1) if micro_step + 1 < self.accumulation else (step + 1, 0)
        self.ahead = (following, self.reader.submit(self.read, *following))
        return tokens

    @property
    def accumulation(self) -> int:
        return self.order.global_batch // (self.order.micro_batch * self.order.world_size)


def load_split(data_dir: Path, split: str) -> TokenBlocks:
    """A split of the corpus tokens.json names: a folder elsewhere, or (relative, ".") the run's own data folder,
    which moves with the run."""
    pointer = read_json(data_dir / POINTER)
    if pointer is None:
        raise OrchError(f"{data_dir / POINTER} is missing: the run has no data attached (`orch submit` attaches it).")
    return TokenBlocks(data_dir / pointer["tokens"] / split, pointer["max_seq_len"])


def load_blocks(data_dir: Path) -> TokenBlocks:
    """The training blocks of the corpus a run's `data/tokens.json` names."""
    return load_split(data_dir, "train")


def load_val_blocks(data_dir: Path) -> TokenBlocks:
    """The held-out blocks (the val split) of the corpus a run's `data/tokens.json` names."""
    return load_split(data_dir, "val")
