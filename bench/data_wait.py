"""How long a training step waits for its micro-batches where the compute takes longer than a read: a GPU's case.

Usage: python -m bench.data_wait [--compute-s 0.1] [--steps 20] [--folder DIR]

`jobs.data.BlockLoader` reads the next micro-batch in a background thread while the step computes. On a GPU the
step's Python thread mostly waits for the device, so the reader has a core and the GIL to itself; a sleep of
`--compute-s` per micro-batch stands in for that compute here. The shapes are cstinyllama-1.2b's on 2 Karolina nodes
(blocks of 2,048 tokens, micro batch 8, global batch 512, 16 ranks: 4 micro-batches a step, rank 0's share) over
the tiny recipe's prepared data cut into 2,048-token blocks. Reported: the wait per micro-batch
(`BlockLoader.micro_batch`, as `Trainer.step` times it) and, for comparison, one read done in the calling thread.
On a GPU the reader also pins and copies the batch (`non_blocking`); that is not measured here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from jobs.data import BlockLoader, GlobalOrder
from jobs.shards import TokenBlocks
from orchestrator.core.loading import load_recipe
from orchestrator.core.plan import Batching
from orchestrator.tools.run_data import attach_data

SEQUENCE, MICRO, GLOBAL, WORLD = 2048, 8, 512, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compute-s", type=float, default=0.1, help="compute per micro-batch, stood in by a sleep")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--folder", type=Path, default=None, help="where to prepare the data")
    args = parser.parse_args()
    data_dir = (args.folder or Path(tempfile.mkdtemp(prefix="data-wait-"))) / "data"
    _, tiny = load_recipe("tiny")
    if not data_dir.exists():
        attach_data(tiny.data, tiny.model.vocab_size, tiny.train.seed, data_dir)
    blocks = TokenBlocks(next(data_dir.glob("**/train")), SEQUENCE)
    split = Batching.of(GLOBAL, MICRO, WORLD)
    order = GlobalOrder(len(blocks), split, seed=0)
    loader = BlockLoader(blocks, order, rank=0, device=torch.device("cpu"))
    waits, reads = [], []
    for step in range(args.steps):
        for micro_step in range(split.accumulation):
            started = time.perf_counter()
            loader.micro_batch(step, micro_step)
            waits.append(time.perf_counter() - started)
            time.sleep(args.compute_s)
    for step in range(args.steps):  # after the loop above: its reader thread is idle
        for micro_step in range(split.accumulation):
            started = time.perf_counter()
            loader.read(step + args.steps, micro_step)
            reads.append(time.perf_counter() - started)
    waits = waits[split.accumulation :]  # the first step's first read has nothing ahead of it: a job's start-up
    print(
        f"{len(waits)} micro-batches of {MICRO} × {SEQUENCE} tokens, {args.compute_s} s of compute each: wait per "
        f"micro-batch median {statistics.median(waits) * 1e6:.0f} µs, mean {statistics.mean(waits) * 1e6:.0f} µs, "
        f"max {max(waits) * 1e6:.0f} µs; a read in the calling thread median {statistics.median(reads) * 1e6:.0f} µs"
    )


if __name__ == "__main__":
    main()
