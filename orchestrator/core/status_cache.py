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
from typing import Any

from orchestrator.core.files import read_plain, write_atomic

CACHE = ".status-cache.json"
VERSION = 1
# Every input of a finished run's summary besides the scheduler's answer (orchestrator.core.rundir.Run._summary).
INPUTS = ("run.json", "jobs.json", "progress.json", "attempts.json", "mlflow.json", "errors")
CACHED_STATES = ("completed", "failed", "cancelled", "preempted", "damaged")
RACY_S = 2.0  # a summary made this soon after one of its files changed is not kept
MAX_BYTES = 256 << 20  # a few hundred bytes a run

Key = list[list[int] | None]


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
        return {
            run_id: entry
            for run_id, entry in data["runs"].items()
            if isinstance(entry, dict) and isinstance(entry.get("summary"), dict) and "key" in entry
        }

    def lookup(self, run_id: str, key: Key) -> dict[str, Any] | None:
        """The entry made from exactly these inputs: its `summary`, and `job` ([executor, job id, submitted]) with
        `alive`, the scheduler's answer it was made with (to be asked again), where its state depended on one."""
        entry = self.entries.get(run_id)
        if entry is None or entry["key"] != key:
            return None
        self.kept[run_id] = entry  # until `keep` replaces it
        return entry

    def keep(self, run_id: str, key: Key, summary: dict[str, Any], job: list[Any] | None, alive: bool | None) -> None:
        """Keep a summary made from the inputs `key` was taken of (before they were read), where it can be reused: a
        finished run's, with its run.json, not made just after a change."""
        changed = max((stamp[3] for stamp in key if stamp is not None), default=0) / 1e9
        if summary["state"] in CACHED_STATES and key[0] is not None and time.time() - changed > RACY_S:
            self.kept[run_id] = {"key": key, "summary": summary, "job": job, "alive": alive}
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
