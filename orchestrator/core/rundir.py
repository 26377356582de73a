"""The typed run directory: the single source of truth for a run, read by every command through `Run`.

Which file holds what, and its one writer, is in the README ("Where things live"). Every JSON and YAML file is
replaced atomically (`orchestrator.core.files`), so a reader never sees half a file.
"""

from __future__ import annotations

import fcntl
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.config import Profile, Recipe, read_yaml, validate
from orchestrator.core.errors import OrchError
from orchestrator.core.files import read_json, write_atomic, write_json_atomic
from orchestrator.core.scheduler import job_alive
from orchestrator.core.settings import runs_root

TERMINAL_STATES = ("completed", "failed", "cancelled")


def new_run_id(recipe: str) -> str:
    return f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Run:
    """A handle on one run directory."""

    dir: Path

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def info(self) -> dict[str, Any]:
        return read_json(self.dir / "run.json", {})

    @property
    def jobs(self) -> list[dict[str, Any]]:
        return read_json(self.dir / "jobs.json", [])

    @property
    def progress(self) -> dict[str, Any]:
        return read_json(self.dir / "progress.json", {})

    def profile(self) -> Profile:
        """The resolved profile the run's jobs use."""
        return validate(self.dir / "profile.yaml", Profile, read_yaml(self.dir / "profile.yaml"))

    def recipe(self) -> Recipe:
        """The resolved recipe the run trains."""
        return validate(self.dir / "recipe.yaml", Recipe, read_yaml(self.dir / "recipe.yaml"))

    @property
    def data_dir(self) -> Path:
        """tokens.json (which prepared shards the run reads) and the tokenizer; the demo corpus's shards."""
        return self.dir / "data"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def submitit_dir(self) -> Path:
        return self.dir / "submitit"

    def add_job(self, job_id: str, executor: str) -> None:
        jobs = self.jobs + [{"job_id": job_id, "executor": executor, "submitted": time.time()}]
        write_json_atomic(self.dir / "jobs.json", jobs)

    def state(self, alive: bool | None = None) -> str:
        """queued, running, completed, failed or cancelled, from the newest job's report and the scheduler
        (`alive`: the scheduler's answer, when the caller asked it for many runs at once)."""
        jobs = self.jobs
        if not jobs:
            return "queued"
        job, report = jobs[-1], self.progress
        reported = report.get("state") if report.get("job_id") == job["job_id"] else None
        if reported == "completed":
            return reported
        alive = job_alive(job) if alive is None else alive
        if job.get("cancelled") and not alive:
            return "cancelled"
        if reported == "failed" or not alive:
            return "failed"
        return "running" if reported == "running" else "queued"

    def mark_cancelled(self) -> None:
        jobs = self.jobs
        jobs[-1]["cancelled"] = True
        write_json_atomic(self.dir / "jobs.json", jobs)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Serialises the orchestrator's decisions about one run (two `orch resume` at once start one job)."""
        with (self.dir / ".orch.lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def summary(self, alive: bool | None = None) -> dict[str, Any]:
        info, progress, jobs = self.info, self.progress, self.jobs
        attempts = read_json(self.dir / "attempts.json", [])
        state = self.state(alive)
        step, steps = progress.get("step", 0), info.get("steps")
        step_time = progress.get("step_time_s")
        return {
            "run_id": self.id,
            "state": state,
            "step": step,
            "steps": steps,
            "loss": progress.get("loss"),
            "tokens_per_s": progress.get("tokens_per_s"),
            "eta_s": (steps - step) * step_time if state == "running" and step_time and steps else None,
            "last_checkpoint_step": progress.get("last_checkpoint_step"),
            "mlflow_run_id": read_json(self.dir / "mlflow.json", {}).get("run_id") or progress.get("mlflow_run_id"),
            "job_ids": [job["job_id"] for job in jobs],
            "allocations": len(attempts),
            "node_hours": node_hours(attempts, progress, state),
            "run_dir": str(self.dir),
            "profile": info.get("profile"),
            "recipe": info.get("recipe"),
            "created": info.get("created"),
            "error": progress.get("error"),
        }


def node_hours(attempts: list[dict[str, Any]], progress: dict[str, Any], state: str) -> float:
    """Nodes × wall hours of every allocation so far, from its start to the next one's (or the last beat)."""
    if not attempts:
        return 0.0
    ends = [a["started"] for a in attempts[1:]]
    ends.append(time.time() if state in ("running", "queued") else progress.get("updated", time.time()))
    return sum(a.get("nodes", 1) * max(0.0, end - a["started"]) / 3600 for a, end in zip(attempts, ends, strict=True))


def create_run(
    run_id: str, info: dict[str, Any], profile_yaml: str, recipe_yaml: str, location: Path | None = None
) -> Run:
    """A new run directory; when the profile keeps runs elsewhere (a cluster filesystem), ORCH_HOME links to it."""
    entry = runs_root() / run_id
    if location is None:
        entry.mkdir(parents=True, exist_ok=False)
    else:
        (location / run_id).mkdir(parents=True, exist_ok=False)
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(location / run_id, target_is_directory=True)
    run = Run(entry)
    write_atomic(run.dir / "profile.yaml", profile_yaml)
    write_atomic(run.dir / "recipe.yaml", recipe_yaml)
    write_json_atomic(run.dir / "run.json", {"run_id": run_id, "created": time.time(), **info})
    return run


def all_runs() -> list[Run]:
    root = runs_root()
    if not root.is_dir():
        return []
    runs = [Run(d) for d in root.iterdir() if (d / "run.json").is_file()]
    return sorted(runs, key=lambda r: r.info.get("created", 0))


def get_run(run_id: str) -> Run:
    run = Run(runs_root() / run_id)
    if not (run.dir / "run.json").is_file():
        known = [r.id for r in all_runs()][-5:]
        hint = f" Recent runs: {', '.join(known)}." if known else " There are no runs yet."
        raise OrchError(f"No run '{run_id}' in {runs_root()}.{hint}")
    return run
