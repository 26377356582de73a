"""The summaries of finished runs, kept beside the runs (`runs/.status-cache.json`) so that `orch status` over a
thousand runs stats their files instead of reading and validating them.

A summary is reused only while everything it was made from is unchanged: the run files it reads (each file's inode,
size, modification and change times), its `errors/` folder, and the scheduler's answer for its newest job. Only
finished runs are kept (a running one's ETA, stall and node-hours move with the clock), and none whose files
changed in the last seconds before the summary was made (a file rewritten within the file system's timestamp
granularity could otherwise look unchanged). The cache is derived data: a damaged, foreign or unwritable one is
ignored and made again; the run directories stay the only source of truth.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from orchestrator.core.files import read_plain, write_atomic

if TYPE_CHECKING:
    from orchestrator.core.schedulers.base import Job

CACHE = ".status-cache.json"
VERSION = 1
# Every input of a finished run's summary besides the scheduler's answer (orchestrator.core.rundir.Run._summary).
INPUTS = ("run.json", "jobs.json", "progress.json", "attempts.json", "mlflow.json", "errors")
CACHED_STATES = ("completed", "failed", "cancelled", "preempted", "damaged")
RACY_S = 2.0  # a summary made this soon after one of its files changed is not kept
MAX_BYTES = 256 << 20  # a few hundred bytes a run

Key = list[list[int] | None]


class Exact(BaseModel):
    """A part of an entry as read back: every field, of its type (strictly: a number written as a string would fail
    where `orch status` formats it), and nothing else."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Summary(Exact):
    """What `orch status` shows of a run (orchestrator.core.rundir.Run.summary), as the cache holds it."""

    run_id: str
    state: str
    step: int | None
    steps: int | None
    loss: float | None
    val_loss: float | None
    val_step: int | None
    tokens_per_s: float | None
    eta_s: float | None
    last_checkpoint_step: int | None
    mlflow_run_id: str | None
    profile: str | None
    recipe: str | None
    sweep: str | None
    created: float | None
    job_ids: list[str]
    allocations: int
    node_hours: float
    run_dir: str
    error: str | None


class JobRef(Exact):
    """The run's newest job, whose liveness the summary's state depended on."""

    executor: str
    job_id: str
    submitted: float


class Entry(Exact):
    key: Key
    summary: Summary
    job: JobRef | None
    alive: bool | None
    created: float  # the run's creation time, which orders the listing (a damaged run's summary has none)


def well_formed(entry: Any) -> bool:
    """Whether an entry read back is whole (`Entry`); the entry itself is used as read (validation would turn an int
    into a float)."""
    try:
        Entry.model_validate(entry)
    except ValidationError:
        return False
    return True


def inputs_key(folder: Path) -> Key:
    """What identifies the present version of a run's inputs: per input, its inode, size and times (None: absent)."""
    key: Key = []
    base = os.fspath(folder)  # strings: pathlib's joining costs more than the stat over a thousand runs
    for name in INPUTS:
        try:
            st = os.stat(f"{base}/{name}")
        except OSError:
            key.append(None)
            continue
        key.append([st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return key


class StatusCache:
    """The cache of one runs folder: read once, looked up per run, written back once."""

    def __init__(self, runs: Path) -> None:
        self.path = runs / CACHE
        self.entries = self._read()
        self.kept: dict[str, dict[str, Any]] = {}

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(read_plain(self.path, MAX_BYTES))  # never a FIFO waited on, nor a link followed
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("runs"), dict):
            return {}
        return {run_id: entry for run_id, entry in data["runs"].items() if well_formed(entry)}

    def lookup(self, run_id: str, key: Key) -> dict[str, Any] | None:
        """The entry made from exactly these inputs (`Entry`): its `summary`, its `created`, and `job` with `alive`,
        the scheduler's answer it was made with (to be asked again), where its state depended on one."""
        entry = self.entries.get(run_id)
        if entry is None or entry["key"] != key:
            return None
        self.kept[run_id] = entry  # until `keep` replaces it
        return entry

    def keep(self, run_id: str, key: Key, summary: dict, created: float, job: Job | None, alive: bool | None) -> None:
        """Keep a summary made from the inputs `key` was taken of (before they were read), where it can be reused: a
        finished run's, with its run.json, not made just after a change. `job`: the newest job asked about."""
        changed = max((stamp[3] for stamp in key if stamp is not None), default=0) / 1e9
        if summary["state"] in CACHED_STATES and key[0] is not None and time.time() - changed > RACY_S:
            ref = None if job is None else {"executor": job.executor, "job_id": job.job_id, "submitted": job.submitted}
            self.kept[run_id] = {"key": key, "summary": summary, "job": ref, "alive": alive, "created": created}
        else:
            self.kept.pop(run_id, None)

    def save(self) -> None:
        """Write the kept entries (only these: runs gone or changed drop out), where anything changed; a folder this
        user cannot write to keeps the cache it has."""
        if self.kept == self.entries:
            return
        try:
            write_atomic(self.path, json.dumps({"version": VERSION, "runs": self.kept}), durable=False)
        except OSError:
            pass
