"""The layout of a run's `checkpoints/` folder, read and written here only: folder names, `latest.json`, the commit
marker and its manifest, the protected list, and the folders set aside. Light (stdlib, pydantic, xxhash), so the login
side (status, resume, rollback, repair, export) and the training job share one definition.

A checkpoint is `step_N/` (N zero-padded to 8 digits). It is written into `.step_N.partial/` and counts only once
`COMMITTED.json` is in it: written last, it lists every file of the folder with its size and content digest, as the
ranks hashed them while writing them (the commit checks names and sizes against the folder and reads nothing back;
loading checks the digests). Each entry names its algorithm by its field: `xxh3_128` (XXH3, 128 bits: the disk, not the
hash, sets the pace of a save) in what is written now, `sha256` in checkpoints written before, which load as ever.
`latest.json` names the newest committed checkpoint; a folder that fails its manifest, or that a rollback takes back,
is renamed aside (`damaged_step_N`, `rolled_back_step_N`, with `.2`, `.3`... where that name is taken) and never read
again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol, Self

import xxhash
from pydantic import Field, model_validator

from orchestrator.core.files import file_digest, write_json_atomic
from orchestrator.core.runfiles import DamagedFile, RunFile, first_mismatch, read_model

LATEST = "latest.json"
COMMIT_MARKER = "COMMITTED.json"  # written last into a checkpoint folder: the folder counts only with it
PROTECTED = "protected.json"  # step -> why retention keeps that checkpoint
TRAIN_STATE = "train_state.json"  # in each checkpoint: the job's train state (jobs.state.SavedState)
STEP_PREFIX = "step_"


class Latest(RunFile):
    """checkpoints/latest.json: the newest committed checkpoint."""

    step: int = Field(ge=0)
    dir: str


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


Algorithm = Literal["xxh3_128", "sha256"]
HASHERS: dict[Algorithm, Callable[[], Hasher]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
NAMES: dict[Algorithm, str] = {"xxh3_128": "XXH3-128", "sha256": "SHA-256"}


def hasher() -> Hasher:
    """What the files of a new checkpoint are hashed with, as they are written."""
    return HASHERS["xxh3_128"]()


class CheckpointFile(RunFile):
    """A checkpoint file's size and digest; the one digest field present names its algorithm."""

    bytes: int = Field(ge=0)
    xxh3_128: str | None = None
    sha256: str | None = None  # checkpoints written before XXH3

    @model_validator(mode="after")
    def one_digest(self) -> Self:
        if (self.xxh3_128 is None) == (self.sha256 is None):
            raise ValueError("an entry has exactly one digest: xxh3_128 or sha256")
        return self

    @classmethod
    def hashed(cls, size: int, hashed: Hasher) -> CheckpointFile:
        """The entry of a file of `size` bytes whose content went through `hashed` (from `hasher()`)."""
        return cls(bytes=size, xxh3_128=hashed.hexdigest())

    def algorithm(self) -> Algorithm:
        return "xxh3_128" if self.xxh3_128 is not None else "sha256"

    @property
    def digest_name(self) -> str:
        return NAMES[self.algorithm()]

    def matches(self, path: Path) -> bool:
        """Whether the file's content has this entry's digest."""
        return file_digest(path, HASHERS[self.algorithm()]) == (self.xxh3_128 or self.sha256)


def entry_of(data: bytes | memoryview) -> CheckpointFile:
    """The entry of a file whose whole content is `data`."""
    hashed = hasher()
    hashed.update(data)
    return CheckpointFile.hashed(len(data), hashed)


class CommitMarker(RunFile):
    """COMMITTED.json: the checkpoint's step and every other file of its folder."""

    step: int = Field(ge=0)
    files: dict[str, CheckpointFile]

    def mismatch(self, folder: Path, checksums: bool = True) -> str | None:
        """The first file of the marker that is missing from `folder` or differs from it; None when all match."""
        return first_mismatch(folder, self.files, checksums)


def step_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:08d}"


def partial_dir(root: Path, step: int) -> Path:
    """Where a save of `step` is written before it is committed."""
    return root / f".{STEP_PREFIX}{step:08d}.partial"


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_rank{rank}.pt"


def committed_steps(root: Path) -> list[int]:
    """Steps of the checkpoint folders that carry a commit marker, newest first."""
    steps = []
    for folder in root.glob(f"{STEP_PREFIX}*"):
        number = folder.name.removeprefix(STEP_PREFIX)
        if number.isdigit() and (folder / COMMIT_MARKER).is_file():
            steps.append(int(number))
    return sorted(steps, reverse=True)


