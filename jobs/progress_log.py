"""Rank 0's account of training in the job log, so that `orch logs RUN -f` shows a run as it trains: a line every
`log.every_steps` steps (the recipe's), and one per validation, committed checkpoint and early stop (README,
"Following a run")."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from orchestrator.core.eta import clock, eta_s

log = logging.getLogger("orch.train")
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


def stop_line(how: Literal["requeued", "preempted"], done: int, steps: int, committed: int | None) -> str:
    why = "at the time limit, requeued" if how == "requeued" else "preempted"
    return f"stopping at step {done}/{steps}, {why}: the next start resumes from the checkpoint at step {committed}"


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

    def stopped(self, how: Literal["requeued", "preempted"], done: int) -> None:
        self.commits()
        log.info(stop_line(how, done, self.steps, self.logged_commit))

    def completed(self) -> None:
        self.commits()
        log.info("training completed: %d steps", self.steps)
