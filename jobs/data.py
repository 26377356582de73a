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

Mixtures: with several sources (`data.sources`), each global sample is drawn from one source by a fixed pattern
(`Mixture`), and a source's own k-th sample is its block `permutation(seed, epoch, source)[k % n_source]`: each
source runs through its own epochs, and a change of weights at a step changes only the samples after it.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jobs.shards import TokenBlocks, read_pointer, source_folders
from orchestrator.core.errors import OrchError
from orchestrator.core.plan import Batching
from orchestrator.core.runfiles import MixPhases, Ranges, data_step


def pack(documents: Iterable[list[int]], eos_id: int, block_len: int) -> tuple[np.ndarray, int]:
    """Concatenate documents, each followed by EOS, into rows of `block_len`; returns (blocks, tokens dropped).

    The in-memory definition of packing: `TokenBlocks` serves the same rows from prepared shards."""
    stream = np.fromiter((t for doc in documents for t in (*doc, eos_id)), dtype=np.int64)
    n_blocks = len(stream) // block_len
    return stream[: n_blocks * block_len].reshape(n_blocks, block_len), len(stream) - n_blocks * block_len


@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, n_blocks: int, stream: tuple[int, ...] = ()) -> np.ndarray:
    """Drawn once per epoch, not per sample: at corpus scale a permutation takes a noticeable fraction of a second.
    `stream` tells a mixture's sources apart (one source has none)."""
    permutation = np.random.default_rng([seed, epoch, *stream]).permutation(n_blocks)
    permutation.flags.writeable = False
    return permutation


MIX_PERIOD = 1 << 16  # a mixture's pattern repeats every MIX_PERIOD samples: weights hold to 1/MIX_PERIOD
MIX_STRIDE = 40503  # ≈ MIX_PERIOD / golden ratio, odd: slot n sits at n·MIX_STRIDE mod MIX_PERIOD, spread evenly


def quotas(weights: Sequence[float]) -> tuple[int, ...]:
    """Samples per MIX_PERIOD of each source: the weights' shares, rounded by largest remainder (ties to the first)."""
    exact = np.asarray(weights, dtype=np.float64) / sum(weights) * MIX_PERIOD
    counts = np.floor(exact).astype(np.int64)
    short = MIX_PERIOD - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return tuple(counts.tolist())


