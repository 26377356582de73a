"""Timeouts and preemption: the signal only sets a flag; every rank stops at the same step boundary.

submitit sends SIGUSR2 before the time limit and on preemption, to every task. Its own handler would
requeue from inside the signal handler on rank 0 while the other ranks are mid-step, which cannot save
a sharded checkpoint (a collective). So each rank records the signal; at each step boundary the ranks
agree through an all-reduce, save together, and only then rank 0 hands over to submitit's handler,
which requeues the job. The job also knows its own end time and stops before it if no signal came.
"""

from __future__ import annotations

import logging
import signal
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StopFlag:
    def __init__(self, deadline: float | None, device: torch.device) -> None:
        self.deadline, self.device = deadline, device
        self.signalled = False
        self.submitit_handler = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signalled = True

    def agreed(self) -> bool:
        """Collective: True on every rank once any rank was signalled or passed the deadline."""
        local = self.signalled or (self.deadline is not None and time.time() >= self.deadline)
        flag = torch.tensor([int(local)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def requeue(self) -> None:
        """Rank 0, after the checkpoint is committed: submitit's handler requeues the job and exits."""
        log.info("requeueing the job after a checkpoint")
        signal.signal(signal.SIGUSR2, self.submitit_handler)
        signal.raise_signal(signal.SIGUSR2)
