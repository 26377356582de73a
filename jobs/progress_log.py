"""Rank 0's account of training in the job log, so that `orch logs RUN -f` shows a run as it trains: a line every
`log.every_steps` steps (the recipe's), and one per validation, committed checkpoint and early stop (README,
"Following a run")."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from orchestrator.core import deadline, stragglers
from orchestrator.core.eta import clock, eta_s
from orchestrator.core.runfiles import DamagedFile

log = logging.getLogger("orch.train")
AT_TIME_LIMIT = "at the time limit"
FIRST_STEP_NOTE = " (the job's first step: warm-up and any compilation, left out of the ETA)"


def step_line(done: int, steps: int, interval: list[dict[str, float]], first: bool = False) -> str:
    """The steps since the previous line (their metrics, oldest first) as one line: step/total, mean loss, the last
    step's learning rate, tokens/s, MFU (where the profile gives the GPU's peak), mean step time, the share of it
    spent waiting for data, and the ETA at that step time. Rates are the interval's (its tokens over its time), so
    that one slow step does not speak for it; the job's `first` step has no ETA, being start-up more than training."""
    seconds = sum(m["step_time_s"] for m in interval)
    step_time = seconds / len(interval)

    def over_time(key: str) -> float:
        return sum(m[key] * m["step_time_s"] for m in interval) / seconds

    fields = [
        f"step {done}/{steps}",
        f"loss {sum(m['loss'] for m in interval) / len(interval):.4f}",
        f"lr {interval[-1]['lr']:.3e}",
        f"{over_time('tokens_per_s'):,.0f} tok/s",
        *([f"MFU {over_time('mfu'):.1%}"] if "mfu" in interval[-1] else []),
        f"step time {step_time:.3f} s",
        f"data wait {over_time('data_wait_fraction'):.1%}",
        f"ETA {clock(None if first else eta_s(done, steps, step_time))}",
    ]
    return " | ".join(fields) + (FIRST_STEP_NOTE if first else "")


def validation_line(done: int, metrics: dict[str, float]) -> str:
    """The step's validation scores (a mixture's per source too) and how long the validation took."""
    scores = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key.startswith("val_"))
    return f"validation at step {done}: {scores} ({metrics.get('eval_s', 0.0):.1f} s)"


def stop_line(
    how: Literal["requeued", "preempted"], done: int, steps: int, committed: int | None, cause: str = AT_TIME_LIMIT
) -> str:
    """`cause`: what a requeued job stopped for (`stop_cause`)."""
    why = f"{cause}, requeued" if how == "requeued" else "preempted"
    return f"stopping at step {done}/{steps}, {why}: the next start resumes from the checkpoint at step {committed}"


def stop_cause(run_dir: Path, job_id: str, step: int) -> str:
    """What the job that stopped at `step` to be requeued stopped for, as the run's files say: a slow host it
    leaves (stragglers.json), else the end its deadline was set by (deadline.json: the time limit, a reservation, a
    warning signal the time limit does not explain), else the time limit's warning signal (a job that follows no
    end stops at it)."""
    try:
        figures = stragglers.read(run_dir)
        records = deadline.read_records(run_dir)
    except DamagedFile as damage:
        log.warning("what the job stopped for is not known: %s", damage)
        return AT_TIME_LIMIT
    left = [d.host for d in figures.decisions if d.leave and (d.job_id, d.step) == (job_id, step)] if figures else []
    if left:
        return f"to leave the slow host {left[0]}"
    ends = [r.source for r in records if (r.job_id, r.stopped_step) == (job_id, step)]
    if not ends or ends[-1] == "time limit":
        return AT_TIME_LIMIT
    return "at a warning signal" if ends[-1] == "warning signal" else f"before the {ends[-1]}"


class ProgressLog:
    """Writes the lines as rank 0's report of each step reaches it (`jobs.train.JobReport`)."""

    def __init__(self, every_steps: int, steps: int, start_step: int, committed: Callable[[], int | None]) -> None:
        self.every_steps, self.steps, self.start_step, self.committed = every_steps, steps, start_step, committed
        self.interval: list[dict[str, float]] = []
        self.logged_commit = committed()  # the checkpoint this job resumed from is not news

    def step(self, done: int, metrics: dict[str, float], last: bool) -> None:
        """`last`: the job's last step (the end of training, or a stop), which always gets its line."""
        self.commits()
        self.interval.append(metrics)
        first = done == self.start_step + 1
        if first or last or done % self.every_steps == 0:
            log.info(step_line(done, self.steps, self.interval, first))
            self.interval = []
        if "val_loss" in metrics:
            log.info(validation_line(done, metrics))

    def commits(self) -> None:
        """A line for a checkpoint committed since the last look: saves commit in the background."""
        committed = self.committed()
        if committed is not None and committed != self.logged_commit:
            log.info("checkpoint saved at step %d (committed)", committed)
            self.logged_commit = committed

    def stopped(self, how: Literal["requeued", "preempted"], done: int, cause: str = AT_TIME_LIMIT) -> None:
        self.commits()
        log.info(stop_line(how, done, self.steps, self.logged_commit, cause))

    def completed(self) -> None:
        self.commits()
        log.info("training completed: %d steps", self.steps)
