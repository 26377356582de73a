"""Sharded checkpoints that survive a kill at any moment.

A checkpoint holds the model and LionW state as torch.distributed.checkpoint shards (one per rank, reshardable to
any world size), each rank's RNG state (`jobs.state.RngState`), and the train state (`jobs.state.SavedState`: step,
data position, world size, recipe hash, MLflow run id, the learning-rate schedule's state). Its folder layout, commit
marker and `latest.json` are `orchestrator.core.checkpoints`': nothing counts before its commit, and nothing older is
deleted before that. `maybe_save` owns the cadence: every `checkpoint.every_steps`, the last step, and a stop.

With `async_save`, training waits only while the state is copied off the accelerator, into host buffers that one
stager keeps from save to save (pinned where there is CUDA); the write, the manifest and the commit go on in a
background thread, on a gloo group of their own.

Every file is hashed as it is written (`HashingWriter`, and the bytes of the files written here), with XXH3-128 at
many GB/s a core (`orchestrator.core.checkpoints.hasher`: SHA-256 took as long as the disk's write): each rank hashes
its own, the digests reach rank 0 with torch's write results, and the commit marker is made from them without reading
the checkpoint back. Loading checks them (`orchestrator.core.checkpoints.damage`).
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import mmap
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future as TorchFuture
from torch.utils.serialization import config as serialization

from jobs.state import RngState
from orchestrator.core import checkpoints as layout
from orchestrator.core.config import CheckpointSpec
from orchestrator.core.errors import machine_fault
from orchestrator.core.files import fault_behind, write_atomic

log = logging.getLogger(__name__)


CHUNK_BYTES = 8 << 20  # what one write carries to the disk: a multiple of any block size that direct I/O asks for


def open_direct(path: Path) -> tuple[int, bool]:
    """The file created (mode from the umask) for writing around the page cache where its file system allows
    (O_DIRECT), else through it; and whether it is direct."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o666), True
        except OSError as err:
            if err.errno != errno.EINVAL:  # tmpfs and a few others refuse O_DIRECT; anything else is a real fault
                raise
    return os.open(path, flags, 0o666), False


class HashingFile:
    """A binary file written in order, never sought back (what torch's writer does), whose bytes go through the
    checkpoint's hash on their way into it. The bytes gather in two page-aligned buffers of `CHUNK_BYTES`; a full one
    goes to the disk from a thread while the caller serialises and hashes into the other, with direct I/O where the
    file system has it: the data reaches the disk once, at the disk's pace, without filling the page cache for the
    kernel to write back later. `close` writes the rest and fsyncs once: when it returns, the file is durable."""

    def __init__(self, path: Path) -> None:
        self.fd, self.direct = open_direct(path)
        self.hashed, self.size, self.filled = layout.hasher(), 0, 0
        self.buffers = [memoryview(mmap.mmap(-1, CHUNK_BYTES)) for _ in range(2)]  # freed with the object
        self.current = self.buffers[0]
        self.disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-write")
        self.in_flight: Future | None = None
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        length = view.nbytes
        self.hashed.update(view)
        while view:
            taken = min(len(view), CHUNK_BYTES - self.filled)
            self.current[self.filled : self.filled + taken] = view[:taken]
            self.filled += taken
            view = view[taken:]
            if self.filled == CHUNK_BYTES:
                self._hand_over()
        self.size += length
        return length

    def _hand_over(self) -> None:
        """Send the full buffer to the disk (once the previous one is there) and fill the other."""
        self._wait()
        self.in_flight = self.disk.submit(write_all, self.fd, self.current)
        self.buffers.reverse()
        self.current, self.filled = self.buffers[0], 0

    def _wait(self) -> None:
        if self.in_flight is not None:
            self.in_flight.result()
            self.in_flight = None

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        """Nothing: the bytes reach the disk in whole buffers, the rest at `close`."""

    def close(self) -> None:
        """Write what is left and force the file to disk (once; a second call does nothing)."""
        if self.closed:
            return
        try:
            self._wait()
            if self.filled:
                if self.direct:  # the tail is not a whole number of blocks: it goes through the page cache
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                write_all(self.fd, self.current[: self.filled])
            os.fsync(self.fd)
        finally:
            self.discard()

    def discard(self) -> None:
        """Release the file and the buffers, whatever is left unwritten (a failed save's folder is never used)."""
        if self.closed:
            return
        self.closed = True
        self.disk.shutdown(wait=True)
        os.close(self.fd)

    def entry(self) -> layout.CheckpointFile:
        return layout.CheckpointFile.hashed(self.size, self.hashed)


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