def read_latest(root: Path) -> Latest | None:
    """What latest.json names (None where it is absent); raises DamagedFile."""
    return read_model(root / LATEST, Latest)


def committed_step(root: Path) -> int | None:
    """The newest committed checkpoint's step: what latest.json names, or, where latest.json is damaged or gone,
    the newest folder with a commit marker."""
    try:
        latest = read_latest(root)
    except DamagedFile:
        latest = None
    if latest is not None:
        return latest.step
    steps = committed_steps(root)
    return steps[0] if steps else None


def write_latest(root: Path, step: int) -> None:
    write_json_atomic(root / LATEST, Latest(step=step, dir=step_dir(root, step).name).model_dump())


def forget_latest(root: Path) -> None:
    """No committed checkpoint is left to name (training starts over)."""
    (root / LATEST).unlink(missing_ok=True)


def read_commit_marker(folder: Path) -> CommitMarker | None:
    """The folder's commit marker (None where it has none); raises DamagedFile."""
    return read_model(folder / COMMIT_MARKER, CommitMarker)


def commit(root: Path, partial: Path, step: int, files: dict[str, CheckpointFile]) -> Path:
    """Write the commit marker into a finished save, put the folder in place of any older one of the same step, and
    name it in latest.json. `files` are the save's files with the size and digest their writers hashed as they wrote
    them: they must be the folder's files, at their sizes on disk. Returns the committed folder."""
    if problem := unlisted(partial, files):
        raise RuntimeError(f"the save of step {step} in {partial} cannot be committed: {problem}")
    marker = CommitMarker(step=step, files=files)
    write_json_atomic(partial / COMMIT_MARKER, marker.model_dump(exclude_none=True))
    final = step_dir(root, step)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    fsync_dir(root)
    write_latest(root, step)
    return final


def unlisted(partial: Path, files: dict[str, CheckpointFile]) -> str | None:
    """What differs between a save's folder and the files its writers hashed, by name and size (no file is read)."""
    present = {str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file() and p.name != COMMIT_MARKER}
    if extra := sorted(present - files.keys()):
        return f"{extra[0]} was written but not hashed"
    return CommitMarker(step=0, files=files).mismatch(partial, checksums=False)


def damage(folder: Path, checksums: bool = True) -> str | None:
    """What is wrong with a committed checkpoint, or None when every file matches its manifest (sizes only, without
    `checksums`)."""
    try:
        marker = read_commit_marker(folder)
    except DamagedFile as err:
        return f"unreadable commit marker ({err.why})"
    if marker is None:
        return "no commit marker"
    return marker.mismatch(folder, checksums)


def lost_files(folder: Path) -> bool:
    """Whether a checkpoint folder has lost its commit marker or a file the marker lists: what retention's deletion
    does to a folder being read (a marker that is there but unreadable is damage, not loss)."""
    try:
        marker = read_commit_marker(folder)
    except DamagedFile:
        return False
    return marker is None or any(not (folder / name).is_file() for name in marker.files)


def set_aside(root: Path, step: int, why: Literal["damaged", "rolled_back"]) -> Path:
    """Rename a checkpoint folder out of the committed ones, to a name no earlier set-aside holds; returns it."""
    folder = step_dir(root, step)
    target = root / f"{why}_{folder.name}"
    candidate, n = target, 1
    while candidate.exists():
        n += 1
        candidate = target.with_name(f"{target.name}.{n}")
    folder.rename(candidate)
    return candidate


def incomplete_dirs(root: Path) -> list[Path]:
    """What interrupted saves left behind: partial folders, and step folders without a commit marker."""
    partial = list(root.glob(f".{STEP_PREFIX}*.partial"))
    uncommitted = [p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and not (p / COMMIT_MARKER).is_file()]
    return partial + uncommitted


def read_protected(root: Path) -> dict[str, str]:
    """The checkpoints retention keeps whatever their age: step -> reason (a damaged list protects nothing; the
    next `protect` rewrites it whole)."""
    try:
        return read_model(root / PROTECTED, dict[str, str], {})
    except DamagedFile:
        return {}


def protect(root: Path, step: int, reason: str) -> None:
    write_json_atomic(root / PROTECTED, {**read_protected(root), str(step): reason})


def fsync_dir(path: Path) -> None:
    """Force a folder's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
