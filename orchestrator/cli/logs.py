"""`orch logs`: a rank's log of the run's newest job, optionally followed as it grows until the run ends."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from orchestrator.cli.follow import wait_for_exit
from orchestrator.core.errors import OrchError
from orchestrator.core.rundir import TERMINAL_STATES, Run

POLL_S = 1.0


def newest_job_log(run: Run, rank: int, wait: bool = False) -> list[Path]:
    """The rank's stdout and stderr files of the newest job; with `wait`, once it has started writing them (a queued
    job has none yet), unless the run ends first."""
    jobs = run.jobs
    if not jobs:
        raise OrchError(f"Run {run.id} has no job yet.")
    job_id = jobs[-1].job_id
    files = run.log_files(job_id, rank)
    if wait and not any(f.is_file() for f in files):
        print(f"Waiting for job {job_id} to start and write its log.", file=sys.stderr, flush=True)
        while not any(f.is_file() for f in files) and run.state() not in TERMINAL_STATES:
            time.sleep(POLL_S)
    if not any(f.is_file() for f in files):
        folder = files[0].parent
        present = sorted(p.name for p in folder.glob("*_log.*")) if folder.is_dir() else []
        raise OrchError(f"No log for rank {rank} of job {job_id} in {folder}. Present: {', '.join(present) or 'none'}.")
    return files


def show_failures(run: Run) -> None:
    """Why the newest job's ranks stopped, as they recorded it, before the log itself."""
    for failure in run.failures(run.jobs[-1].job_id):
        print(f"job {failure.job_id} failed: {failure.describe()}", file=sys.stderr)


def show_logs(run: Run, rank: int, follow: bool, lines: int) -> None:
    """The last `lines` of the log; with `follow`, what the job adds, until the run ends (what its processes write
    after reporting the end included)."""
    files = newest_job_log(run, rank, wait=follow)
    show_failures(run)
    offsets = {}
    for path in files:
        data = path.read_bytes() if path.is_file() else b""
        sys.stdout.write("".join(data.decode(errors="replace").splitlines(keepends=True)[-lines:]))
        offsets[path] = len(data)
    sys.stdout.flush()
    while follow:
        ended = run.state() in TERMINAL_STATES
        if ended:
            wait_for_exit(run, POLL_S)
        for path in files:
            offsets[path] = print_from(path, offsets[path])
        if ended:
            return
        time.sleep(POLL_S)


def print_from(path: Path, offset: int) -> int:
    """Print what the file holds past `offset` (submitit appends, across requeues too); returns the new end."""
    if not path.is_file() or path.stat().st_size <= offset:
        return offset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    sys.stdout.write(chunk.decode(errors="replace"))
    sys.stdout.flush()
    return offset + len(chunk)