class HashingFileSystem(FileSystem):
    """torch's local file system, keeping the size and digest of every file written through it, by name."""

    def __init__(self) -> None:
        self.written: dict[str, layout.CheckpointFile] = {}

    @contextmanager
    def create_stream(self, path: str | Path, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        hashing = HashingFile(Path(path))
        try:
            yield hashing
            hashing.close()
        finally:
            hashing.discard()
        self.written[Path(path).name] = hashing.entry()

    def rename(self, path: str | Path, new_path: str | Path) -> None:
        super().rename(path, new_path)
        self.written[Path(new_path).name] = self.written.pop(Path(path).name)


DIGESTS = "orch.digests"  # the write result that carries a rank's digests to the coordinator, never into .metadata


class HashingWriter(dcp.FileSystemWriter):
    """torch's FileSystemWriter, hashing every file as it writes it, and writing this rank's own files (`extra`: name
    -> bytes, such as its RNG state) the same way before its shards. Each rank's digests travel to the coordinator
    with its write results, so every file is durable before they do; after `finish` the coordinator's `digests` list
    every file of the save. The shards are written without torch.save's CRC-32 of each record (a second pass over
    every byte that nothing checks; `torch.load` reads them as before): the digests cover them. torch's own fsync is
    off: it would sync a buffered file before its last bytes are written, and `HashingFile` syncs each file once."""

    def __init__(self, path: Path, extra: dict[str, bytes]) -> None:
        super().__init__(path, sync_files=False)
        self.fs = HashingFileSystem()
        self.extra = extra
        self.digests: dict[str, layout.CheckpointFile] = {}

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> TorchFuture[list[WriteResult]]:
        for name, data in self.extra.items():
            with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
                stream.write(data)
        with serialization.patch({"save.compute_crc32": False}):
            results = super().write_data(plan, planner).wait()  # torch's own writer has finished when it returns
        carried = WriteResult(index=MetadataIndex(DIGESTS), size_in_bytes=0, storage_data=dict(self.fs.written))
        done: TorchFuture[list[WriteResult]] = TorchFuture()
        done.set_result([*results, carried])
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        carried = [r.storage_data for rank in results for r in rank if r.index.fqn == DIGESTS]
        super().finish(metadata, [[r for r in rank if r.index.fqn != DIGESTS] for rank in results])
        self.digests = {name: entry for each in carried for name, entry in each.items()} | self.fs.written


def unwrapped(err: BaseException, rank: int) -> Exception:
    """The error itself, or the one a CheckpointException wraps (every rank gets the same): a machine fault of any
    rank first, so that the ranks agree on it, else this rank's own, else the first."""
    if not isinstance(err, dcp.CheckpointException):
        return err if isinstance(err, Exception) else RuntimeError(str(err))
    wrapped = [error for error, _ in err.failures.values()]
    own = err.failures[rank][0] if rank in err.failures else None
    chosen = next((e for e in wrapped if machine_fault(e)), own or (wrapped[0] if wrapped else None))
    return chosen if isinstance(chosen, Exception) else RuntimeError(str(err))


class Checkpointer:
    """Saves and restores one run's checkpoints; every method is called by every rank at the same point."""

    def __init__(self, root: Path, spec: CheckpointSpec) -> None:
        self.root, self.spec, self.async_save = root, spec, spec.async_save
        self.keep_last, self.keep_every = spec.keep_last, spec.keep_every
        self.rank = dist.get_rank()
        self.group = dist.new_group(backend="gloo")  # background collectives never share the training group
        self.background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending: Future | None = None
        self.trimming: Future | None = None  # rank 0's retention after the last commit, off the save's path
        self.lock = threading.Lock()
        self.committed: int | None = None  # newest step committed by this job (rank 0 knows)
        self.longest_save_s: float | None = None  # every rank knows
        self.stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=torch.cuda.is_available(),
                use_shared_memory=False,
                use_async_staging=False,  # the next optimizer step changes the state: it is copied before save returns
                use_non_blocking_copy=False,
            )
        )
        root.mkdir(parents=True, exist_ok=True)

    # --- saving -------------------------------------------------------------------------------------

    def maybe_save(self, step: int, last_step: int, stopping: bool, trainer: Any, train_state: Stateful) -> None:
        """Save at the recipe's cadence, at the last step, and when the job is about to stop."""
        if self.spec.due(step) or step == last_step or stopping:
            self.save(step, trainer.model, trainer.optimizer, train_state.state_dict())

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict) -> None:
        """Returns once the state is copied off the accelerator (async) or written and committed (sync)."""
        self.wait()
        started = time.perf_counter()
        partial = layout.partial_dir(self.root, step)
        with self.failed_save(partial):
            partial.mkdir(parents=True, exist_ok=True)
            rng = io.BytesIO()
            torch.save(RngState().state_dict(), rng)
            writer = HashingWriter(partial, {layout.rng_file(partial, self.rank).name: rng.getvalue()})
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optimizer": optim_state}
            if self.async_save:
                written = dcp.async_save(
                    state, storage_writer=writer, process_group=self.group, async_stager=self.stager
                )
                self.pending = self.background.submit(
                    self._finish, step, partial, writer, written, train_state, started
                )
            else:
                dcp.save(state, storage_writer=writer, process_group=self.group)
                self._finish(step, partial, writer, None, train_state, started)

    def _finish(
        self, step: int, partial: Path, writer: HashingWriter, written: Future | None, train_state: dict, started: float
    ) -> None:
        with self.failed_save(partial):
            if written is not None:
                written.result()  # on rank 0 this returns once every rank's shards and the metadata are written
            took = torch.tensor([float("nan")], dtype=torch.float64)
            try:
                if self.rank == 0:
                    took[0] = self._commit(step, partial, train_state, writer.digests, started)
            finally:  # every rank learns how long the save took, or that it failed, on the checkpoint's group
                dist.broadcast(took, src=0, group=self.group)
            if not took.isnan().item():
                self.longest_save_s = max(self.longest_save_s or 0.0, took.item())
            if self.rank == 0:  # in the background: no rank, not even this one, waits for the deletion
                self.trimming = self.background.submit(self._apply_retention)

    @contextmanager
    def failed_save(self, partial: Path) -> Iterator[None]:
        """A save that fails raises the error itself, naming the folder where the system named no file, and a full
        disk or quota as such (`fault_behind`): torch wraps every rank's error in a CheckpointException, a
        BaseException that the job's failure handling would never see. Its partial folder stays until the job records
        why it failed (`Run.record_failure` frees it where the disk is full) or the next start cleans it up."""
        try:
            yield
        except (Exception, dcp.CheckpointException) as err:
            cause = unwrapped(err, self.rank)
            if isinstance(cause, OSError) and cause.filename is None:
                cause.filename = str(partial)
            cause = fault_behind(cause, self.root) or cause  # torch's writer: a full disk as "unexpected pos"
            if cause is err:
                raise
            raise cause from err

    def _commit(
        self, step: int, partial: Path, train_state: dict, digests: dict[str, layout.CheckpointFile], started: float
    ) -> float:
        """Rank 0: write the train state and the commit; returns the seconds since `started` until it was written."""
        saved = json.dumps({"step": step, **train_state}).encode()
        write_atomic(partial / layout.TRAIN_STATE, saved)
        layout.commit(self.root, partial, step, digests | {layout.TRAIN_STATE: layout.entry_of(saved)})
        took = time.perf_counter() - started
        with self.lock:
            self.committed = step
        return took

    def _apply_retention(self) -> None:
        """Keep the newest `keep_last` checkpoints, every `keep_every`-th step (milestones) and the protected ones."""
        protected = layout.read_protected(self.root)
        for step in layout.committed_steps(self.root)[self.keep_last :]:
            if not (self.keep_every and step % self.keep_every == 0) and str(step) not in protected:
                shutil.rmtree(layout.step_dir(self.root, step))

    def forget_latest(self) -> None:
        """Rank 0: no committed checkpoint is left to name (training starts over)."""
        if self.rank == 0:
            layout.forget_latest(self.root)

    def protect(self, step: int, reason: str) -> None:
        """Rank 0: retention never deletes this checkpoint (`checkpoints/protected.json`: step -> reason)."""
        if self.rank == 0:
            self.wait()  # a deletion in flight decided without it
            layout.protect(self.root, step, reason)

    def wait(self) -> None:
        """Block until the save in flight is written everywhere and committed, and the older checkpoints it made
        redundant are deleted."""
        if self.pending is not None:  # first: an async save's commit hands the deletion to `trimming`
            self.pending.result()
            self.pending = None
        if self.trimming is not None:
            self.trimming.result()
            self.trimming = None

    def close(self) -> None:
        self.wait()
        dist.barrier(group=self.group)
        self.background.shutdown()
        self.stager.close()

    def last_committed(self) -> int | None:
        with self.lock:
            return self.committed

    def save_seconds(self) -> float | None:
        """The longest wall time among this job's committed saves from the start of `save()` to the commit being
        written (None before the first commit): what the job's deadline must leave for its last save. Every rank
        has the same figure; with `async_save` it counts once the save in flight has committed."""
        return self.longest_save_s

    # --- loading ------------------------------------------------------------------------------------

    def clean_incomplete(self) -> None:
        """Rank 0 removes what an interrupted save left behind; committed checkpoints are untouched."""
        if self.rank == 0:
            for path in layout.incomplete_dirs(self.root):
                shutil.rmtree(path)
        dist.barrier()

    def choose(self) -> tuple[int | None, list[str]]:
        """The newest committed checkpoint that passes its manifest, and what was wrong with newer ones."""
        choice: list[Any] = [None, []]
        self.wait()
        if self.rank == 0:
            for step in layout.committed_steps(self.root):
                problem = layout.damage(layout.step_dir(self.root, step))
                if problem is None:
                    choice[0] = step
                    break
                choice[1].append(f"checkpoint at step {step} is damaged: {problem}")
                layout.set_aside(self.root, step, "damaged")
            if choice[0] is not None and choice[1]:
                layout.write_latest(self.root, choice[0])  # no longer the set-aside folder; none left keeps it named
        dist.broadcast_object_list(choice, src=0)
        return choice[0], choice[1]

    def load(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore the shards in place (any world size) and this rank's RNG; returns the train state."""
        path = layout.step_dir(self.root, step)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        rng_file = layout.rng_file(path, self.rank)
        if rng_file.is_file():
            RngState().load_state_dict(torch.load(rng_file, weights_only=False))
        with self.lock:
            self.committed = step
        return json.loads((path / layout.TRAIN_STATE).read_text())
