"""Token shards: how a prepared corpus split lies on disk, and the block view that training reads.

A split folder (`train/`, `val/`) holds raw token files `shard_00000.bin`, `shard_00001.bin`, ... (little-endian
uint16 when every token id fits, else uint32; every shard but the last holds exactly `shard_tokens` tokens) and
`index.json`, written atomically after the last shard, so a folder with an index is complete:

    {"format": "orch-token-shards/1", "dtype": "uint16", "vocab_size": 64000, "eos_id": 2,
     "tokenizer": {"path": "...", "sha256": "..."}, "tokens": N, "documents": D, "skipped": {reason: count},
     "shards": [{"file": "shard_00000.bin", "tokens": n, "documents": d, "sha256": "..."}, ...]}

The split's token stream is its shards concatenated in index order; every document in it ends with EOS.
A shard's `documents` counts the documents that end in it (a document may start in an earlier shard).
"""

from __future__ import annotations

import functools
import hashlib
import json
import resource
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from orchestrator.core.errors import OrchError
from orchestrator.core.files import file_sha256, read_json, write_atomic, write_json_atomic
from orchestrator.core.runfiles import FINGERPRINT, DataFingerprint, SourceData, read_model
from orchestrator.core.shard_index import FORMAT, INDEX, Shard, ShardIndex, read_index, size_problem, write_index

FREE_DESCRIPTORS = 256  # open files left to the rest of a rank (gloo/NCCL sockets, checkpoint writers, logs, MLflow)
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int, requested: str = "auto") -> str:
    """The narrowest width that holds every id of the vocabulary, or the requested one if it does."""
    if requested not in ("auto", *DTYPES):
        raise OrchError(f"--dtype '{requested}' is not a token width. Allowed: auto, {', '.join(DTYPES)}.")
    fitting = [name for name, dtype in DTYPES.items() if vocab_size - 1 <= np.iinfo(dtype).max]
    if requested == "auto":
        return fitting[0]
    if requested not in fitting:
        raise OrchError(
            f"--dtype {requested} holds token ids up to {np.iinfo(DTYPES[requested]).max}, but the tokenizer has "
            f"{vocab_size} tokens (ids up to {vocab_size - 1}). Allowed: {', '.join(fitting)} or auto."
        )
    return requested


@dataclass(frozen=True)
class Commit:
    """A shard made durable during `ShardWriter.add`: its last token belongs to document `document` of that call
    (an index into its `lengths`), of which the first `written` tokens are now in this or earlier shards."""

    shard: Shard
    document: int
    written: int


class ShardWriter:
    """Appends documents' tokens to one split's shards; a shard is written, checksummed and renamed when full."""

    def __init__(self, directory: Path, dtype: str, shard_tokens: int, committed: list[Shard]) -> None:
        self.directory, self.dtype, self.shards = directory, dtype, list(committed)
        self.buffer = np.empty(shard_tokens, dtype=DTYPES[dtype])
        self.filled = self.documents = 0
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> list[Commit]:
        """Append documents given as their concatenated tokens and their lengths; returns the shards completed."""
        ends = np.cumsum(lengths)
        if len(tokens) != (total := int(ends[-1]) if len(ends) else 0):
            raise ValueError(f"{len(tokens)} tokens do not match document lengths summing to {total}")
        commits, start = [], 0
        while start < len(tokens):
            take = min(len(self.buffer) - self.filled, len(tokens) - start)
            self.buffer[self.filled : self.filled + take] = tokens[start : start + take]
            self.documents += int(
                np.searchsorted(ends, start + take, side="right") - np.searchsorted(ends, start, side="right")
            )
            self.filled, start = self.filled + take, start + take
            if self.filled == len(self.buffer):
                last = int(np.searchsorted(ends, start - 1, side="right"))
                written = start - int(ends[last - 1] if last else 0)
                commits.append(Commit(self._flush(), last, written))
        return commits

    def finish(self, header: dict[str, Any]) -> ShardIndex:
        """Write the last, partial shard and then the index; returns the index."""
        if self.filled:
            self._flush()
        tokens, documents = sum(s.tokens for s in self.shards), sum(s.documents for s in self.shards)
        index = ShardIndex(FORMAT, self.dtype, **header, tokens=tokens, documents=documents, shards=list(self.shards))
        write_index(self.directory, index)
        return index

    def _flush(self) -> Shard:
        data = self.buffer[: self.filled]
        name = f"shard_{len(self.shards):05d}.bin"
        write_atomic(self.directory / name, data.data)
        shard = Shard(name, int(self.filled), self.documents, hashlib.sha256(data.data).hexdigest())
        self.shards.append(shard)
        self.filled = self.documents = 0
        return shard


