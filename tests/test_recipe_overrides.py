"""`--set` for recipe and profile fields, recipes that `extend` another, and sweeps (docs/recipes.md)."""

import json
from pathlib import Path

import pytest

from jobs.tracking import describe
from orchestrator.cli.submit import build_request
from orchestrator.core.errors import OrchError
from orchestrator.core.loading import MAX_SWEEP_POINTS, load_recipe, parse_override, parse_sweep, sweep_points
from orchestrator.core.rundir import get_run
from tests.conftest import kill_job_tree, orch, status_json

WSD_CHILD = """extends: tiny
description: tiny with a warmup-stable-decay schedule
schedule:
  name: wsd
  warmup_steps: 5
  total_steps: 200
  decay_steps: 20
"""


@pytest.fixture
def child(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-wsd.yaml"
    path.write_text(WSD_CHILD)
    return path


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # rich lays the plan's table out in one line per row


def refused(call, *fragments: str) -> str:
    with pytest.raises(OrchError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_set_addresses_recipe_and_profile_fields_and_keeps_the_bare_profile_form():
    assert [(o.target, o.field) for o in map(parse_override, ("recipe.optimizer.lr=2e-4", "slurm.qos=x"))] == [
        ("recipe", "optimizer.lr"),
        ("profile", "slurm.qos"),
    ]
    assert str(parse_override("profile.time_limit_min=30")) == "profile.time_limit_min=30"
    assert str(parse_override("time_limit_min=30")) == "profile.time_limit_min=30"


def test_a_recipe_extending_another_with_overrides_resolves_to_what_the_run_stores(child: Path):
    request = build_request(
        "local", str(child), 20, [parse_override("recipe.optimizer.lr=2e-4"), parse_override("signal_delay_s=10")]
    )
    _, tiny = load_recipe("tiny")
    recipe = request.recipe
    assert (recipe.optimizer.lr, recipe.schedule.name, recipe.schedule.decay_steps) == (2e-4, "wsd", 20)
    assert (recipe.model, recipe.data, recipe.schedule.alpha) == (tiny.model, tiny.data, tiny.schedule.alpha)
    assert (recipe.extends, request.profile.signal_delay_s) == ("tiny", 10)
    assert request.info["overrides"] == ["recipe.optimizer.lr=0.0002", "profile.signal_delay_s=10"]


def test_dry_run_of_an_extending_recipe_shows_the_overridden_values_and_the_lr_curve(child: Path, orch_home, wide):
    result = orch(
        "submit", "--recipe", str(child), "--steps", "20", "--dry-run",
        "--set", "recipe.optimizer.lr=2e-4", "--set", "recipe.schedule.decay_steps=50",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for shown in (
        "(extends tiny)",
        "recipe.optimizer.lr=0.0002, recipe.schedule.decay_steps=50",
        "wsd: warmup 5, stable to step 150, 1-sqrt decay of 50 steps, floor 0.1 × 0.0002 at step 200",
        "lr at step 0: 4e-05, 5: 0.0002",
    ):
        assert shown in result.stdout, result.stdout
    png = Path(result.stdout.split("learning-rate curve: ")[1].split()[0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.is_relative_to(orch_home / "dry-runs")
    assert not (orch_home / "runs").exists()


def test_extends_that_cycles_or_names_a_missing_recipe_is_refused_naming_the_file(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    (tmp_path / "c.yaml").write_text("extends: tiny-typo\n")
    a, b, c = (tmp_path / f"{name}.yaml" for name in "abc")
    refused(lambda: load_recipe(str(a)), f"{b}: field 'extends' must name another recipe", f"{a} -> {b} -> {a}")
    refused(lambda: load_recipe(str(c)), f"{c}: field 'extends'", "Unknown recipe 'tiny-typo'", "Did you mean 'tiny'")


def overridden(*assignments: str):
    return lambda: build_request("local", "tiny", 5, [parse_override(text) for text in assignments])


NINE = ",".join(str(n) for n in range(1, 10))
BAD_INPUT = {
    "unknown field": (overridden("recipe.optimizer.lrr=1"), ["unknown field 'optimizer.lrr'", "did you mean 'lr'"]),
    "refused value": (overridden("recipe.optimizer.lr=-1"), ["with --set recipe.optimizer.lr=-1", "'optimizer.lr'"]),
    "recipe field without recipe.": (lambda: parse_override("optimizer.lr=1"), ["Did you mean recipe.optimizer.lr?"]),
    "no value": (lambda: parse_override("recipe.optimizer.lr"), ["expected FIELD=VALUE"]),
    "empty sweep": (lambda: parse_sweep("recipe.optimizer.lr="), ["no values"]),
    "malformed sweep": (lambda: parse_sweep("recipe.optimizer.lr=1e-4,[2e-4"), ["--sweep 'recipe.", "not valid YAML"]),
    "repeated value": (lambda: parse_sweep("recipe.optimizer.lr=1e-4,1e-4"), ["given more than once"]),
    "set and swept": (
        lambda: sweep_points([parse_override("recipe.train.seed=1")], [parse_sweep("recipe.train.seed=2,3")]),
        ["recipe.train.seed is swept and also set"],
    ),
    "too many points": (
        lambda: sweep_points(
            [], [parse_sweep(f"recipe.train.seed={NINE}"), parse_sweep(f"recipe.optimizer.lr={NINE}")]
        ),
        ["81 runs", f"more than the {MAX_SWEEP_POINTS}"],
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_overrides_and_sweeps_are_refused_with_one_paragraph_naming_the_field(case):
    call, fragments = BAD_INPUT[case]
    refused(call, *fragments)


def test_sweep_dry_run_prints_every_point_and_submits_nothing(orch_home, wide):
    result = orch("submit", "--steps", "20", "--sweep", "recipe.optimizer.lr=1e-4,2e-4", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "Sweep of 2 runs (dry run: nothing submitted)" in result.stdout
    assert "recipe.optimizer.lr=0.0001" in result.stdout and "recipe.optimizer.lr=0.0002" in result.stdout
    assert "learning-rate curves: " in result.stdout and not (orch_home / "runs").exists()


def test_a_sweep_with_a_point_the_plan_refuses_names_the_point_and_writes_nothing(orch_home):
    result = orch("submit", "--steps", "5", "--sweep", "recipe.train.micro_batch_size=4,3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: Sweep point 2 of 2 (recipe.train.micro_batch_size=3): ") and "\n" not in message
    assert not (orch_home / "runs").exists()


@pytest.mark.slow
def test_a_two_point_sweep_queues_two_runs_of_one_sweep_with_their_overrides(orch_home):
    result = orch("submit", "--steps", "4", "--sweep", "recipe.optimizer.lr=1e-3,2e-3")
    runs = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("Submitted run ")]
    summaries = status_json()
    for summary in summaries:
        kill_job_tree(summary["job_ids"][-1])  # queued is what this test checks; training is other tests'
    assert result.returncode == 0, result.stderr
    assert [s["state"] in ("queued", "running") for s in summaries] == [True, True]
    infos = [json.loads((orch_home / "runs" / run / "run.json").read_text()) for run in runs]
    sweep = infos[0]["sweep"]
    assert [info["sweep"] for info in infos] == [sweep, sweep] and runs == [f"{sweep}-p1", f"{sweep}-p2"]
    assert [info["overrides"] for info in infos] == [["recipe.optimizer.lr=0.001"], ["recipe.optimizer.lr=0.002"]]
    assert [get_run(run).recipe().optimizer.lr for run in runs] == [1e-3, 2e-3]
    assert {s["run_id"]: s["sweep"] for s in summaries} == {run: sweep for run in runs}
    params, tags = describe(get_run(runs[1]))
    assert params["overrides"] == {"recipe.optimizer.lr": "0.002"} and tags["orch.sweep"] == sweep
