"""How every file of a run directory is written and read: atomically, with one helper for all of them."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.core.errors import MACHINE_FAULTS


def create_unique(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new file of a unique name in `folder`, open for writing, with the mode the umask gives it: mkstemp's 0600
    would keep it from a teammate of the project group (docs/run-directory.md#shared-files)."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), path
        except FileExistsError:
            continue


OWNER = ".owner"  # beside a temporary folder: locked by the process that uses the folder, for as long as it does


@contextmanager
def temporary_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder of a unique name in `parent`, removed at the end, with the mode the umask gives it (mkdtemp's
    0700 would keep the project group from it). Its process holds a lock on `<folder>.owner` while it lives: a kill
    that skips the removal leaves a folder whose lock is free, which `abandoned` finds (from any host)."""
    fd, owner = create_unique(parent, prefix, OWNER)
    fcntl.flock(fd, fcntl.LOCK_EX)
    path = owner.with_name(owner.name.removesuffix(OWNER))
    try:
        path.mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        owner.unlink(missing_ok=True)
        os.close(fd)


def abandoned(parent: Path, pattern: str, remove: bool) -> list[Path]:
    """The temporary folders in `parent` whose names match `pattern` and whose process is gone (their owner lock is
    free, or gone); with `remove`, removed with their lock. A folder in use is never touched."""
    found = []
    for path in sorted(p for p in parent.glob(pattern) if p.is_dir() and not p.is_symlink()):
        owner = path.with_name(path.name + OWNER)
        try:
            fd = os.open(owner, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = None  # its process removed the lock last, after the folder, or a version without locks made it
        except OSError:
            continue
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            found.append(path)
            if remove:
                shutil.rmtree(path, ignore_errors=True)
                owner.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
    return found


class StoppedCopy(Exception):
    """Carries a copy's OSError through shutil.copytree, which would collect it instead (`copy_tree`)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def copy_tree(source: Path, target: Path, ignore: Callable[[str, list[str]], Iterable[str]]) -> None:
    """shutil.copytree that stops at the first file it cannot copy, raising that OSError (it names the file):
    copytree goes on through every other file and raises one shutil.Error, whose text has lost the system's error
    number (a full disk, a quota)."""

    def copy(src: str, dst: str) -> None:
        try:
            shutil.copy2(src, dst)
        except OSError as err:
            raise StoppedCopy(err) from err

    try:
        shutil.copytree(source, target, ignore=ignore, copy_function=copy)
    except StoppedCopy as stopped:
        raise stopped.error from None


def write_atomic(path: Path, data: bytes | memoryview | str, durable: bool = True) -> None:
    """Write to a temporary file beside `path` (forced to disk when `durable`), then rename it over `path`:
    a reader sees the old file or the new one, never half of one. An OSError names `path` (`naming`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with naming(path):
            fd, tmp = create_unique(path.parent, f".{path.name}.", ".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError raised inside names `path` as the file it concerns: a write or an fsync names none, a temporary
    file's name means nothing to a user, and a full disk or a quota must say where (`errors.machine_fault`)."""
    try:
        yield
    except OSError as err:
        err.filename, err.filename2 = str(path), None
        raise


PROBE_BYTES = 1 << 16  # a full disk or quota refuses any write; a small one leaves the others room


def fault_behind(err: BaseException, folder: Path) -> OSError | None:
    """The machine fault behind a library's own error for a failed write into `folder`, which has lost the system's
    error (torch's checkpoint writer: "unexpected pos"; safetensors: SafetensorError): the OSError of MACHINE_FAULTS
    that writing and syncing PROBE_BYTES there (or into its nearest folder that exists) meets now. None where `err`
    is an OSError itself, or none is met."""
    if isinstance(err, OSError):
        return None
    folder = next(p for p in (folder, *folder.parents) if p.is_dir())
    probe = None
    try:
        fd, probe = create_unique(folder, ".probe-", ".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as refused:
        refused.filename, refused.filename2 = str(folder), None
        return refused if refused.errno in MACHINE_FAULTS else None
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    return None


@contextmanager
def library_writes(folder: Path) -> Iterator[None]:
    """A library writing into `folder` that fails for a full disk, a quota or a read-only or forbidden folder raises
    the OSError that says so (`fault_behind`), naming `folder` where it names no file, which the CLI and the job's
    failure report explain."""
    try:
        yield
    except OSError as err:
        err.filename = err.filename or str(folder)
        raise
    except Exception as err:
        if (fault := fault_behind(err, folder)) is not None:
            raise fault from err
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
        return f.read(size + 1)  # not `limit`: read(n) allocates n bytes first


def append_plain(path: Path, text: str) -> None:
    """Append to a run's own log file (a spool), created with the umask's mode if absent, never through a link or
    into a FIFO planted in its place (which would write outside the run, or block)."""
    with naming(path), os.fdopen(open_plain(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as f:
        f.write(text.encode())


def write_json_atomic(path: Path, data: Any, durable: bool = True) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True), durable)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def file_digest(path: Path, algorithm: Callable[[], Any]) -> str:
    """A file's digest by `algorithm` (a hash object's constructor), read in 16 MiB pieces (checkpoint shards and
    data shards are gigabytes)."""
    digest = algorithm()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    return file_digest(path, hashlib.sha256)
