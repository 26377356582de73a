"""Rank 0 follows what its scheduler says will end the job and tells the stop flag when to stop
(orchestrator/core/deadline.py computes it; docs/goodput.md#the-deadline).

A thread asks the scheduler every `deadline_poll_s` (Slurm: one squeue and one scontrol for the whole job, not one
per rank); at each step boundary rank 0 turns the newest answer, the step intervals and the longest save into a
deadline. The other ranks hold none: the stop flag's all-reduce carries rank 0's decision to every rank at the same
step. Where the scheduler cannot say (the local one), the job keeps its own clock and stops at every warning signal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime

from jobs.distributed import agree
from jobs.preemption import StopFlag
from orchestrator.core import deadline
from orchestrator.core.deadline import Deadline, End
from orchestrator.core.errors import OrchError
from orchestrator.core.plan import Plan
from orchestrator.core.rundir import Run
from orchestrator.core.schedulers import scheduler_of
from orchestrator.core.schedulers.base import Ends, Scheduler

log = logging.getLogger("orch.deadline")
INTERVALS = 200  # the step intervals the p95 is taken over: recent ones, so that a slower phase shows soon


class Watch:
    """Rank 0's deadline: the scheduler's newest `Ends`, this job's step intervals and the run's longest save."""

    def __init__(
        self, run: Run, job_id: str, plan: Plan, scheduler: Scheduler, ends: Ends, save_s: Callable[[], float | None]
    ) -> None:
        self.run, self.job_id, self.plan, self.scheduler, self.save_s = run, job_id, plan, scheduler, save_s
        self.earlier_save_s = deadline.longest_save(deadline.read_records(run.dir))
        self.ends, self.lock = ends, threading.Lock()
        self.intervals: deque[float] = deque(maxlen=INTERVALS)
        self.first: float | None = None  # the first step's interval (warm-up): used only until there is another
        self.boundary = time.time()
        self.chosen: Deadline | None = None  # the last one logged and recorded
        self.current: Deadline | None = None  # the last one computed (at the newest step boundary)
        self.signal_handled: float | None = None
        self.unexplained: End | None = None  # a warning signal that the reported end does not explain
        self.closing = threading.Event()
        self.poller = threading.Thread(target=self._poll, args=(run.profile().deadline_poll_s,), name="deadline",
                                       daemon=True)  # fmt: skip
        self.poller.start()

    def _poll(self, every_s: float) -> None:
        while not self.closing.wait(every_s):
            self.refresh()

    def refresh(self) -> None:
        """Ask the scheduler again; a failed answer keeps the last one (it was right when it came)."""
        try:
            found = self.scheduler.ends(self.job_id)
        except OrchError as err:
            log.warning("cannot ask the scheduler when job %s ends: %s", self.job_id, err)
            return
        if found is not None:
            with self.lock:
                self.ends = found

    def stop_at(self, signalled_at: float | None) -> float | None:
        now = time.time()
        if self.first is None:
            self.first = now - self.boundary
        else:
            self.intervals.append(now - self.boundary)
        self.boundary = now
        if signalled_at is not None and signalled_at != self.signal_handled:
            self.signal_handled = signalled_at
            self.weigh_signal(signalled_at)
        with self.lock:
            ends = self.ends
        reserved = ends.reservation
        end = deadline.earliest([
            End(ends.end, "time limit") if ends.end is not None else None,
            End(reserved[1], f"reservation {reserved[0]}") if reserved else None,
            self.unexplained,
        ])  # fmt: skip
        if end is None:
            return None
        saves = [s for s in (self.earlier_save_s, self.save_s()) if s is not None]
        intervals = list(self.intervals) or [self.first]
        lead = deadline.lead(intervals, self.plan.step_s, max(saves, default=None), self.plan.save_s)
        self.current = Deadline(end, lead)
        if self.current.differs(self.chosen):
            self.choose(self.current, now)
        return self.current.stop_at

    def weigh_signal(self, arrived: float) -> None:
        """A warning signal: the time limit's where the scheduler's end (asked again now) explains it; otherwise the
        job stops at this boundary, as it did before it followed its end."""
        self.refresh()
        delay, check = self.plan.signal_delay_s, self.scheduler.signal_check_s
        end = self.ends.end
        if end is not None and deadline.signal_explained(arrived, end, delay, check):
            log.info("the warning signal came %.0f s before the time limit: the deadline stands", end - arrived)
        else:
            log.info("a warning signal the time limit does not explain: stopping at this step boundary")
            self.unexplained = End(arrived, "warning signal")

    def choose(self, chosen: Deadline, now: float) -> None:
        self.chosen = chosen
        log.info(
            "deadline: stop at %s, %.1f s before the %s at %s (%s)",
            clock(chosen.stop_at), chosen.lead.total_s, chosen.end.source, clock(chosen.end.at), chosen.lead.why(),
        )  # fmt: skip
        deadline.append_record(self.run.dir, deadline.record(self.job_id, chosen, now))

    def stopped(self, step: int) -> None:
        """The last record: the deadline the job stopped at, the step it saved and when that save committed."""
        if self.current is not None:
            deadline.append_record(self.run.dir, deadline.record(self.job_id, self.current, time.time(), step))

    def close(self) -> None:
        self.closing.set()


class RankZeroDecides:
    """The follower of ranks other than 0: no deadline and no stop of their own for a warning signal."""

    def stop_at(self, signalled_at: float | None) -> float | None:
        return None

    def stopped(self, step: int) -> None:
        """Rank 0 records the stop."""


def follow(
    run: Run, plan: Plan, job_id: str, rank: int, stop: StopFlag, save_s: Callable[[], float | None]
) -> Watch | None:
    """Where the scheduler says when the job ends, rank 0 watches it and decides for every rank (all ranks agree on
    whether it does); the watch, on rank 0."""
    scheduler = scheduler_of(run.profile().executor)

    def ask() -> Ends | None:
        try:
            return scheduler.ends(job_id)
        except OrchError as err:
            log.warning("the job keeps its own clock: %s", err)
            return None

    ends = agree(rank, ask)
    if ends is None:
        return None
    if rank != 0:
        stop.follower = RankZeroDecides()
        return None
    watch = Watch(run, job_id, plan, scheduler, ends, save_s)
    stop.follower = watch
    return watch


def clock(at: float) -> str:
    return datetime.fromtimestamp(at).strftime("%H:%M:%S")