@functools.lru_cache(maxsize=16)
def mix_pattern(period_quotas: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(source of each slot of a period, prefix[i, r]: the slots before r that are source i's).

    Slot n lies at n·MIX_STRIDE mod MIX_PERIOD, a permutation of the period (a Fibonacci lattice), and source i owns
    the positions [Q_i-1, Q_i) of the quotas' running sum Q: each source gets exactly its quota per period, spread
    evenly, so any run of samples holds each source's share to within a few samples."""
    position = np.arange(MIX_PERIOD, dtype=np.int64) * MIX_STRIDE % MIX_PERIOD
    source = np.searchsorted(np.cumsum(period_quotas), position, side="right")
    prefix = np.zeros((len(period_quotas), MIX_PERIOD + 1), dtype=np.int64)
    for i in range(len(period_quotas)):
        np.cumsum(source == i, out=prefix[i, 1:])
    return source, prefix


@dataclass(frozen=True)
class Mixture:
    """Several sources drawn by weight, the weights changing at chosen data steps.

    `phases` are (first training step, weights) in step order, the first from step 0; `GlobalOrder` says which
    global sample each phase starts at. A phase's samples follow `mix_pattern` of its quotas from the phase's first
    sample; a source's samples are numbered across phases, so a new phase continues each source where the one before
    left it."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]  # blocks of each source
    phases: tuple[tuple[int, tuple[float, ...]], ...]

    def draw(self, samples: np.ndarray, starts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(source, that source's own sample number) of each global sample, the phases starting at global samples
        `starts`."""
        phase_of = np.searchsorted(starts, samples, side="right") - 1
        source, number = np.empty_like(samples), np.empty_like(samples)
        drawn = np.zeros(len(self.names), dtype=np.int64)  # by the phases before
        for p, (start, (_, weights)) in enumerate(zip(starts, self.phases, strict=True)):
            period_quotas = quotas(weights)
            pattern, prefix = mix_pattern(period_quotas)
            in_phase = phase_of == p
            periods, slot = np.divmod(samples[in_phase] - start, MIX_PERIOD)
            mine = pattern[slot]
            source[in_phase] = mine
            number[in_phase] = drawn[mine] + periods * np.take(period_quotas, mine) + prefix[mine, slot]
            if p + 1 < len(starts):
                periods, slot = divmod(starts[p + 1] - start, MIX_PERIOD)
                drawn += periods * np.asarray(period_quotas) + prefix[:, slot]
        return source, number

    def blocks(self, samples: np.ndarray, starts: Sequence[int], seed: int) -> np.ndarray:
        """The joined-block index (`JoinedBlocks`) of each global sample."""
        source, number = self.draw(samples, starts)
        offsets, out = np.cumsum((0, *self.sizes[:-1])), np.empty_like(samples)
        for i, (name, size) in enumerate(zip(self.names, self.sizes, strict=True)):
            epochs, within = np.divmod(number[source == i], size)
            stream = (zlib.crc32(name.encode()),)
            out[source == i] = offsets[i] + np.array(
                [epoch_permutation(seed, int(e), size, stream)[w] for e, w in zip(epochs, within, strict=True)],
                dtype=np.int64,
            )
        return out


@dataclass(frozen=True)
class GlobalOrder:
    """Maps (step, micro step, rank) to block indices; the samples of a step do not depend on the world size."""

    n_blocks: int
    split: Batching  # the plan's: samples per step, per rank and pass, and passes
    seed: int
    skipped: Ranges = ()  # data steps never trained (orchestrator.core.runfiles.skipped_data)
    mixture: Mixture | None = None  # several sources; n_blocks is then their joined blocks

    def permutation(self, epoch: int) -> np.ndarray:
        return epoch_permutation(self.seed, epoch, self.n_blocks)

    def data_step(self, step: int) -> int:
        return data_step(self.skipped, step)

    def skipped_before(self, step: int) -> int:
        """Data steps passed over by the first `step` training steps (those before the data of the last of them)."""
        return self.data_step(step - 1) + 1 - step if step else 0

    def global_samples(self, step: int) -> range:
        first = self.data_step(step) * self.split.global_batch
        return range(first, first + self.split.global_batch)

    def phase_starts(self) -> list[int]:
        """The global sample each mixture phase starts at: that of its first step's data (the first phase: 0)."""
        assert self.mixture is not None
        return [0] + [self.global_samples(step).start for step, _ in self.mixture.phases[1:]]

    def source_shares(self, step: int) -> dict[str, float]:
        """The share of each mixture source in the global batch of `step` (none for one source)."""
        if self.mixture is None:
            return {}
        samples = self.global_samples(step)
        source, _ = self.mixture.draw(np.arange(samples.start, samples.stop), self.phase_starts())
        counts = np.bincount(source, minlength=len(self.mixture.names)).tolist()
        return {name: count / self.split.global_batch for name, count in zip(self.mixture.names, counts, strict=True)}

    def block_indices(self, step: int, micro_step: int, rank: int) -> np.ndarray:
        micro_batch = self.split.micro_batch
        first = self.global_samples(step).start + (micro_step * self.split.world_size + rank) * micro_batch
        samples = np.arange(first, first + micro_batch)
        if self.mixture is not None:
            return self.mixture.blocks(samples, self.phase_starts(), self.seed)
        epochs = samples // self.n_blocks
        return np.array([self.permutation(e)[s % self.n_blocks] for e, s in zip(epochs, samples, strict=True)])


def make_order(
    blocks: TokenBlocks | JoinedBlocks, split: Batching, seed: int, skipped: Ranges, phases: MixPhases
) -> GlobalOrder:
    """The order a run's ranks read `blocks` in; a mixture's weights in force from each step are `phases`."""
    mixture = None
    if isinstance(blocks, JoinedBlocks):
        weights = tuple((step, tuple(by_name[n] for n in blocks.names)) for step, by_name in phases)
        mixture = Mixture(blocks.names, tuple(len(part) for part in blocks.parts), weights)
    return GlobalOrder(len(blocks), split, seed, skipped, mixture)


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
        following = (step, micro_step + 1) if micro_step + 1 < self.order.split.accumulation else (step + 1, 0)
        self.ahead = (following, self.reader.submit(self.read, *following))
        return tokens


class DataPosition:
    """Where a rank's data order stands after the steps trained: the samples consumed, the order's seed and the
    samples it passed over before the data of the last step (skips.json). A `Stateful`, saved with every checkpoint;
    what a checkpoint restores is checked against the order it is to continue (`check`)."""

    def __init__(self, loader: BlockLoader) -> None:
        self.loader = loader  # its order changes with the run's skip list (`BlockLoader.reorder`)
        self.samples_consumed, self.seed, self.samples_skipped = 0, loader.order.seed, 0

    def advance(self, step: int) -> None:
        """Training step `step` is done."""
        order = self.loader.order
        self.samples_consumed += order.split.global_batch
        self.samples_skipped = order.skipped_before(step) * order.split.global_batch

    def state_dict(self) -> dict[str, int]:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed, "samples_skipped": self.samples_skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Checkpoints from before skips were recorded have no samples_skipped: they skipped none."""
        self.samples_consumed, self.seed = state_dict["samples_consumed"], state_dict["seed"]
        self.samples_skipped = state_dict.get("samples_skipped", 0)

    def check(self, step: int) -> None:
        """A position restored at training step `step` must continue this run's data order: its seed, its samples per
        step and the skips before it."""
        order = self.loader.order
        batch = order.split.global_batch
        skipped = order.skipped_before(step) * batch
        if self.seed != order.seed or self.samples_consumed != step * batch:
            raise OrchError(
                f"the checkpoint at step {step} was saved with seed {self.seed} after {self.samples_consumed} "
                f"samples; this run has seed {order.seed} and {batch} samples per step: its data "
                "order cannot continue from there."
            )
        if self.samples_skipped != skipped:
            raise OrchError(
                f"the checkpoint at step {step} was saved after skipping {self.samples_skipped} samples of the "
                f"data order; the run's skips.json skips {skipped} before that step: the skip list changed under it "
                "(skips.json lost or edited?). Put skips.json back as it was, or roll back to an earlier checkpoint."
            )


class JoinedBlocks:
    """A mixture's sources end to end: source i's block b is block offsets[i] + b (the numbering `Mixture` draws)."""

    def __init__(self, parts: dict[str, TokenBlocks]) -> None:
        self.names, self.parts = tuple(parts), list(parts.values())
        self.starts = np.cumsum([0, *(len(part) for part in self.parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((*rows.shape, self.parts[0].block_len), dtype=np.int64)
        for i, part in enumerate(self.parts):
            mine = part_of == i
            if mine.any():
                out[mine] = part[rows[mine] - self.starts[i]]
        return out


def source_splits(data_dir: Path, split: str) -> dict[str, TokenBlocks]:
    """A split of each source the run's `data/tokens.json` names: {"": blocks} for one source, by name for a
    mixture. A source is a folder elsewhere or (relative, ".") the run's own data folder, which moves with the run."""
    pointer = read_pointer(data_dir)
    folders = source_folders(pointer)
    return {name: TokenBlocks(data_dir / folder / split, pointer["max_seq_len"]) for name, folder in folders.items()}


def load_blocks(data_dir: Path) -> TokenBlocks | JoinedBlocks:
    """The training blocks a run reads: its one source's, or its mixture's sources joined."""
    parts = source_splits(data_dir, "train")
    return parts[""] if "" in parts else JoinedBlocks(parts)


def load_val_blocks(data_dir: Path) -> dict[str, TokenBlocks]:
    """The held-out blocks (the val split) of each source, as `source_splits` names them."""
    return source_splits(data_dir, "val")
