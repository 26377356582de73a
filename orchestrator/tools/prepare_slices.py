"""A prepare cut into slices that Slurm array tasks on CPU nodes tokenize in parallel, and merged into the very bytes
`prepare.prepare` writes.

The plan cuts the input into slices: a whole file each, and a plain `.txt` or `.jsonl` file larger than the slice size
into byte ranges that start at a record (a line of JSON Lines; for text, a line after a blank line, where a block
starts). A slice's documents go through the same worker pool as `prepare` and are committed on their own in
`OUTPUT/slices/NNNNN/`: the tokens of all its documents (EOS after each), each document's record number within the
slice and its length, and the records it skipped, written in a temporary folder and renamed, with the SHA-256 of its
tokens; so a slice is there whole or not at all, and a task that dies loses only the slice it was in.

The merge reads the slices in order, numbers each file's records across its slices, sends every document to train or
val with `prepare.validation_mask`, and writes the shards and index through the same `ShardWriter`: the result is
byte-for-byte what `prepare` writes for the same input and settings, whatever the number of slices and tasks.

`slices/` also holds `plan.json` (the settings and the slices), `NNNNN.running` (the task working on a slice, touched
as it advances) and `NNNNN.failures.json` (each failed try's reason; the same reason twice stops the slice).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import resource
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobs.shards import DTYPES, ShardWriter
from orchestrator.core.errors import OrchError
from orchestrator.core.files import read_json, write_json_atomic
from orchestrator.core.shard_index import ShardIndex, SkippedFile, find_index, write_index
from orchestrator.tools.prepare import (
    CHUNK_BYTES,
    MANIFEST,
    SPLITS,
    Chunk,
    FileTally,
    InputFile,
    Settings,
    Tokenize,
    TokenizerFiles,
    copy_tokenizer,
    read_chunks,
    text_blocks,
    validation_mask,
)

SLICES = "slices"
PLAN = "plan.json"
SLICE_BYTES = 1 << 30  # input per slice: minutes of one node's cores, so a lost slice costs little
CUT_SEARCH_BYTES = 64 << 20  # how far past a nominal cut a record start is looked for
MERGE_BATCH_TOKENS = 1 << 24  # tokens routed to the splits at a time while merging
STALE_S = 300  # a running slice not touched for this long is taken as interrupted
TRIES = 3  # a slice is tried at most this often; the same reason twice stops it earlier


@dataclass(frozen=True)
class Slice:
    """Records of one input file: the whole file, or those that start in bytes [start, end) of a plain one."""

    file_no: int
    start: int
    end: int
    whole: bool


@dataclass
class SliceResult:
    """slice.json: what a committed slice holds."""

    tokens: int = 0
    documents: int = 0
    records: int = 0  # records of the file read in the slice, skipped ones included
    first_lines: int = 0  # lines of the file's first record, where the slice starts the file (the report's note)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (record number in the slice, reason), in order
    unreadable: str | None = None  # why the file could not be read; then the slice holds nothing
    sha256: str = ""
    seconds: float = 0.0
    cores: int = 1
    peak_rss_mb: float = 0.0  # the largest process of the task (its worker processes included)
    host: str = ""


# --- the plan -------------------------------------------------------------------------------------------------------


def cut_points(file: InputFile, pieces: int) -> list[int]:
    """Where a plain file is cut into about `pieces` byte ranges, each starting at a record."""
    cuts: list[int] = []
    with open(file.path, "rb") as stream:
        for k in range(1, pieces):
            nominal = file.size * k // pieces
            if cuts and nominal <= cuts[-1]:
                continue
            stream.seek(nominal)
            stream.readline()  # the rest of the line the nominal cut falls in
            cut = record_start(stream, file.kind, nominal + CUT_SEARCH_BYTES)
            if cut is not None and cut < file.size and (not cuts or cut > cuts[-1]):
                cuts.append(cut)
    return cuts


def record_start(stream: Any, kind: str, limit: int) -> int | None:
    """The next position where a record starts: any line start for JSON Lines, the line after a blank one for text."""
    if kind == "jsonl":
        return stream.tell()
    while stream.tell() < limit:
        line = stream.readline()
        if not line:
            return None
        if not line.strip():
            return stream.tell()
    return None


def plan_slices(files: list[InputFile], slice_bytes: int) -> list[Slice]:
    slices = []
    for file_no, file in enumerate(files):
        if file.kind in ("txt", "jsonl") and not file.compression and file.size > slice_bytes:
            bounds = [0, *cut_points(file, -(-file.size // slice_bytes)), file.size]
            slices += [Slice(file_no, a, b, False) for a, b in zip(bounds, bounds[1:], strict=False)]
        else:
            slices.append(Slice(file_no, 0, file.size, True))
    return slices


@dataclass
class Plan:
    """plan.json: the settings that decide the bytes, the input files and the slices."""

    settings: dict[str, Any]
    files: list[InputFile]
    slices: list[Slice]
    ignored: list[str]

    def save(self, folder: Path) -> None:
        files = [{**asdict(file), "path": str(file.path)} for file in self.files]
        data = {"settings": self.settings, "files": files, "slices": [asdict(s) for s in self.slices],
                "ignored": self.ignored}  # fmt: skip
        write_json_atomic(folder / PLAN, data)

    @classmethod
    def load(cls, folder: Path) -> Plan | None:
        data = read_json(folder / PLAN)
        if data is None:
            return None
        files = [InputFile(**{**item, "path": Path(item["path"])}) for item in data["files"]]
        return cls(data["settings"], files, [Slice(**s) for s in data["slices"]], data["ignored"])


def recorded_settings(settings: Settings, dtype: str, tokenizer: TokenizerFiles, files: list[InputFile]) -> dict:
    """What a prepared folder records of how it was made, as `prepare`'s manifest does."""
    return {**asdict(settings), "dtype": dtype, "tokenizer_sha256": tokenizer.sha256,
            "inputs": [[f.key, f.size] for f in files]}  # fmt: skip


