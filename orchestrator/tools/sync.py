"""`orch sync`: the login node's side of tracking. Jobs of profiles with `job_tracking: spool` write only their
run's metrics.jsonl (SQLite's locks are not reliable on a parallel filesystem such as Lustre, and compute nodes may
not reach a server); this process is then the tracking store's single writer."""

from __future__ import annotations

import logging
import time

from jobs.system_metrics import unsent
from jobs.tracking import artifacts, describe, finish_run, send
from orchestrator.core.checkpoints import committed_step
from orchestrator.core.errors import OrchError
from orchestrator.core.rundir import Run, all_runs
from orchestrator.core.runfiles import ROLLED_BACK, DamagedFile, MlflowState, read_model
from orchestrator.tools.evaluate_checkpoint import send_evals

log = logging.getLogger(__name__)
MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}  # the ends a run can have


def sync_run(run: Run) -> int | None:
    """Send the run's metrics through its newest committed checkpoint, its nodes' new system samples (which wait for
    no checkpoint) and its new downstream scores (`orch eval`); returns the step MLflow has everything through (None
    before the first commit). Raises when the store cannot be reached."""
    sent = sync_steps(run)
    send_evals(run)  # after the steps: sending them creates the MLflow run
    return sent


def sync_steps(run: Run) -> int | None:
    """`sync_run`'s training metrics and system samples."""
    through = committed_step(run.checkpoints_dir)
    try:
        known = read_model(run.dir / "mlflow.json", MlflowState)
    except DamagedFile:
        known = None  # send() finds the MLflow run by its tag
    current = known is not None and known.tracking_uri == run.tracking_uri
    steps_due = through is not None and not (current and known.sent_through >= through)
    if not steps_due and not unsent(run.dir, known.system_sent if current else None) and not rolled_back(run, known):
        return known.sent_through if current and through is not None else None
    params, tags = describe(run)
    sent = send(run.dir, run.tracking_uri, through or 0, params, tags)
    return sent if through is not None else None


def rolled_back(run: Run, known: MlflowState | None) -> bool:
    """Whether a rollback dropped spooled steps since the last send, which may be steps MLflow has (`went_back`)."""
    path = run.dir / ROLLED_BACK
    return known is not None and path.is_file() and path.stat().st_size != known.rolled_back_checked


def spooling_runs() -> list[Run]:
    """Runs whose jobs leave the sending to this process (a damaged run is skipped: it breaks no other)."""
    runs = []
    for run in all_runs():
        try:
            if run.profile().job_tracking == "spool":
                runs.append(run)
        except (OrchError, OSError, ValueError) as err:  # DamagedFile, or a profile.yaml its schema refuses
            log.debug("skipping %s: %s", run.dir, err)
    return runs


def follow(interval_s: float, rounds: int | None = None) -> None:
    """Every `interval_s`, send what each spooling run has committed; once a run has ended, mark its MLflow run's
    status and upload its files (again after a resume: a new job is a new end). `rounds` bounds the loop (None:
    until interrupted)."""
    finished: set[tuple[str, str]] = set()  # (run, its newest job)
    done = 0
    while rounds is None or done < rounds:
        for run in spooling_runs():
            try:
                ended = (run.id, run.jobs[-1].job_id) if run.jobs else None
                if ended in finished:
                    send_evals(run)  # an evaluation after the run's end still reaches MLflow
                    continue
                sync_run(run)
                state = run.state()
                if ended and state in MLFLOW_STATUS:
                    finish_run(run.dir, run.tracking_uri, MLFLOW_STATUS[state], artifacts(run, ended[1], logs=True))
                    finished.add(ended)
            except Exception as err:  # noqa: BLE001 - a store outage or one damaged run must not stop the others
                log.warning("run %s: metrics stay spooled (%s)", run.id, err)
        done += 1
        if rounds is None or done < rounds:
            time.sleep(interval_s)
