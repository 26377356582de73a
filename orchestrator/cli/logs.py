"""`orch logs`: a rank's log of the run's newest job, optionally followed as it grows."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from orchestrator.core.errors import OrchError
from orchestrator.core.rundir import Run


def log_files(run: Run, rank: int) -> list[Path]:
    jobs = run.jobs
    if not jobs:
        raise OrchError(f"Run {run.id} has no job yet.")
    job_id = jobs[-1].job_id
    folder = run.submitit_dir / job_id
    files = [folder / f"{job_id}_{rank}_log.{kind}" for kind in ("out", "err")]
    if not any(f.is_file() for f in files):
        present = sorted(p.name for p in folder.glob("*_log.*")) if folder.is_dir() else []
        raise OrchError(f"No log for rank {rank} of job {job_id} in {folder}. Present: {', '.join(present) or 'none'}.")
    return files


def show_failures(run: Run) -> None:
    """Why the newest job's ranks stopped, as they recorded it, before the log itself."""
    for failure in run.failures(run.jobs[-1].job_id):
        print(f"job {failure.job_id} failed: {failure.describe()}", file=sys.stderr)


def show_logs(run: Run, rank: int, follow: bool, lines: int) -> None:
    files = log_files(run, rank)
    show_failures(run)
    offsets = {}
    for path in files:
        text = path.read_text(errors="replace") if path.is_file() else ""
        sys.stdout.write("".join(text.splitlines(keepends=True)[-lines:]))
        offsets[path] = len(text.encode())
    while follow:
        time.sleep(1)
        for path in files:
            if path.is_file() and path.stat().st_size > offsets[path]:
                with path.open("rb") as f:
                    f.seek(offsets[path])
                    chunk = f.read()
                offsets[path] += len(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