def check_output(output: Path, settings: dict[str, Any]) -> None:
    """An output folder that holds data of another tokenizer, or of other settings, is refused before anything runs."""
    recorded = [(output / MANIFEST, (read_json(output / MANIFEST) or {}).get("settings"))]
    recorded.append((output / SLICES / PLAN, (read_json(output / SLICES / PLAN) or {}).get("settings")))
    recorded += [(output / split / "index.json", index_settings(output / split)) for split in SPLITS]
    for path, found in recorded:
        if not found:
            continue
        changed = [key for key, value in found.items() if key in settings and settings[key] != value]
        if "tokenizer_sha256" in changed:
            raise OrchError(
                f"--output {output}: {path} was prepared with another tokenizer (tokenizer.json SHA-256 "
                f"{found['tokenizer_sha256'][:16]}, --tokenizer has {settings['tokenizer_sha256'][:16]}). Allowed: "
                "the tokenizer it was prepared with, or a new --output folder."
            )
        if changed:
            shown = "; ".join(f"{key}: was {found[key]!r:.80}, now {settings[key]!r:.80}" for key in changed)
            raise OrchError(
                f"--output {output}: {path} records a prepare made with other settings ({shown}). Allowed: the same "
                "command as before (it continues), or a new --output folder."
            )


def index_settings(split_dir: Path) -> dict[str, Any] | None:
    index = find_index(split_dir)
    return {"tokenizer_sha256": index.tokenizer_sha256, "dtype": index.dtype} if index else None


# --- a slice --------------------------------------------------------------------------------------------------------


def slice_dir(output: Path, number: int) -> Path:
    return output / SLICES / f"{number:05d}"


def range_chunks(file: InputFile, part: Slice, chunk_bytes: int, tally: FileTally) -> Iterator[Chunk]:
    """The records that start in the slice's byte range, numbered from 0, in chunks of about `chunk_bytes`."""

    def lines() -> Iterator[bytes]:
        with open(file.path, "rb") as stream:
            stream.seek(part.start)
            done = part.start
            for line in stream:
                if done >= part.end:
                    return
                done += len(line)
                yield line

    records = text_blocks(lines()) if file.kind == "txt" else ((line, len(line)) for line in lines())
    batch, size, first = [], 0, 0
    for number, (record, length) in enumerate(records):
        if number == 0 and part.start == 0 and file.kind == "txt":
            tally.first_lines = record.count(b"\n") + 1
        batch.append(record)
        size, tally.records = size + length, number + 1
        if size >= chunk_bytes:
            yield Chunk(part.file_no, file.key, file.kind, first, batch, size)
            batch, size, first = [], 0, number + 1
    if batch:
        yield Chunk(part.file_no, file.key, file.kind, first, batch, size)


