"""The loss-spike guard in isolation (jobs/spikes.py): when it acts, the window its median is taken over, and what it
records. One rank: rank 0's decisions reach the others through `agree`, which tests/test_stop_flag.py covers; the
whole rollback in a job is tests/test_rollback.py's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from jobs import spikes
from jobs.spikes import SpikeGuard
from jobs.tracking import MetricSpool
from orchestrator.core.checkpoints import write_latest
from orchestrator.core.config import SpikeGuardSpec
from orchestrator.core.errors import OrchError
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import add_skip, new_skip, read_skips


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """An empty run directory, and `agree` as it is on a single rank."""
    monkeypatch.setattr(spikes, "agree", lambda rank, decide: decide())
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    return Run(tmp_path / "run")


def guard_after(run: Run, losses: list[float], start_step: int = 0, **spec: float) -> SpikeGuard:
    """A guard of factor 3 and min_steps 3 (unless `spec` says otherwise) that has seen `losses` on the steps from
    `start_step` on, none of which spiked."""
    guard = SpikeGuard(SpikeGuardSpec(**{"factor": 3.0, "min_steps": 3, **spec}), run, 0, "42", start_step)
    for step, loss in enumerate(losses, start=start_step):
        assert not guard.spiked(step, loss)
    return guard


def test_before_min_steps_losses_are_known_nothing_spikes_and_every_loss_joins_the_window(run: Run):
    guard = guard_after(run, [1.0, 1.0, 100.0])
    assert guard.losses == [(1, 1.0), (2, 1.0), (3, 100.0)]


def test_once_min_steps_are_known_a_loss_above_factor_times_the_median_spikes_and_stays_out_of_the_window(run: Run):
    guard = guard_after(run, [1.0, 2.0, 1.0, 3.0])  # median 1.5: up to 4.5 is no spike
    assert guard.spiked(4, 4.6) and guard.spike == (4, 4.6)
    assert guard.losses == [(1, 1.0), (2, 2.0), (3, 1.0), (4, 3.0)]
    assert not guard.spiked(4, 4.5)  # the step trained again on other data
    assert guard.losses[-1] == (5, 4.5)


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_a_loss_that_is_not_finite_spikes(run: Run, loss: float):
    assert guard_after(run, [1.0, 1.0, 1.0]).spiked(3, loss)


def test_the_median_is_over_the_last_window_losses_only(run: Run):
    guard = guard_after(run, [10.0] * 3 + [1.0] * 3, window=3)
    assert guard.losses == [(4, 1.0), (5, 1.0), (6, 1.0)]
    assert guard.spiked(6, 4.0)  # 4 is below 3 × 10, but the tens have left the window


def test_a_resumed_guard_starts_from_the_finite_losses_spooled_up_to_its_step(run: Run):
    spool = MetricSpool(run.dir)
    for step, loss in enumerate([1.0, 2.0, math.nan, 3.0, 4.0, 50.0], start=1):
        spool.append(step, {"loss": loss})
    spool.append(5, {"val_loss": 9.0})  # a line without a training loss
    guard = guard_after(run, [], start_step=5, window=3)
    assert guard.losses == [(2, 2.0), (4, 3.0), (5, 4.0)]


def test_a_spike_records_the_skip_of_the_steps_from_the_last_checkpoint_through_it(run: Run):
    write_latest(run.checkpoints_dir, 10)
    guard = guard_after(run, [1.0] * 3, start_step=10)
    assert guard.spiked(13, 100.0)
    assert guard.record() == (10, ((10, 14),))
    (skip,) = read_skips(run.dir)
    assert (skip.steps, skip.data_steps, skip.by, skip.job_id) == ((10, 14), (10, 14), "guard", "42")
    assert skip.reason == "loss 100 at step 14, median of the last 3 steps 1"


def test_before_the_first_checkpoint_a_spike_records_nothing_and_training_goes_on(run: Run):
    guard = guard_after(run, [1.0] * 3)
    assert guard.spiked(3, 100.0)
    assert guard.record() is None
    assert read_skips(run.dir) == []


def test_a_spike_after_max_rollbacks_to_the_same_checkpoint_stops_the_job(run: Run):
    write_latest(run.checkpoints_dir, 10)
    for _ in range(2):
        add_skip(run.dir, new_skip(read_skips(run.dir), 10, 14, "guard", "an earlier spike", "41"))
    guard = guard_after(run, [1.0] * 3, start_step=10, max_rollbacks=2)
    assert guard.spiked(13, 100.0)
    with pytest.raises(OrchError, match="spiked again after 2 rollbacks to the checkpoint at step 10"):
        guard.record()
    assert len(read_skips(run.dir)) == 2


def test_going_back_to_a_step_forgets_the_losses_of_later_steps(run: Run):
    guard = guard_after(run, [1.0, 2.0, 3.0, 4.0])
    guard.forget_after(2)
    assert guard.losses == [(1, 1.0), (2, 2.0)]


def test_a_non_finite_loss_before_min_steps_stays_out_of_the_window(run: Run):
    guard = guard_after(run, [2.0, float("nan"), 2.1, float("inf")])
    assert guard.losses == [(1, 2.0), (3, 2.1)]
