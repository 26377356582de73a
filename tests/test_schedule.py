import pytest

from jobs.optim import lr_factor
from orchestrator.core.config import ScheduleSpec

SEED_SCHEDULE = ScheduleSpec(warmup_steps=100, total_steps=200_000, alpha=0.1)


def test_warmup_starts_small_and_reaches_peak_at_its_end():
    assert lr_factor(0, SEED_SCHEDULE) == pytest.approx(1 / 100)
    assert lr_factor(49, SEED_SCHEDULE) == pytest.approx(0.5)
    assert lr_factor(100, SEED_SCHEDULE) == pytest.approx(1.0)


def test_cosine_is_halfway_between_peak_and_floor_midway():
    midway = 100 + (200_000 - 100) // 2
    assert lr_factor(midway, SEED_SCHEDULE) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)


def test_last_scheduler_step_is_alpha_times_peak_and_stays_there():
    assert lr_factor(200_000, SEED_SCHEDULE) == pytest.approx(0.1)
    assert lr_factor(250_000, SEED_SCHEDULE) == pytest.approx(0.1)


def test_released_checkpoint_step_160k_is_on_the_decaying_part():
    assert 0.1 < lr_factor(160_000, SEED_SCHEDULE) < 0.2
