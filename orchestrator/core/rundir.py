"""The typed run directory: the single source of truth for a run, read by every command through `Run`.

Which file holds what, and its one writer, is in the README ("Where things live"). Every JSON and YAML file is
replaced atomically (`orchestrator.core.files`), so a reader never sees half a file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.core.checkpoints import incomplete_dirs
from orchestrator.core.errors import OrchError, machine_fault
from orchestrator.core.eta import eta_s
from orchestrator.core.files import copy_tree, write_atomic, write_json_atomic
from orchestrator.core.project import PROJECT_ROOT
from orchestrator.core.runfiles import (
    Attempt,
    DamagedFile,
    Failure,
    FolderManifest,
    Hang,
    JobRecord,
    MlflowState,
    Progress,
    RankBeat,
    Recovery,
    RunInfo,
    read_model,
)
from orchestrator.core.schedulers import foreign_owner, job_alive
from orchestrator.core.schedulers.base import Job, foreign, log_files
from orchestrator.core.settings import embedded_store, runs_root

if TYPE_CHECKING:  # `orch status` reads no profile or recipe of a run: the schemas and YAML stay unimported
    from orchestrator.core.config import Profile, Recipe, WatchdogSpec

# unsubmitted: its creation stopped before a job was queued (a killed `orch submit`); `orch resume` submits it
TERMINAL_STATES = ("completed", "failed", "cancelled", "preempted", "damaged", "unsubmitted")
# What rank 0's beat phase (jobs/watchdog.py) means to someone following the run; other phases are its start-up.
BEAT_PHASES = {
    "load": "loading checkpoint",
    "data": "training",
    "forward_backward": "training",
    "optimizer": "training",
    "sync": "training",
    "eval": "validating",
    "save": "saving checkpoint",
}
RUN_FILES = ("run.json", "profile.yaml", "recipe.yaml")  # what every run directory holds from its creation
CODE_FOLDERS = ("orchestrator", "jobs", "envs")  # what a job imports or sources
CODE_MANIFEST = "manifest.json"  # in code/: its every file, with size and SHA-256, written when it is frozen
LOCK = ".orch.lock"
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # safe as a folder, a job name and an MLflow run name


def new_run_id(recipe: str) -> str:
    """The recipe's name (characters that are unsafe in a folder or a job name become '-'), time and a nonce."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", recipe).strip(".-")[:80] or "run"
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Run:
    """A handle on one run directory; every file is read through its model (`orchestrator.core.runfiles`)."""

    dir: Path

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def info(self) -> RunInfo:
        info = read_model(self.dir / "run.json", RunInfo)
        if info is None:
            raise DamagedFile(self.dir / "run.json", "missing")
        return info

    @property
    def jobs(self) -> list[JobRecord]:
        return read_model(self.dir / "jobs.json", list[JobRecord], [])

    @property
    def progress(self) -> Progress | None:
        return read_model(self.dir / "progress.json", Progress)

    @property
    def attempts(self) -> list[Attempt]:
        return read_model(self.dir / "attempts.json", list[Attempt], [])

    def write_progress(self, progress: Progress, durable: bool = True) -> None:
        """The job's heartbeat (rank 0); `durable` false for the running beats, which the next one replaces."""
        write_json_atomic(self.dir / "progress.json", progress.model_dump(), durable)

    def write_attempts(self, attempts: list[Attempt]) -> None:
        write_json_atomic(self.dir / "attempts.json", [attempt.model_dump() for attempt in attempts])

    @property
    def code_dir(self) -> Path:
        """The project's code as submitted: the job runs from here, so a requeue runs what was submitted."""
        return self.dir / "code"

    def freeze_code(self) -> None:
        """Copy the job's code (CODE_FOLDERS of the checkout) into the run with its manifest, swapping the whole
        folder in at once."""
        staging, old = self.dir / ".code.partial", self.dir / ".code.old"
        for leftover in (staging, old):
            shutil.rmtree(leftover, ignore_errors=True)
        for folder in CODE_FOLDERS:
            copy_tree(PROJECT_ROOT / folder, staging / folder, ignore=shutil.ignore_patterns("__pycache__"))
        manifest = FolderManifest(files=FolderManifest.listing(staging, CODE_MANIFEST))
        write_json_atomic(staging / CODE_MANIFEST, manifest.model_dump())
        if self.code_dir.exists():
            self.code_dir.rename(old)
        staging.rename(self.code_dir)
        shutil.rmtree(old, ignore_errors=True)

    def code_damage(self) -> str | None:
        """One paragraph on the first file of the frozen code that its manifest says is missing or changed; None when
        all match, or for code frozen before orch wrote manifests. Python takes a module missing from code/ from
        any checkout it finds (an editable install's), so damaged code would silently run other code."""
        try:
            manifest = read_model(self.code_dir / CODE_MANIFEST, FolderManifest)
            problem = manifest and manifest.mismatch(self.code_dir)
        except DamagedFile as damage:
            problem = f"{CODE_MANIFEST} is damaged: {damage.why}"
        if not problem:
            return None
        try:
            commit = self.info.git_commit or "run.json names none"
        except DamagedFile:
            commit = "run.json is damaged"
        return (
            f"the run's frozen code is damaged: code/{problem} ({self.code_dir} holds the code the run was "
            f"submitted with; {CODE_MANIFEST} lists its every file). Python would take a missing module from another "
            f"checkout, so nothing is trained with it. Restore the file from the commit the run was submitted at "
            f"({commit}), or run the checkout's code from now on with `orch resume {self.id} --update-code`."
        )

    @property
    def mlflow(self) -> MlflowState | None:
        return read_model(self.dir / "mlflow.json", MlflowState)

    @property
    def tracking_uri(self) -> str:
        """The store the run reports to: the one named at submission, else the embedded store of the ORCH_HOME the
        run lives in now (a run directory moved to another ORCH_HOME reports there)."""
        return self.info.tracking_uri or embedded_store(self.dir.parent.parent)

    def profile(self) -> Profile:
        """The resolved profile the run's jobs use."""
        from orchestrator.core.config import Profile
        from orchestrator.core.loading import validate
        from orchestrator.core.yamlio import read_yaml

        return validate(self.dir / "profile.yaml", Profile, read_yaml(self.dir / "profile.yaml"))

    def recipe(self) -> Recipe:
        """The resolved recipe the run trains."""
        from orchestrator.core.config import Recipe
        from orchestrator.core.loading import validate
        from orchestrator.core.yamlio import read_yaml

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

    def log_files(self, job_id: str, rank: int) -> list[Path]:
        """A rank's stdout and stderr of a job (appended to across the job's requeues)."""
        return log_files(self.submitit_dir, job_id, rank)

    def job(self, record: JobRecord) -> Job:
        """A job of jobs.json as its scheduler is asked about it: this run's while it keeps its files in this run's
        `submitit/` (a copy of the run directory names the original's jobs, which are not the copy's)."""
        return Job(record.executor, record.job_id, record.submitted, self.submitit_dir)

    @property
    def errors_dir(self) -> Path:
        """One file per rank that stopped on an error: `<job id>.rank<N>.json`, written by that rank."""
        return self.dir / "errors"

    @property
    def ranks_dir(self) -> Path:
        """`<job id>.rank<N>.json`: what each rank of a job is doing, rewritten every second by its watchdog."""
        return self.dir / "ranks"

    @property
    def hangs_dir(self) -> Path:
        """`<job id>.<time>.json`: each time a job's watchdog stopped it, every rank's last beat (docs/watchdog.md)."""
        return self.dir / "hangs"

    def rank_beat(self, job_id: str, rank: int) -> RankBeat | None:
        return read_model(self.ranks_dir / f"{job_id}.rank{rank}.json", RankBeat)

    def failures(self, job_id: str) -> list[Failure]:
        """Why the ranks of a job stopped: the causes first, then ranks that only stopped because another failed
        (PeerFailed), each group earliest first; unreadable reports are left out."""
        found = []
        for path in sorted(files_named(self.errors_dir, f"{job_id}.rank", ".json")):
            try:
                found.append(read_model(path, Failure))
            except DamagedFile:
                continue
        return sorted((f for f in found if f is not None), key=lambda f: (f.type == "PeerFailed", f.time))

    def record_failure(
        self, job_id: str, rank: int, step: int | None, err: BaseException, decided: str | None = None
    ) -> None:
        """errors/<job>.rank<N>.json: why this rank stopped, for `orch status` and `--wait`. A machine fault (a full
        disk) says where and what to do. Where the disk is too full for this file, the unfinished saves make room;
        where even then it cannot be written, the job's log still has it."""
        fault = machine_fault(err)
        message = f"{fault} Then `orch resume {self.id}` continues from the last checkpoint" if fault else str(err)
        failure = Failure(
            job_id=job_id, rank=rank, host=socket.gethostname(), step=step, type=type(err).__name__,
            message=(message + (f"; {decided}" if decided else ""))[:2000], time=time.time(),
        )  # fmt: skip
        path = self.errors_dir / f"{job_id}.rank{rank}.json"
        try:
            write_json_atomic(path, failure.model_dump())
            return
        except OSError as full:
            if not machine_fault(full):
                logging.getLogger(__name__).error("could not record the failure in %s: %s", path, full)
                return
        for unfinished in incomplete_dirs(self.checkpoints_dir):  # a save in flight on a full disk fails anyway
            shutil.rmtree(unfinished, ignore_errors=True)
        try:
            write_json_atomic(path, failure.model_dump())
        except OSError as write_error:
            logging.getLogger(__name__).error("could not record the failure in %s: %s", path, write_error)

    def suspect_hosts(self, exclude_after: int, also_failed: tuple[str, ...] = ()) -> list[str]:
        """Hosts to keep out of the run's next job: where `exclude_after` crashed tries of any of its jobs ran (with
        `also_failed`, a failure not recorded yet), and where its watchdog found a rank stuck."""
        failed = list(also_failed)
        for path in self.errors_dir.glob("*.recovery.json"):
            with suppress(DamagedFile):
                if (decision := read_model(path, Recovery)) is not None:
                    failed.append(decision.host)
        stuck = set()
        for path in self.hangs_dir.glob("*.json"):
            with suppress(DamagedFile):
                if (hang := read_model(path, Hang)) is not None:
                    stuck |= {beat.host for beat in hang.ranks if beat.rank in hang.stuck}
        return sorted({host for host in failed if failed.count(host) >= exclude_after} | stuck)

    def add_job(self, job_id: str, executor: str) -> None:
        job = JobRecord(job_id=job_id, executor=executor, submitted=time.time())
        self._write_jobs([*self.jobs, job])

    def mark_cancelled(self) -> None:
        jobs = self.jobs
        jobs[-1].cancelled = True
        self._write_jobs(jobs)

    def _write_jobs(self, jobs: list[JobRecord]) -> None:
        write_json_atomic(self.dir / "jobs.json", [job.model_dump() for job in jobs])

    def state(self, alive: bool | None = None) -> str:
        """queued, running, stalled, completed, failed, cancelled, preempted or unsubmitted (no job, and no submission
        holding the lock), from the newest job's report and the scheduler (`alive`: the scheduler's answer, when the
        caller asked it for many runs at once)."""
        return self.state_of(self.jobs, self.progress, alive)

    def state_of(self, jobs: list[JobRecord], report: Progress | None, alive: bool | None) -> str:
        """`state` from jobs.json and progress.json as already read (`orch status` reads each file of a run once)."""
        if not jobs and report is not None:
            raise DamagedFile(self.dir / "jobs.json", "missing, though a job has reported (progress.json)")
        if not jobs:
            return "queued" if self.locked() else "unsubmitted"
        job = jobs[-1]
        reported = report.state if report and report.job_id == job.job_id else None
        if reported == "completed":
            return reported
        alive = job_alive(self.job(job)) if alive is None else alive
        if job.cancelled and not alive:
            return "cancelled"
        if reported == "preempted" and not alive:  # saved; where the scheduler requeues it, it is alive (queued)
            return "preempted"
        if reported == "failed" or not alive:
            return "failed"
        if reported == "running":
            return "stalled" if self.stall(report) else "running"
        return "queued"

    def stall(self, report: Progress) -> tuple[float, float] | None:
        """How long a running job has gone without a heartbeat and the bound that passed; None within the bound.
        The bound is the watchdog's (the profile's `watchdog`, docs/watchdog.md) for the step time the job recorded,
        or its first_step_s before the job recorded one. Rank 0's own beat says when it is in a longer phase within
        that phase's bound (an evaluation, a save, a checkpoint load), which progress.json does not show."""
        spec, now = self.watchdog(), time.time()
        step_time = report.step_time_s
        bound = spec.first_step_s if step_time is None else max(spec.min_step_s, spec.step_factor * step_time)
        if now - report.updated <= bound:
            return None
        try:
            rank0 = self.rank_beat(report.job_id, 0)
        except DamagedFile:
            rank0 = None
        if rank0 is not None and not rank0.silent(now) and now <= rank0.deadline:
            return None
        return now - report.updated, bound

    def phase(self, state: str) -> str:
        """What a queued or running run is doing, for the progress display: queued, requeued (its job waits to start
        again), starting, loading checkpoint, compiling (the first step of a start, where the recipe compiles),
        training, validating or saving checkpoint. Read from the newest job's log files and attempts, rank 0's beat
        and the heartbeat; any other state is its own phase."""
        jobs = self.jobs
        if state not in ("queued", "running") or not jobs:
            return state
        job_id = jobs[-1].job_id
        attempt = next((a for a in reversed(self.attempts) if a.job_id == job_id), None)
        if attempt is None:  # the scheduler creates the log when the job starts; the job records its start later
            return "starting" if any(path.exists() for path in self.log_files(job_id, 0)) else "queued"
        if attempt.ended is not None:
            return "requeued"
        try:
            beat = self.rank_beat(job_id, 0)
        except DamagedFile:
            beat = None
        report, beat_step = self.progress, beat.step if beat else 0
        if report and report.updated >= attempt.started and report.step > max(attempt.start_step, beat_step):
            return "training"  # a step finished since rank 0's beat was written (a node beats every few seconds)
        if beat is None or beat.phase not in BEAT_PHASES or (beat.phase == "load" and not attempt.start_step):
            return "starting"  # joining the process group, building the model; or no checkpoint to load
        phase = BEAT_PHASES[beat.phase]
        if phase == "training" and beat.step == attempt.start_step and self.recipe().train.compile is True:
            return "compiling"  # torch.compile runs in the first step
        return phase

    def watchdog(self) -> WatchdogSpec:
        """The run's watchdog bounds; the defaults where profile.yaml cannot be read (its own error is reported
        where the profile is used)."""
        from orchestrator.core.config import WatchdogSpec

        try:
            return self.profile().watchdog
        except OrchError:
            return WatchdogSpec()

    def locked(self) -> bool:
        """Whether a process holds the run's lock, as `orch submit` does from the run's creation until its job is
        recorded; read-only, so a teammate who may only read the run can ask."""
        try:
            fd = os.open(self.dir / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Serialises the orchestrator's decisions about one run (two `orch resume` at once start one job).
        The lock file is opened without following a symbolic link planted in its place, and created with the mode
        the umask gives it: the project group's other members lock it too."""
        path = self.dir / LOCK
        try:  # O_NONBLOCK: a FIFO planted in its place fails here instead of waiting for a writer
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise OrchError(
                f"{path}: cannot be opened as the run's lock ({err.strerror}). It must be a plain file that your user "
                "can write: check the folder's permissions and free space; where it is a link or another kind of "
                "file, move it aside (orch creates it again)."
            ) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OrchError(f"{path}: not a plain file, so it cannot be the run's lock; move it aside.")
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def summary(
        self,
        alive: bool | None = None,
        read: tuple[list[JobRecord], Progress | None] | None = None,
        info: RunInfo | None = None,
    ) -> dict[str, Any]:
        """What `orch status` shows; a damaged run file gives state "damaged" with the file and why. `read`: jobs.json
        and progress.json, and `info`: run.json, where the caller has read them already (`orch status` reads each
        file of a run once)."""
        try:
            return self._summary(alive, read or (self.jobs, self.progress), info)
        except DamagedFile as damage:
            return {**empty_summary(self), "state": "damaged", "error": str(damage)}

    def _summary(
        self, alive: bool | None, read: tuple[list[JobRecord], Progress | None], known: RunInfo | None
    ) -> dict[str, Any]:
        (jobs, progress), info, attempts = read, known or self.info, self.attempts
        state = self.state_of(jobs, progress, alive)
        step = progress.step if progress else 0
        step_time = progress.step_time_s if progress else None
        mlflow = self.mlflow
        error = None
        if state in ("failed", "running", "stalled", "queued") and jobs:  # the first rank to fail names the cause
            failures = self.failures(jobs[-1].job_id)
            error = failures[0].describe() if failures else None
        if state == "stalled" and progress and (stall := self.stall(progress)):
            error = error or f"no step finished for {stall[0]:.0f} s, beyond the bound of {stall[1]:.0f} s"
        if state == "failed" and alive is None and (owner := foreign_owner(self.job(jobs[-1]))):
            error = foreign(self.job(jobs[-1]), owner)  # a copy of a run directory whose job trains the original
        error = error or (progress.error if progress else None) or why_stopped(self, state, progress)
        return {
            **empty_summary(self),
            "state": state,
            "step": step,
            "steps": info.steps,
            "loss": progress.loss if progress else None,
            "val_loss": progress.val_loss if progress else None,
            "val_step": progress.val_step if progress else None,
            "tokens_per_s": progress.tokens_per_s if progress else None,
            "eta_s": eta_s(step, info.steps, step_time) if state == "running" else None,
            "last_checkpoint_step": progress.last_checkpoint_step if progress else None,
            "mlflow_run_id": (mlflow.run_id if mlflow else None) or (progress.mlflow_run_id if progress else None),
            "job_ids": [job.job_id for job in jobs],
            "allocations": len(attempts),
            "node_hours": node_hours(attempts, progress, state, jobs[-1].job_id if jobs else None),
            "profile": info.profile,
            "recipe": info.recipe,
            "sweep": info.sweep,
            "created": info.created,
            "error": error,
        }


def why_stopped(run: Run, state: str, progress: Progress | None) -> str | None:
    """What a run that stopped without a report of its own is: one whose submission never queued a job, or one whose
    job asked to be queued again after its requeues ran out."""
    if state == "unsubmitted":
        return (
            f"its submission stopped before a job was queued (`orch submit` was killed): `orch resume {run.id}` "
            f"submits it, or delete {run.dir}"
        )
    if state != "failed" or not progress or progress.state != "requeued":
        return None
    kept = f"the checkpoint at step {progress.last_checkpoint_step}" if progress.last_checkpoint_step else "it"
    return (
        f"its job asked to be queued again after the last of the requeues its plan allows. `orch resume {run.id}` "
        f"continues from {kept}."
    )


def empty_summary(run: Run) -> dict[str, Any]:
    keys = (
        "step", "steps", "loss", "val_loss", "val_step", "tokens_per_s", "eta_s", "last_checkpoint_step",
        "mlflow_run_id", "profile",
    )  # fmt: skip
    return {
        "run_id": run.id,
        "state": "queued",
        **dict.fromkeys(keys),
        "recipe": None,
        "sweep": None,
        "created": None,
        "job_ids": [],
        "allocations": 0,
        "node_hours": 0.0,
        "run_dir": str(run.dir),
        "error": None,
    }


def node_hours(attempts: list[Attempt], progress: Progress | None, state: str, newest_job: str | None) -> float:
    """Nodes × wall hours of every allocation so far, from its start to the next one's (or the last beat, or now while
    it runs); a job that stopped by itself before another job (`newest_job` while it waits in the queue) ends at its
    stop: a completed run resumed days later was not allocated meanwhile."""
    if not attempts:
        return 0.0
    ends = [
        b.started if b.job_id == a.job_id or a.stopped is None else a.stopped
        for a, b in zip(attempts, attempts[1:], strict=False)
    ]
    still_open = state in ("running", "stalled", "queued") and attempts[-1].job_id == newest_job
    ends.append(time.time() if still_open or not progress else progress.updated)
    return sum(a.nodes * max(0.0, end - a.started) / 3600 for a, end in zip(attempts, ends, strict=True))


def create_run(
    run_id: str, info: dict[str, Any], profile_yaml: str, recipe_yaml: str, location: Path | None = None
) -> Run:
    """A new run directory. When the profile keeps runs elsewhere (`paths.runs`, a cluster filesystem), the run lives
    there and ORCH_HOME's runs folder links to it, unless the two are one folder. If any of it fails, nothing of the
    new run is left behind."""
    entry = runs_root() / run_id
    home = entry.parent.resolve() if entry.parent.exists() else entry.parent
    target = entry if location is None or location.resolve() == home else location.resolve() / run_id
    made: list[Path] = []
    try:
        make_folder(target, made)
        if target != entry:
            entry.parent.mkdir(parents=True, exist_ok=True)
            entry.symlink_to(target, target_is_directory=True)
            made.append(entry)
        run = Run(entry)
        write_atomic(run.dir / "profile.yaml", profile_yaml)
        write_atomic(run.dir / "recipe.yaml", recipe_yaml)
        write_json_atomic(run.dir / "run.json", {"run_id": run_id, "created": time.time(), **info})
    except BaseException as err:
        for path in reversed(made):
            if path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
        if isinstance(err, FileExistsError) and err.filename in (str(target), str(entry)):
            raise OrchError(f"A run {run_id} already exists ({err.filename}). Allowed: a new run id.") from None
        if isinstance(err, OSError):
            where = "the profile's paths.runs" if target != entry else "ORCH_HOME's runs folder"
            raise OrchError(
                f"Cannot create run {run_id} in {target.parent} ({where}): {err.strerror}. Allowed: a folder you can "
                "write to; set the profile's paths.runs or ORCH_HOME to one."
            ) from None
        raise
    return run


def make_folder(path: Path, made: list[Path]) -> None:
    """`mkdir -p` that records in `made` the topmost folder it created, so that a failure can take it away again."""
    missing = next((p for p in reversed([path, *path.parents]) if not p.exists()), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()
    made.append(missing)


def remove_run(run: Run) -> None:
    """Delete a run that never got a job (its submission failed), wherever the profile kept it."""
    target = run.dir.resolve()
    if run.dir.is_symlink():
        run.dir.unlink()
    shutil.rmtree(target, ignore_errors=True)


def all_runs() -> list[Run]:
    """Every run in the store, oldest first; a run whose run.json is damaged or gone sorts first and is still listed."""
    return [run for run, _ in listed_runs()]


def listed_runs() -> list[tuple[Run, RunInfo | None]]:
    """`all_runs`, each with its run.json as read to order it (None where it is damaged or gone): `orch status`
    shows what it holds without reading it again."""
    listed = [entry for folder in run_folders() if (entry := listed_run(folder)) is not None]
    return sorted(listed, key=lambda entry: entry[1].created if entry[1] else 0.0)


def run_folders() -> list[Path]:
    """The folders of the runs folder that are named as runs can be, in the order the file system lists them."""
    root = runs_root()
    if not root.is_dir():
        return []
    return [folder for folder in root.iterdir() if RUN_ID.match(folder.name)]


def listed_run(folder: Path) -> tuple[Run, RunInfo | None] | None:
    """The run in `folder` with its run.json as read (None where damaged or gone); None where the folder is not a run
    directory. A folder whose run.json reads is one without asking."""
    try:
        info = read_model(folder / "run.json", RunInfo)
    except DamagedFile:
        info = None
    return (Run(folder), info) if info is not None or is_run_dir(folder) else None


def files_named(folder: Path, prefix: str, suffix: str) -> list[Path]:
    """The files of `folder` whose names start and end so (none where the folder is absent): a glob compiles its
    pattern each time, which over a thousand runs' job ids is most of `orch status`."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [folder / name for name in names if name.startswith(prefix) and name.endswith(suffix)]


def is_run_dir(path: Path) -> bool:
    """A folder that create_run made: it holds one of the files written first (not, say, a profile's `paths.runs`
    kept inside ORCH_HOME's runs folder)."""
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def get_run(run_id: str) -> Run:
    run = Run(runs_root() / run_id)
    if not RUN_ID.match(run_id) or not run.dir.is_dir():
        known = [r.id for r in all_runs()][-5:]
        hint = f" Recent runs: {', '.join(known)}." if known else " There are no runs yet."
        raise OrchError(f"No run '{run_id}' in {runs_root()}.{hint}")
    return run
