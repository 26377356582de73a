"""index.json of a prepared split (`train/`, `val/`): the one module that reads and writes it.

A split folder holds raw token files `shard_00000.bin`, ... and `index.json`, written atomically after the last shard,
so a folder with an index is complete:

    {"format": "orch-token-shards/1", "dtype": "uint16", "vocab_size": 64000, "eos_id": 2,
     "tokenizer": {"path": "...", "sha256": "..."}, "split": "train", "skipped": {reason: count},
     "tokens": N, "documents": D,
     "shards": [{"file": "shard_00000.bin", "tokens": n, "documents": d, "sha256": "..."}, ...]}

and, only where a prepare job skipped input files it could not read, `"skipped_files": [{"file": ..., "slice": n,
"reason": ...}]` before `"shards"`. A shard's `documents` counts the documents that end in it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.core.errors import OrchError
from orchestrator.core.files import read_json, write_json_atomic

FORMAT = "orch-token-shards/1"
INDEX = "index.json"
ITEMSIZE = {"uint16": 2, "uint32": 4}  # bytes per token of each width


@dataclass(frozen=True)
class Shard:
    """One token file of a split, as its index lists it."""

    file: str
    tokens: int
    documents: int
    sha256: str


@dataclass(frozen=True)
class SkippedFile:
    """An input file a prepare job could not read: which slice of the plan held it, and why."""

    file: str
    slice: int
    reason: str


@dataclass(frozen=True)
class ShardIndex:
    """A split's index. Fields a hand-written or older index lacks take their defaults (the plan reads those)."""

    format: str = FORMAT
    dtype: str = "uint16"
    vocab_size: int = 0
    eos_id: int | None = None
    tokenizer: dict[str, str] = field(default_factory=dict)  # path, sha256 of tokenizer.json
    split: str = ""
    skipped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    documents: int = 0
    skipped_files: list[SkippedFile] = field(default_factory=list)
    shards: list[Shard] = field(default_factory=list)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def tokenizer_sha256(self) -> str:
        return self.tokenizer.get("sha256", "")

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.skipped_files:
            del data["skipped_files"]  # indexes without skipped files keep the format they always had
        return data


def parse_index(data: dict[str, Any]) -> ShardIndex:
    known = {name: value for name, value in data.items() if name in ShardIndex.__dataclass_fields__}
    known["shards"] = [Shard(**shard) for shard in known.get("shards", [])]
    known["skipped_files"] = [SkippedFile(**item) for item in known.get("skipped_files", [])]
    return ShardIndex(**known)


def find_index(split_dir: Path) -> ShardIndex | None:
    """The split's index where one exists and parses, else None: what the plan and preflight read."""
    data = read_json(split_dir / INDEX)
    if not isinstance(data, dict):
        return None
    try:
        return parse_index(data)
    except (TypeError, ValueError):
        return None


def read_index(split_dir: Path) -> ShardIndex:
    """The index of a complete prepared split; a missing or foreign one is an error saying what to do."""
    path = split_dir / INDEX
    data = read_json(path)
    if data is None:
        raise OrchError(
            f"{path} does not exist: {split_dir} is not a complete prepared split. Prepare the corpus with "
            "`orch data prepare` (an interrupted prepare finishes when run again with the same arguments)."
        )
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else data
        raise OrchError(f"{path}: field 'format' is {found!r}. Allowed: {FORMAT!r}.")
    try:
        return parse_index(data)
    except (TypeError, ValueError) as err:
        raise OrchError(f"{path}: not an index of token shards ({err}). Prepare the corpus again.") from None


def write_index(split_dir: Path, index: ShardIndex) -> None:
    """Written last, atomically: its presence says every shard it lists is complete."""
    write_json_atomic(split_dir / INDEX, index.as_json())


def size_problem(split_dir: Path, index: ShardIndex) -> str | None:
    """The first shard whose file is missing or not the size the index lists, said in a sentence; None if all fit."""
    for shard in index.shards:
        path, expected = split_dir / shard.file, shard.tokens * index.itemsize
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if size != expected:
            return f"{path} has {size} bytes, {split_dir / INDEX} lists {shard.tokens} tokens ({expected} bytes)"
    return None
