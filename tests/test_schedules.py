"""Learning-rate schedules (cosine, linear, wsd): values at chosen steps, what the schema refuses, exact resumes, and
`orch resume --steps N` past the schedule's end (docs/recipes.md, "Schedules")."""

import json
import math
from pathlib import Path

import pytest

from orchestrator.cli.submit import dump, past_schedule
from orchestrator.core.config import ScheduleSpec
from orchestrator.core.errors import OrchError
from orchestrator.core.loading import load_profile, load_recipe, parse_override
from orchestrator.core.rundir import Run, create_run
from orchestrator.core.schedule import extended, lr_factor
from tests.conftest import kill_job_tree, orch

WSD = ScheduleSpec(name="wsd", warmup_steps=10, total_steps=100, decay_steps=20, alpha=0.1)
SEED_SCHEDULE = ScheduleSpec(warmup_steps=100, total_steps=200_000, alpha=0.1)  # cosine, as the seed model's


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


@pytest.mark.parametrize(
    "shape, midway", [(None, 1 - math.sqrt(0.5)), ("1-sqrt", 1 - math.sqrt(0.5)), ("linear", 0.5), ("cosine", 0.5)]
)
def test_wsd_warms_up_holds_the_peak_then_decays_in_its_shape_to_the_floor(shape, midway):
    spec = ScheduleSpec(**{**WSD.model_dump(), "decay_shape": shape})
    assert lr_factor(0, spec) == pytest.approx(0.1)
    assert [lr_factor(step, spec) for step in (10, 50, 79, 80)] == [1.0, 1.0, 1.0, 1.0]  # the decay starts at 100 - 20
    assert lr_factor(90, spec) == pytest.approx(0.1 + 0.9 * midway)
    assert lr_factor(100, spec) == pytest.approx(0.1)
    assert lr_factor(150, spec) == pytest.approx(0.1)


def test_one_minus_sqrt_drops_faster_than_linear_early_in_the_cooldown():
    sqrt, linear = (ScheduleSpec(**{**WSD.model_dump(), "decay_shape": s}) for s in ("1-sqrt", "linear"))
    assert lr_factor(82, sqrt) < lr_factor(82, linear)


def test_linear_falls_in_a_straight_line_from_the_peak_to_the_floor():
    spec = ScheduleSpec(name="linear", warmup_steps=10, total_steps=110, alpha=0.2)
    assert lr_factor(10, spec) == 1.0
    assert lr_factor(35, spec) == pytest.approx(0.2 + 0.8 * 0.75)
    assert lr_factor(60, spec) == pytest.approx(0.6)
    assert lr_factor(110, spec) == pytest.approx(0.2)
    assert lr_factor(500, spec) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "assignments, fragments",
    [
        (["schedule.name=wsd", "schedule.decay_steps=500"], ["decay_steps (500) is longer", "up to 190"]),
        (["schedule.name=wsd"], ["the wsd schedule needs decay_steps"]),
        (["schedule.decay_steps=20"], ["decay_steps and decay_shape are for the wsd schedule"]),
        (["schedule.warmup_steps=300"], ["warmup_steps (300) is longer than total_steps (200)"]),
        (["schedule.name=wsd", "schedule.decay_steps=20", "schedule.decay_shape=sqrt"], ["'1-sqrt'", "sqrt"]),
    ],
)
def test_a_schedule_that_does_not_fit_is_refused_naming_the_field(assignments, fragments):
    overrides = [parse_override(f"recipe.{text}") for text in assignments]
    with pytest.raises(OrchError) as refused:
        load_recipe("tiny", overrides)
    message = str(refused.value)
    assert "recipes/tiny.yaml with --set recipe.schedule." in message and "field 'schedule" in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_resumed_scheduler_continues_with_the_rates_of_one_that_never_stopped_or_of_its_extended_schedule():
    """The job saves scheduler.state_dict() in train_state.json (JSON) and loads it after the optimizer's state."""
    import torch

    from jobs.optim import build_scheduler

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)

    uninterrupted = optimizer()
    scheduler = build_scheduler(uninterrupted, WSD)
    for _ in range(95):
        uninterrupted.step()
        scheduler.step()
    saved = json.loads(json.dumps(scheduler.state_dict()))
    resumed, longer = optimizer(), optimizer()
    for restored, spec in ((resumed, WSD), (longer, extended(WSD, 150))):  # in the job's order
        restarted = build_scheduler(restored, spec)
        restored.load_state_dict(uninterrupted.state_dict())
        restarted.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == uninterrupted.param_groups[0]["lr"] == 1e-3 * lr_factor(95, WSD)
    assert longer.param_groups[0]["lr"] == 1e-3  # step 95 of the extended wsd is in its stable phase again


@pytest.fixture
def finished_run(orch_home: Path) -> Run:
    """A run directory as `orch submit` writes it, of the tiny recipe (schedule to step 200) trained 200 steps."""
    _, profile = load_profile("local")
    _, recipe = load_recipe("tiny")
    info = {"profile": "local", "recipe": "tiny", "steps": 200, "stop_before_end_s": 30}
    return create_run("tiny-schedule", info, dump(profile), dump(recipe))


@pytest.mark.slow
def test_steps_past_the_schedule_need_a_choice_and_extend_makes_the_schedule_end_at_them(finished_run: Run):
    recipe = finished_run.recipe()
    assert past_schedule(finished_run, recipe, 200, 200, None) == (recipe, None)  # within the schedule
    with pytest.raises(OrchError, match="--beyond-schedule: extend"):
        past_schedule(finished_run, recipe, 300, 200, None)
    assert past_schedule(finished_run, recipe, 300, 200, "floor") == (recipe, "floor")
    longer, choice = past_schedule(finished_run, recipe, 300, 200, "extend")
    assert choice == "extend" and longer.schedule.total_steps == 300
    assert lr_factor(300, longer.schedule) == pytest.approx(recipe.schedule.alpha)
    assert lr_factor(299, longer.schedule) > lr_factor(300, longer.schedule)


@pytest.mark.slow
def test_orch_resume_past_the_schedule_refuses_with_the_choices_then_extends_the_stored_schedule(finished_run: Run):
    before = {name: (finished_run.dir / name).read_bytes() for name in ("run.json", "recipe.yaml", "profile.yaml")}
    refused = orch("resume", finished_run.id, "--steps", "300")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    message = refused.stderr.strip()
    for fragment in ("--steps 300 goes past the end", "step 200", "--beyond-schedule: extend", "floor (steps 200 to"):
        assert fragment in message, message
    assert "\n" not in message
    assert {name: (finished_run.dir / name).read_bytes() for name in before} == before
    assert not (finished_run.dir / "jobs.json").exists()

    extended_run = orch("resume", finished_run.id, "--steps", "300", "--beyond-schedule", "extend")
    jobs = json.loads((finished_run.dir / "jobs.json").read_text())
    kill_job_tree(jobs[-1]["job_id"])  # what the job does with the schedule is the scheduler test's above
    assert extended_run.returncode == 0, extended_run.stderr
    schedule = finished_run.recipe().schedule
    assert schedule.total_steps == 300 and lr_factor(300, schedule) == pytest.approx(schedule.alpha)
    info = finished_run.info
    assert (info.steps, info.beyond_schedule) == (300, "extend")
    assert "lr at step" in extended_run.stdout and (finished_run.dir / "lr_schedule.png").is_file()
