"""Timeouts and preemption: the signal only sets a flag; every rank stops at the same step boundary.

submitit sends SIGUSR2 before the time limit (and on preemption where the site sends user signals), to every
task. Its own handler would requeue from inside the signal handler on rank 0 while the other ranks are
mid-step, which cannot save a sharded checkpoint (a collective). So each rank records the signal; at each
step boundary the ranks agree through an all-reduce, save together, and only then rank 0 hands over to
submitit's handler, which requeues the job. The job also knows its own end time and stops before it if no
signal came.

A partition that preempts sends SIGTERM, then SIGKILL after its grace time (submitit ignores SIGTERM). Where the
profile says `preemptible`, SIGTERM is a stop of its own kind: the ranks save at the next step boundary and leave.
Slurm requeues a preempted job (PreemptMode=REQUEUE) only when its grace time runs out: one that saved and left
within it ends as completed, so rank 0 queues the job again itself (the scheduler's `requeue_preempted`; found by
the simulated Karolina's rehearsal, docs/karolina-sim.md).
"""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
STOPS = (None, "time", "preempted")  # what agreed() returns, by the code the ranks reduce with MAX


def process_started() -> float:
    """When this process started (the scheduler's clock for the job starts about then)."""
    import psutil

    return psutil.Process().create_time()


class Follower(Protocol):
    """What decides this rank's deadline where the job follows its scheduler's end (jobs/deadline.py)."""

    def stop_at(self, signalled_at: float | None) -> float | None:
        """At a step boundary: when to stop (None: not yet known), given when a warning signal came, if one did."""

    def stopped(self, step: int) -> None:
        """The job saved at `step` and stops: that save is committed."""


class StopFlag:
    """Installed before the job imports anything heavy, so that a signal during set-up is kept for the first
    step boundary (stdlib only at import time)."""

    def __init__(self) -> None:
        self.deadline: float | None = None  # set once the job knows its time limit
        self.signalled = self.preempted = False
        self.signalled_at: float | None = None
        self.follower: Follower | None = None  # set where the job follows its scheduler's end
        self.submitit_handler = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        """A follower weighs the warning (`stop_at`); without one it is a stop."""
        self.signalled_at = time.time()
        self.signalled = self.signalled or self.follower is None

    def _on_preemption(self, signum: int, frame: object) -> None:
        self.preempted = True

    def listen_for_preemption(self) -> None:
        """SIGTERM stops the job at the next step boundary instead of being ignored until SIGKILL."""
        signal.signal(signal.SIGTERM, self._on_preemption)

    def agreed(self, device: torch.device) -> str | None:
        """Collective: on every rank, "preempted" once any rank got SIGTERM (where listened for), else "time" once
        any rank was signalled (where no follower weighs the signal) or passed the deadline, else None."""
        import torch
        import torch.distributed as dist

        if self.follower is not None:  # the warning signal is one of the ends it weighs
            self.deadline = self.follower.stop_at(self.signalled_at)
        timed_out = self.signalled or (self.deadline is not None and time.time() >= self.deadline)
        flag = torch.tensor([STOPS.index("preempted") if self.preempted else int(timed_out)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return STOPS[int(flag.item())]

    def requeue(self) -> None:
        """Rank 0, after the checkpoint is committed: submitit's handler requeues the job and exits. Its `scontrol
        requeue` makes Slurm end the job's tasks with SIGTERM, scontrol among them: with SIGTERM ignored here (and so in
        scontrol, through exec) it answers before it ends, where it could die first and fail the requeue as a crash.
        This process exits right after."""
        log.info("requeueing the job after a checkpoint")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, self.submitit_handler)
        signal.raise_signal(signal.SIGUSR2)