POINTER = "tokens.json"  # in a run's data/ folder: the prepared folder of each source, and the block length


def read_pointer(data_dir: Path) -> dict[str, Any]:
    """A run's tokens.json, which `orch submit` writes when it attaches the data."""
    pointer = read_json(data_dir / POINTER)
    if pointer is None:
        raise OrchError(f"{data_dir / POINTER} is missing: the run has no data attached (`orch submit` attaches it).")
    return pointer


def source_folders(pointer: dict) -> dict[str, str]:
    """The prepared folder of each source a tokens.json names: {"": folder} for one source."""
    return pointer.get("sources") or {"": pointer["tokens"]}


def source_data(data_dir: Path, folder: str) -> SourceData:
    """A prepared folder's content as one SHA-256: each split's token width and its shards' checksums and token
    counts, in the order its index lists them. The same corpus prepared again, or moved, gives the same fingerprint;
    another corpus, even of the same tokenizer, another. Reads the indexes only, not the shards."""
    digest, train_tokens = hashlib.sha256(), 0
    for split in ("train", "val"):
        split_dir = data_dir / folder / split
        if split == "val" and not (split_dir / INDEX).is_file():
            continue  # prepared before the val split existed
        index = read_index(split_dir)
        shards = [[shard.sha256, shard.tokens] for shard in index.shards]
        digest.update(json.dumps([split, index.dtype, shards]).encode())
        train_tokens = train_tokens or index.tokens
    return SourceData(folder=folder, fingerprint=digest.hexdigest(), train_tokens=train_tokens)


def check_fingerprint(data_dir: Path) -> None:
    """The run's data is what it was when recorded (`DataFingerprint`); where nothing is recorded yet (a new run, or
    one from before fingerprints), it is recorded now. A change of content is refused, naming both fingerprints."""
    now = {name: source_data(data_dir, folder) for name, folder in source_folders(read_pointer(data_dir)).items()}
    path = data_dir / FINGERPRINT
    recorded = read_model(path, DataFingerprint)
    if recorded is None:
        write_json_atomic(path, DataFingerprint(sources=now, recorded=time.time()).model_dump())
        return
    for name, was in recorded.sources.items():
        found = now.get(name)
        if found is not None and found.fingerprint == was.fingerprint:
            continue
        where = (data_dir / was.folder).resolve()
        has = f"{found.fingerprint[:16]} ({found.train_tokens:,} train tokens)" if found else "no such source"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(recorded.recorded))
        raise OrchError(
            f"the run's training data changed: {f'source {name}' if name else 'the data'} in {where} had fingerprint "
            f"{was.fingerprint[:16]} ({was.train_tokens:,} train tokens) when it was recorded in {path} ({when}), and "
            f"now has {has}. A run never trains on changed data: its checkpoints and data order belong to the "
            f"recorded corpus. Put that corpus back in {where}, or train the new one in a new run (`orch submit`); to "
            f"go on with this run on the new data on purpose, delete {path} and resume (the next start records the "
            "data as it is then)."
        )


def shard_damage(split_dir: Path) -> str | None:
    """What is wrong with a split's shards, cheaply: every size against the index, and the checksum of every shard
    changed after the index was written (prepare writes the index last, so a later change is not prepare's)."""
    index = read_index(split_dir)
    written = (split_dir / INDEX).stat().st_mtime_ns
    problem = size_problem(split_dir, index)
    if problem:
        return problem
    for shard in index.shards:
        path = split_dir / shard.file
        if path.stat().st_mtime_ns > written and file_sha256(path) != shard.sha256:
            return f"{path} was changed after it was prepared (its SHA-256 no longer matches the index)"
    return None


