"""`orch rollback`: take a run back to one of its committed checkpoints, skip the data of chosen steps after it, and
resume (docs/rollback.md). The recipe's `spike_guard` does the same by itself when the loss spikes.

Steps are numbered as everywhere in orch: step N is done after N optimizer steps (the checkpoint `step_N`, MLflow's
step N), so `--skip-steps A:B` names the steps that took the run from step A to step B.
"""

from __future__ import annotations

import re

from jobs.tracking import MetricSpool
from orchestrator.core import checkpoints
from orchestrator.core.errors import OrchError
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import Skip, add_skip, new_skip, read_skips
from orchestrator.core.schedulers import job_alive
from orchestrator.core.yamlio import shown

STEP_RANGE = re.compile(r"([0-9]{1,15}):([0-9]{1,15})")


def rollback(run: Run, to_step: int, skip_steps: str, steps: int | None) -> list[str]:
    """Roll the run back (`roll_back`), then resume it; returns what to tell the user."""
    from orchestrator.cli.submit import resume

    start, end = step_range(skip_steps)
    set_aside = roll_back(run, to_step, start, end, steps)
    aside = f"; checkpoints {', '.join(map(str, set_aside))} set aside as rolled_back_step_*" if set_aside else ""
    said = [f"Run {run.id} goes back to step {to_step} and skips the data of steps {start}..{end}{aside}."]
    mlflow = run.mlflow
    if mlflow and mlflow.tracking_uri in (None, run.tracking_uri) and mlflow.sent_through > to_step:
        said.append(
            f"MLflow run {mlflow.run_id} has steps through {mlflow.sent_through}, and an MLflow run's points cannot "
            "be deleted: the next sending sets it aside (deleted in MLflow; `mlflow runs restore` brings it back) "
            f"and gives a new MLflow run the steps up to {to_step}, then the steps as they are trained again."
        )
    return [*said, f"Resumed run {run.id} as job {resume(run, steps, None, [], force=False)}"]


def step_range(text: str) -> tuple[int, int]:
    """A:B, two step numbers with A below B."""
    match = STEP_RANGE.fullmatch(text)
    if not match or int(match[1]) >= int(match[2]):
        raise OrchError(
            f"--skip-steps {shown(text)}: expected A:B, two step numbers with A below B (e.g. 1200:1250 skips the "
            "data of the 50 steps that took the run from step 1200 to step 1250)."
        )
    return int(match[1]), int(match[2])


def roll_back(run: Run, to_step: int, start: int, end: int, steps: int | None) -> list[int]:
    """Under the run's lock: refuse while a job is live or when the steps do not fit (nothing written then); else
    record the skip, set aside the checkpoints after `to_step`, name `to_step` as the newest and drop the spooled
    steps after it, so that `orch compare` and MLflow read only the steps that stand before the next job starts
    (goodput finds the dropped ones in rolled_back.jsonl). The skip is written first: interrupted before the rest,
    the next job refuses the newer checkpoints (their data position no longer matches the skip list) instead of
    training the skipped data. Returns the steps set aside."""
    with run.lock():
        jobs = run.jobs
        if jobs and job_alive(run.job(jobs[-1])):
            raise OrchError(
                f"Run {run.id} has a live job {jobs[-1].job_id} ({run.state()}): a rollback changes the checkpoints "
                f"and the data order it reads. Wait for it to end or stop it with `orch cancel {run.id}`, then roll "
                "back."
            )
        committed = checkpoints.committed_steps(run.checkpoints_dir)
        if to_step not in committed:
            listed = ", ".join(map(str, sorted(committed))) or "none"
            raise OrchError(
                f"--to-step {to_step}: run {run.id} has no committed checkpoint at that step; committed checkpoints "
                f"(kept by retention: checkpoint.keep_last, keep_every) are at steps: {listed}."
            )
        if start < to_step:
            raise OrchError(
                f"--skip-steps {start}:{end} starts before --to-step {to_step}: the steps up to {to_step} are in the "
                f"checkpoint the run goes back to. Skip steps from {to_step} on, or go back to an earlier checkpoint."
            )
        if (steps or run.info.steps) <= to_step:
            raise OrchError(
                f"Run {run.id} trains {steps or run.info.steps} steps, so nothing is left to train after step "
                f"{to_step}; pass --steps N with N > {to_step}."
            )
        skip = new_skip(read_skips(run.dir), start, end, "hand", f"orch rollback --to-step {to_step}", None)
        if not repeats_unfinished_rollback(run, skip):
            add_skip(run.dir, skip)
        newer = sorted(step for step in committed if step > to_step)
        for step in newer:
            checkpoints.set_aside(run.checkpoints_dir, step, "rolled_back")
        checkpoints.write_latest(run.checkpoints_dir, to_step)
        MetricSpool(run.dir).rollback(to_step)
        return newer


def repeats_unfinished_rollback(run: Run, skip: Skip) -> bool:
    """Whether the newest skip is this same rollback and no job has started since: one interrupted before it resumed
    and run again, whose skip is recorded once, not twice (twice the data skipped)."""
    skips = read_skips(run.dir)
    if not skips or (skips[-1].steps, skips[-1].reason, skips[-1].by) != (skip.steps, skip.reason, skip.by):
        return False
    return all(attempt.started < skips[-1].time for attempt in run.attempts)
