"""Automatic, bounded recovery after a crash: the job requeues itself instead of waiting for a human.

When training raises on a rank, the first rank to fail decides for the job, once per attempt, and writes the
decision to `errors/<job>.attempt<N>.recovery.json` (created by a hard link, so two ranks can never both decide):

- retried: the job is requeued from its last committed checkpoint (jobs.watchdog.requeue: the LocalExecutor's
  requeue code after the other ranks are ended, or `scontrol requeue`), up to the profile's `recovery.retries` per job;
- not retried, with the reason: a user error (OrchError: a bad recipe, damaged data), a full disk or quota or a
  read-only or forbidden folder (`orchestrator.core.errors.machine_fault`), the same error at the same
  step as an earlier attempt of the job (deterministic: a requeue would fail again), or the budget spent.

A failure after the watchdog requeued the job for a hang (jobs.watchdog) decides nothing: it is the hang's aftermath.

Hosts where `recovery.exclude_after` tries failed (and hosts the watchdog found stuck) are kept out of the next
try: in the requeued job where Slurm accepts the change of a queued job's exclusions, and in every job `orch resume`
queues (`--exclude`, from the same records: orchestrator.core.rundir.Run.suspect_hosts).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import NoReturn

from jobs import watchdog
from jobs.preemption import process_started
from orchestrator.core.config import Profile
from orchestrator.core.errors import OrchError, machine_fault
from orchestrator.core.files import create_unique, naming
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import DamagedFile, Recovery, read_model
from orchestrator.core.schedulers import scheduler_of

log = logging.getLogger("orch.recovery")
DECIDED_WAIT_S = 5.0  # how long a rank that failed second waits for the first one's decision to appear


def signature(err: BaseException) -> str:
    """What makes two failures the same: the exception's type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def decide(run: Run, profile: Profile, job_id: str, rank: int, step: int | None, err: BaseException) -> Recovery:
    """This attempt's decision: made here by the first rank to fail, else the one that rank recorded. A failure after
    the watchdog found the job hung and requeued it (the rank that requeued it left, and the collective this one was
    in broke) is that hang's aftermath, not a crash: this rank leaves at once, deciding nothing."""
    if (hang := watchdog.reported(run.dir, job_id, process_started())) is not None:
        log.error("%s after rank %d found the job hung and requeued it: leaving", signature(err), hang.detected_by)
        watchdog.exit_now(1)
    attempts = [a for a in run.attempts if a.job_id == job_id]
    attempt = max(len(attempts), 1)
    path = run.errors_dir / f"{job_id}.attempt{attempt}.recovery.json"
    earlier = [r for r in job_recoveries(run, job_id) if r.attempt < attempt]
    host = socket.gethostname()
    retried, reason = judge(profile, step, signature(err), earlier, err)
    keeps_off = scheduler_of(profile.executor).excludes_hosts
    excluded = run.suspect_hosts(profile.recovery.exclude_after, also_failed=(host,)) if keeps_off else []
    decision = Recovery(
        job_id=job_id, attempt=attempt, rank=rank, host=host, step=step, error=signature(err), retried=retried,
        reason=reason, excluded_hosts=excluded, time=time.time(),
    )  # fmt: skip
    try:
        claimed = claim(path, decision)
    except OSError as full:  # a full disk: no retry that the other ranks cannot learn of
        log.error("could not record the decision in %s: %s", path, full)
        unrecorded = f"not retried: the decision could not be recorded ({full.strerror})"
        return decision.model_copy(update={"retried": False, "reason": reason if not retried else unrecorded})
    if claimed:
        log.error("attempt %d of job %s failed at step %s (%s): %s", attempt, job_id, step, decision.error, reason)
        return decision
    return recorded(path) or decision.model_copy(update={"retried": False, "reason": "decided by another rank"})


def judge(
    profile: Profile, step: int | None, error: str, earlier: list[Recovery], err: BaseException
) -> tuple[bool, str]:
    if profile.recovery.retries == 0:
        return False, "not retried: automatic recovery is off (recovery.retries: 0)"
    if isinstance(err, OrchError):
        return False, "not retried: the run's input is at fault, and a requeue would fail the same way"
    if machine_fault(err):
        return False, "not retried: the filesystem refused the write, and a requeue would fail the same way"
    if any(r.step == step and r.error == error for r in earlier):
        return False, f"not retried: the same error at step {step} as an earlier attempt (deterministic)"
    if len(earlier) >= profile.recovery.retries:
        return False, f"not retried: the {profile.recovery.retries} automatic requeues of this job are spent"
    return True, f"requeued from the last checkpoint (automatic retry {len(earlier) + 1} of {profile.recovery.retries})"


def claim(path: os.PathLike[str], decision: Recovery) -> bool:
    """Write the decision where none exists yet: a complete file appears at once, or not at all."""
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_unique(folder, "tmp", ".partial")
    try:
        with naming(Path(path)), os.fdopen(fd, "w") as f:
            f.write(decision.model_dump_json())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def recorded(path: os.PathLike[str]) -> Recovery | None:
    until = time.time() + DECIDED_WAIT_S
    while time.time() < until:
        try:
            return read_model(path, Recovery)
        except DamagedFile:
            time.sleep(0.1)
    return None


def job_recoveries(run: Run, job_id: str) -> list[Recovery]:
    found = []
    for path in sorted(run.errors_dir.glob(f"{job_id}.attempt*.recovery.json")):
        try:
            if (decision := read_model(path, Recovery)) is not None:
                found.append(decision)
        except DamagedFile as damage:
            log.warning("%s", damage)
    return found


def requeue(run: Run, profile: Profile, job_id: str, rank: int, decision: Recovery) -> NoReturn:
    """End this job and queue it again (module docstring)."""
    if decision.excluded_hosts:
        scheduler_of(profile.executor).keep_off(job_id, decision.excluded_hosts)
    peers = []
    for other in range(profile.world_size):
        if other != rank:
            try:
                beat = run.rank_beat(job_id, other)
            except DamagedFile:
                beat = None
            peers += [beat] if beat else []
    watchdog.requeue(profile.executor, job_id, peers)
