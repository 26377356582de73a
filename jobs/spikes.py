"""The loss-spike guard (the recipe's `spike_guard`, docs/rollback.md): which step spiked, and the skip it records.

A step spikes when its loss is above `factor` × the median of the last `window` losses, once `min_steps` losses are
known, or is not finite. The guard holds the losses of the steps the run has trained (after a resume, read back
from the metrics spool), so its decisions do not depend on interruptions. It needs no collective of its own: the
loss is all-reduced, so every rank reads the same value and decides the same.

What a spike undoes: the steps from the last committed checkpoint c through the spike s. Their data steps are
skipped (skips.json) and training goes on from c. Skipping only the spike's batch would replay c..s-1 bitwise into
the very state that spiked, which then meets the next batch; skipping from c replaces the state and the data both,
and the replayed steps train new data instead of repeating old. The cost is the data of at most one checkpoint
interval.
"""

from __future__ import annotations

import logging
import math
import statistics

from jobs.distributed import agree
from jobs.tracking import MetricSpool
from orchestrator.core.checkpoints import committed_step
from orchestrator.core.config import SpikeGuardSpec
from orchestrator.core.errors import OrchError
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import Ranges, add_skip, new_skip, read_skips, skipped_data

log = logging.getLogger(__name__)


class SpikeGuard:
    """Watches every step's loss on every rank; rank 0 records the skips."""

    def __init__(self, spec: SpikeGuardSpec, run: Run, rank: int, job_id: str, start_step: int) -> None:
        self.spec, self.run, self.rank, self.job_id = spec, run, rank, job_id
        self.losses: list[tuple[int, float]] = agree(rank, lambda: trained_losses(run, start_step, spec.window))
        self.spike: tuple[int, float] | None = None  # the training step that spiked last, and its loss

    def spiked(self, step: int, loss: float) -> bool:
        """Whether training step `step` spiked; a finite loss that did not joins the window (a NaN or inf before
        `min_steps` would spoil the median; a resume seeds the window with finite losses alike)."""
        if len(self.losses) >= self.spec.min_steps and not loss <= self.spec.factor * self.median():
            self.spike = (step, loss)
            return True
        if math.isfinite(loss):
            self.losses = [*self.losses, (step + 1, loss)][-self.spec.window :]
        return False

    def median(self) -> float:
        return statistics.median(loss for _, loss in self.losses)

    def record(self) -> tuple[int, Ranges] | None:
        """Collective, after a spike at step s: rank 0 records the skip of steps [c, s + 1) for the last committed
        checkpoint c; every rank gets c and the run's skipped data steps. None before the first checkpoint: nothing
        to go back to."""
        return agree(self.rank, self._record)

    def _record(self) -> tuple[int, Ranges] | None:
        step, loss = self.spike
        committed = committed_step(self.run.checkpoints_dir)
        why = f"loss {loss:.4g} at step {step + 1}, median of the last {len(self.losses)} steps {self.median():.4g}"
        if committed is None:
            log.warning("%s: no checkpoint to roll back to yet; training goes on", why)
            return None
        skips = read_skips(self.run.dir)
        rollbacks = sum(1 for s in skips if s.by == "guard" and s.steps[0] == committed)
        if rollbacks >= self.spec.max_rollbacks:
            raise OrchError(
                f"{why}: the loss spiked again after {rollbacks} rollbacks to the checkpoint at step {committed} "
                f"(spike_guard.max_rollbacks), so that checkpoint is where the trouble is. skips.json lists the "
                "skipped steps; go back further by hand with `orch rollback RUN --to-step K --skip-steps A:B`."
            )
        skip = new_skip(skips, committed, step + 1, "guard", why, self.job_id)
        log.warning(
            "%s: rolling back to the checkpoint at step %d and skipping the data of steps %d..%d",
            why, committed, committed + 1, step + 1,
        )  # fmt: skip
        return committed, skipped_data(add_skip(self.run.dir, skip))

    def forget_after(self, step: int) -> None:
        """The run went back to `step`: the losses of later steps were never trained."""
        self.losses = [(done, loss) for done, loss in self.losses if done <= step]


def trained_losses(run: Run, through: int, window: int) -> list[tuple[int, float]]:
    """The last `window` losses the spool has up to step `through` (steps done), as (step, loss)."""
    losses = [(e["step"], e["metrics"]["loss"]) for e in MetricSpool(run.dir).entries() if "loss" in e["metrics"]]
    return [(done, float(loss)) for done, loss in losses if done <= through and math.isfinite(loss)][-window:]
