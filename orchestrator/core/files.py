"""How every file of a run directory is written and read: atomically, with one helper for all of them."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def create_unique(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new file of a unique name in `folder`, open for writing, with the mode the umask gives it: mkstemp's 0600
    would keep it from a teammate of the project group (docs/run-directory.md#shared-files)."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), path
        except FileExistsError:
            continue


@contextmanager
def temporary_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder of a unique name in `parent`, removed at the end, with the mode the umask gives it (mkdtemp's
    0700 would keep the project group from it)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(8)}"
        try:
            path.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield path
    finally:
        shutil.rmtree(path)


def write_atomic(path: Path, data: bytes | memoryview | str, durable: bool = True) -> None:
    """Write to a temporary file beside `path` (forced to disk when `durable`), then rename it over `path`:
    a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_unique(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class NotAPlainFile(OSError):
    """A run file that is a link, a FIFO, a device or larger than any run file: never followed, waited on or read."""


def open_plain(path: Path, flags: int, follow_links: bool = False) -> int:
    """A descriptor of a plain file, opened without waiting on a FIFO and (unless `follow_links`) without following
    a symbolic link planted in its place. Raises FileNotFoundError when absent, NotAPlainFile, or OSError."""
    flags |= os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, 0o666)  # the mode (umask applied) of a file that O_CREAT makes
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise NotAPlainFile(errno.ELOOP, "a symbolic link, not a file of the run") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotAPlainFile(errno.EINVAL, "not a plain file (a FIFO, a device or a folder)")
    return fd


def read_plain(path: Path, limit: int, follow_links: bool = False) -> bytes:
    """The bytes of a plain file (`open_plain`) of at most `limit` bytes."""
    with os.fdopen(open_plain(path, os.O_RDONLY, follow_links), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise NotAPlainFile(errno.EFBIG, f"{size} bytes, far more than any run file holds")
        return f.read(limit + 1)


def append_plain(path: Path, text: str) -> None:
    """Append to a run's own log file (a spool), created with the umask's mode if absent, never through a link or
    into a FIFO planted in its place (which would write outside the run, or block)."""
    with os.fdopen(open_plain(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as f:
        f.write(text.encode())


def write_json_atomic(path: Path, data: Any, durable: bool = True) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True), durable)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read in 16 MiB pieces (checkpoint shards and data shards are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