def worker_args(plan: Plan, tokenizer: TokenizerFiles) -> tuple:
    """What the worker pool of a task is started with; every document goes to one part, val is chosen when merging."""
    return tokenizer.json, tokenizer.eos_id, plan.settings["dtype"], plan.settings["seed"], 0.0


def tokenize_slice(plan: Plan, number: int, output: Path, tokenize: Tokenize, workers: int) -> None:
    """Tokenize one slice and commit it: a temporary folder, renamed when complete."""
    part, started = plan.slices[number], time.time()
    file = plan.files[part.file_no]
    target = slice_dir(output, number)
    staging = target.with_name(f".{target.name}.{socket.gethostname()}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tally, result, digest = FileTally(), SliceResult(cores=workers, host=socket.gethostname()), hashlib.sha256()
    records, lengths = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    chunks = read_chunks(file, part.file_no, 0, CHUNK_BYTES, tally) if part.whole else range_chunks(
        file, part, CHUNK_BYTES, tally
    )  # fmt: skip
    heartbeat = output / SLICES / f"{number:05d}.running"
    try:
        with open(staging / "tokens.bin", "wb") as sink:
            for chunk in tokenize(chunks):
                piece = chunk.parts["train"]
                sink.write(piece.tokens.data)
                digest.update(piece.tokens.data)
                records.append(piece.records)
                lengths.append(piece.lengths)
                result.skipped += piece.skipped
                heartbeat.touch()
            sink.flush()
            os.fsync(sink.fileno())
    except OrchError as err:  # the file cannot be read: the slice commits as skipped, the others go on
        result = SliceResult(unreadable=str(err), cores=workers, host=socket.gethostname())
        (staging / "tokens.bin").write_bytes(b"")
        records, lengths, digest = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], hashlib.sha256()
    documents = np.stack([np.concatenate(records), np.concatenate(lengths)], axis=1).astype(np.int64)
    np.save(staging / "documents.npy", documents)
    result.tokens, result.documents = int(documents[:, 1].sum()), len(documents)
    result.records, result.first_lines = tally.records, tally.first_lines
    result.sha256, result.seconds, result.peak_rss_mb = digest.hexdigest(), time.time() - started, peak_rss_mb()
    write_json_atomic(staging / "slice.json", asdict(result))
    try:
        staging.rename(target)
    except OSError:  # another try of the slice committed first: its bytes are the same
        shutil.rmtree(staging, ignore_errors=True)
    heartbeat.unlink(missing_ok=True)