class DescriptorBudget:
    """The open files of this process that mapped shards may hold. A map holds one as long as it is mapped (Python's
    mmap before 3.13 keeps a duplicate of the file's descriptor, and numpy's memmap is such a map), so a split keeps
    every shard mapped only where RLIMIT_NOFILE allows it: the soft limit is raised towards the hard one as far as
    needed, and what is left beyond FREE_DESCRIPTORS and the other splits' grants is shared out in the order splits
    are opened."""

    def __init__(self) -> None:
        self.granted = 0

    def grant(self, wanted: int) -> int:
        """How many of `wanted` shards a split may keep mapped: all where the limit allows, else what it leaves (at
        least 1, so that every block can be read)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = psutil.Process().num_fds() + FREE_DESCRIPTORS + self.granted + wanted
        if soft != resource.RLIM_INFINITY and needed > soft:
            soft = needed if hard == resource.RLIM_INFINITY else max(soft, min(needed, hard))
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        room = wanted if soft == resource.RLIM_INFINITY else soft - (needed - wanted)
        granted = max(1, min(wanted, room))
        self.granted += granted
        return granted

    def release(self, granted: int) -> None:
        self.granted -= granted


DESCRIPTORS = DescriptorBudget()


class TokenBlocks:
    """A prepared split's token stream, memory-mapped and cut into blocks of `block_len` (the recipe's max_seq_len).

    Block b is stream tokens [b·block_len, (b+1)·block_len); blocks may span shard boundaries. The labels are the
    inputs (the loss shifts them, `jobs.loss`), so a block trains block_len - 1 predictions. The last,
    partial block is dropped. `blocks[rows]` with an integer array gives a (len(rows), block_len) array.
    Opening checks every shard's size against the index; `verify_checksums()` also reads and hashes them.
    `mapped` caps the shards kept mapped at once (None: as many as `DESCRIPTORS` grants); `opened()` counts the maps
    made, a file opened and mapped each.
    """

    def __init__(self, split_dir: Path, block_len: int, mapped: int | None = None) -> None:
        self.dir, self.block_len = split_dir, block_len
        self.index = read_index(split_dir)
        self.dtype = DTYPES[self.index.dtype]
        self.shards = list(self.index.shards)
        problem = size_problem(split_dir, self.index)
        if problem:
            raise OrchError(f"{problem}. The prepared split is damaged; prepare it again.")
        # Shards are mapped on first read and stay mapped: all of them where the open-file limit allows (each map holds
        # a descriptor), else the most recently read `mappable` of them.
        self.mappable = DESCRIPTORS.grant(len(self.shards)) if mapped is None else max(1, min(mapped, len(self.shards)))
        if mapped is None:
            weakref.finalize(self, DESCRIPTORS.release, self.mappable)
        self._map = functools.lru_cache(maxsize=self.mappable)(self._open)
        self.starts = np.cumsum([0] + [s.tokens for s in self.shards])
        self.tokens = int(self.starts[-1])

    def __len__(self) -> int:
        return self.tokens // self.block_len

    def __getitem__(self, rows: int | np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"block indices must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        out = np.empty((*rows.shape, self.block_len), dtype=self.dtype)
        flat = out.reshape(-1, self.block_len)
        for row, block in zip(flat, rows.reshape(-1).tolist(), strict=True):
            self._read(block * self.block_len, row)
        return out

    def _read(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with the stream's tokens from `start`, crossing into the following shards as needed."""
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < len(out):
            offset = start + done - int(self.starts[shard])
            piece = self._map(shard)[offset : offset + len(out) - done]
            out[done : done + len(piece)] = piece
            done, shard = done + len(piece), shard + 1

    def _open(self, shard: int) -> np.memmap:
        return np.memmap(self.dir / self.shards[shard].file, dtype=self.dtype, mode="r")

    def opened(self) -> int:
        return self._map.cache_info().misses

    def verify_checksums(self) -> None:
        """Hash every shard and compare with the index; reads the whole split."""
        for shard in self.shards:
            if file_sha256(self.dir / shard.file) != shard.sha256:
                raise OrchError(
                    f"{self.dir / shard.file}: sha256 differs from {self.dir / INDEX}. The shard is damaged; "
                    "prepare the corpus again."
                )