def peak_rss_mb() -> float:
    """The peak resident memory of this process and of its largest finished child (the worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def read_result(output: Path, number: int) -> SliceResult | None:
    data = read_json(slice_dir(output, number) / "slice.json")
    if data is None:
        return None
    return SliceResult(**{**data, "skipped": [tuple(item) for item in data["skipped"]]})


def failures(output: Path, number: int) -> list[str]:
    return read_json(output / SLICES / f"{number:05d}.failures.json", [])


def record_failure(output: Path, number: int, reason: str) -> bool:
    """Note a failed try of the slice; True when it is to be tried again (not the same reason twice, tries left)."""
    seen = [*failures(output, number), reason]
    write_json_atomic(output / SLICES / f"{number:05d}.failures.json", seen)
    (output / SLICES / f"{number:05d}.running").unlink(missing_ok=True)
    return not stopped(seen)


def stopped(seen: list[str]) -> bool:
    return len(seen) >= TRIES or (len(seen) >= 2 and seen[-1] == seen[-2])


# --- the merge ------------------------------------------------------------------------------------------------------


def merge_when_complete(output: Path, header: dict[str, Any]) -> bool:
    """Merge the slices into the splits once every slice is committed; True when the splits are complete. One task
    merges (a lock held while it does; the OS releases it if the task dies)."""
    plan = Plan.load(output / SLICES)
    if plan is None or any(not (slice_dir(output, n) / "slice.json").is_file() for n in range(len(plan.slices))):
        return False
    with open(output / SLICES / "merge.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        if all((output / split / "index.json").is_file() for split in SPLITS):
            return True
        merge(output, plan, header)
    return True


def merge(output: Path, plan: Plan, header: dict[str, Any]) -> None:
    """Write both splits from the committed slices, in order, as `prepare` writes them from the whole input."""
    settings, dtype = plan.settings, DTYPES[plan.settings["dtype"]]
    writers = {s: ShardWriter(output / s, settings["dtype"], settings["shard_tokens"], []) for s in SPLITS}
    skipped: dict[str, Counter[str]] = {split: Counter() for split in SPLITS}
    results = [read_result(output, n) for n in range(len(plan.slices))]
    unreadable = {plan.slices[n].file_no for n, result in enumerate(results) if result.unreadable}
    skipped_files, offsets = [], Counter()
    for number, (part, result) in enumerate(zip(plan.slices, results, strict=True)):
        key = plan.files[part.file_no].key
        if part.file_no in unreadable:
            if result.unreadable:
                skipped_files.append(SkippedFile(key, number, result.unreadable))
            continue
        folder = slice_dir(output, number)
        tokens = np.fromfile(folder / "tokens.bin", dtype=dtype)
        if hashlib.sha256(tokens.data).hexdigest() != result.sha256:
            shutil.rmtree(folder)
            raise OrchError(f"{folder}: its tokens do not match their SHA-256; the slice was removed, run again.")
        documents = np.load(folder / "documents.npy")
        base = offsets[key]
        for first, last in batches(documents[:, 1]):
            lengths = documents[first:last, 1]
            in_val = validation_mask(key, documents[first:last, 0] + base, settings["seed"], settings["val_fraction"])
            start = int(documents[:first, 1].sum()) if first else 0
            piece = tokens[start : start + int(lengths.sum())]
            for split, chosen in (("train", ~in_val), ("val", in_val)):
                writers[split].add(piece[np.repeat(chosen, lengths)], lengths[chosen])
        for record, reason in result.skipped:
            is_val = validation_mask(key, np.array([record + base]), settings["seed"], settings["val_fraction"])[0]
            skipped[SPLITS[int(is_val)]][reason] += 1
        offsets[key] += result.records
    if not sum(s.tokens for s in writers["train"].shards) + writers["train"].filled:
        raise OrchError(
            f"--input: nothing to prepare into the train split ({sum(r.documents for r in results):,} documents in "
            f"{len(results)} slices, {len(skipped_files)} files unreadable). Allowed: input with documents that "
            "fall into the train split."
        )
    for split, writer in writers.items():
        index = writer.finish({**header, "split": split, "skipped": dict(skipped[split])})
        if skipped_files:
            write_index(output / split, ShardIndex(**{**index.__dict__, "skipped_files": skipped_files}))
    for number in range(len(plan.slices)):  # the shards hold the tokens now; the slices keep their records
        (slice_dir(output, number) / "tokens.bin").unlink(missing_ok=True)


def batches(lengths: np.ndarray) -> Iterator[tuple[int, int]]:
    """Consecutive ranges of documents of about MERGE_BATCH_TOKENS tokens each (a document longer goes alone)."""
    ends = np.cumsum(lengths)
    first = 0
    while first < len(lengths):
        done = int(ends[first - 1]) if first else 0
        last = max(first + 1, int(np.searchsorted(ends, done + MERGE_BATCH_TOKENS, side="right")))
        yield first, last
        first = last


def header_of(tokenizer: TokenizerFiles) -> dict[str, Any]:
    """What each split's index says of the tokenizer, as `prepare` writes it."""
    return {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "tokenizer": {"path": str(tokenizer.path), "sha256": tokenizer.sha256}}  # fmt: skip


def start(output: Path, plan: Plan, tokenizer: TokenizerFiles) -> None:
    """Write the plan (once) and the tokenizer's copy, as `prepare` keeps it beside the shards."""
    (output / SLICES).mkdir(parents=True, exist_ok=True)
    if Plan.load(output / SLICES) is None:
        plan.save(output / SLICES)
    copy_tokenizer(tokenizer.path, output)


def slice_states(output: Path, plan: Plan) -> dict[str, list[int]]:
    """Each slice as done, running, failed (stopped for good), interrupted (a try died) or waiting."""
    states: dict[str, list[int]] = {name: [] for name in ("done", "running", "failed", "interrupted", "waiting")}
    now = time.time()
    for number in range(len(plan.slices)):
        beat = output / SLICES / f"{number:05d}.running"
        if (slice_dir(output, number) / "slice.json").is_file():
            states["done"].append(number)
        elif stopped(failures(output, number)):
            states["failed"].append(number)
        elif beat.exists() and now - beat.stat().st_mtime < STALE_S:
            states["running"].append(number)
        elif beat.exists() or failures(output, number):
            states["interrupted"].append(number)
        else:
            states["waiting"].append(number)
    return states
