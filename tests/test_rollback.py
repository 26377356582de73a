"""Skipped steps, the loss-spike guard and `orch rollback` (docs/rollback.md).

The data order with a skip list is checked as arithmetic; the guard and `orch rollback` on the tiny recipe and the
local Slurm (profile local-slurm): a run whose step 13 (data step 12) is made to spike, so that the guard goes back to
its checkpoint at step 10 and skips steps 10..13 within its job, and a copy of it rolled back by hand over the same
steps, which a new job trains from that checkpoint. Both must train the same steps bitwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from jobs import chaos
from jobs.data import GlobalOrder
from orchestrator.cli.app import app
from orchestrator.core.compat import SUBMITIT_CONTROLLER_MODULE
from orchestrator.core.errors import OrchError
from orchestrator.core.plan import Batching
from orchestrator.core.runfiles import data_step, new_skip, read_skips, skipped_data
from tests.conftest import ROOT, final_weights, needs_slurm, report_goodput, spooled_losses, submitted_run_id

# --- the data order ------------------------------------------------------------------------------


def samples(order: GlobalOrder, step: int) -> list[int]:
    """The blocks a step trains, gathered over every rank and micro step."""
    accumulation = order.split.accumulation
    return [
        int(block)
        for micro in range(accumulation)
        for rank in range(order.split.world_size)
        for block in order.block_indices(step, micro, rank)
    ]


def test_skipped_steps_samples_are_never_trained_and_the_rest_keep_their_order_at_any_world_size():
    skipped = ((2, 4), (7, 8))  # data steps
    plain = GlobalOrder(37, Batching.of(8, 2, 1), seed=3)
    kept = [samples(plain, d) for d in range(14) if not any(a <= d < b for a, b in skipped)]
    for world in (1, 2, 4):
        order = GlobalOrder(37, Batching.of(8, 2, world), 3, skipped)
        trained = [samples(order, step) for step in range(len(kept))]
        assert [sorted(s) for s in trained] == [sorted(s) for s in kept]  # crosses epochs (37 blocks, 8 a step)
        assert [order.skipped_before(step) for step in (0, 2, 3, 5, 6)] == [0, 0, 2, 2, 3]


def test_a_skip_is_recorded_in_data_steps_and_leaves_the_steps_before_it_as_they_were():
    first = [new_skip([], 10, 13, "guard", "spike", None)]
    assert first[0].data_steps == (10, 13)
    second = new_skip(first, 12, 14, "hand", "by hand", None)  # training steps 12, 13 now read data 15, 16
    assert second.data_steps == (15, 17)
    before, after = skipped_data(first), skipped_data([*first, second])
    assert [data_step(after, s) for s in range(12)] == [data_step(before, s) for s in range(12)]
    assert [data_step(after, s) for s in range(12, 15)] == [17, 18, 19]
    overlapping = new_skip(first, 9, 11, "hand", "", None)  # reads data 9 and 13: the already skipped 10..12 between
    assert skipped_data([*first, overlapping]) == ((9, 14),)


def test_orch_chaos_plants_a_spike_in_one_data_step_and_refuses_what_it_cannot_parse(monkeypatch):
    monkeypatch.setenv("ORCH_CHAOS", "spike@12, spike@40")
    assert [chaos.spike(2.0, step) for step in (11, 12, 40)] == [2.0, 200.0, 200.0]
    monkeypatch.setenv("ORCH_CHAOS", "spike@12,hang")
    with pytest.raises(OrchError, match="'hang' is not action@step; actions: spike"):
        chaos.planted("spike", 12)


# --- orch rollback refuses bad input, writing nothing ----------------------------------------------


@pytest.fixture
def stopped_run(orch_home: Path) -> Path:
    """A run directory whose job has ended, with committed checkpoints at steps 10 and 20."""
    run_dir = orch_home / "runs" / "tiny-stopped"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / ".orch.lock").touch()  # as `orch submit` leaves it
    info = {"run_id": run_dir.name, "created": time.time(), "profile": "local", "recipe": "tiny", "steps": 20}
    (run_dir / "run.json").write_text(json.dumps({**info, "stop_before_end_s": 60}))
    (run_dir / "jobs.json").write_text(json.dumps([{"job_id": "2", "executor": "local", "submitted": time.time()}]))
    for step in (10, 20):
        folder = run_dir / "checkpoints" / f"step_{step:08d}"
        folder.mkdir()
        (folder / "COMMITTED.json").write_text(json.dumps({"step": step, "files": {}}))
    (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"step": 20, "dir": "step_00000020"}))
    return run_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refusal(*args: str) -> str:
    """`orch rollback ARGS` in this process: the one-paragraph OrchError that `orch` prints with exit code 2."""
    result = CliRunner().invoke(app, ["rollback", *args])
    assert isinstance(result.exception, OrchError), result.output
    return str(result.exception)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--to-step", "15", "--skip-steps", "15:16"], "no committed checkpoint at that step; .* steps: 10, 20"),
        (["--to-step", "10", "--skip-steps", "8:12"], "starts before --to-step 10"),
        (["--to-step", "10", "--skip-steps", "12:12"], "expected A:B, two step numbers with A below B"),
        (["--to-step", "10", "--skip-steps", "12-14"], "expected A:B"),
        (["--to-step", "10", "--skip-steps", "-3:4"], "expected A:B"),
        (["--to-step", "20", "--skip-steps", "20:21"], "nothing is left to train after step 20; pass --steps N"),
    ],
)
def test_orch_rollback_refuses_steps_that_do_not_fit_and_writes_nothing(stopped_run: Path, args, says):
    before = snapshot(stopped_run)
    assert re.search(says, refusal(stopped_run.name, *args))
    assert snapshot(stopped_run) == before


@pytest.mark.slow
def test_orch_rollback_refuses_while_the_run_has_a_live_job(stopped_run: Path):
    sleep, folder = "import time; time.sleep(60)", stopped_run / "submitit" / "%j"  # the run's own job
    controller = subprocess.Popen([sys.executable, "-c", sleep, SUBMITIT_CONTROLLER_MODULE, str(folder)])
    try:
        job = [{"job_id": str(controller.pid), "executor": "local", "submitted": time.time()}]
        (stopped_run / "jobs.json").write_text(json.dumps(job))
        before = snapshot(stopped_run)
        said = refusal(stopped_run.name, "--to-step", "10", "--skip-steps", "10:12")
        assert f"has a live job {controller.pid}" in said
        assert snapshot(stopped_run) == before
    finally:
        controller.kill()
        controller.wait()


def test_a_rollback_interrupted_before_its_resume_and_run_again_records_its_skip_once(stopped_run: Path):
    from orchestrator.cli.rollback import roll_back
    from orchestrator.core.rundir import Run

    run = Run(stopped_run)
    assert roll_back(run, 10, 12, 14, None) == [20]
    assert roll_back(run, 10, 12, 14, None) == []  # the same rollback again, no job in between
    assert [s.steps for s in read_skips(stopped_run)] == [(12, 14)]
    assert (stopped_run / "checkpoints" / "rolled_back_step_00000020").is_dir()
    assert json.loads((stopped_run / "checkpoints" / "latest.json").read_text())["step"] == 10


def test_after_orch_rollback_mlflow_and_orch_compare_show_the_steps_that_metrics_jsonl_has(stopped_run: Path):
    """Steps 1..20 sent to MLflow, then `orch rollback` to step 10, and steps 11..20 trained again (here written by
    hand), sent in one go: MLflow cannot delete points, so the MLflow run that has the undone steps is set aside and
    a new one gets the steps that stand. A resume's rollback of steps MLflow never had keeps the MLflow run."""
    import mlflow

    from jobs.tracking import MetricSpool, send
    from orchestrator.cli.rollback import roll_back
    from orchestrator.core.rundir import Run
    from orchestrator.tools.compare import read_history
    from orchestrator.tools.sync import rolled_back

    run, spool = Run(stopped_run), MetricSpool(stopped_run)
    for step in range(1, 21):
        spool.append(
            step, {"loss": 9 - step / 10, "grad_norm": 1.0, **({"goodput/percent": 50.0} if step == 20 else {})}
        )
    assert send(stopped_run, run.tracking_uri, 20, {}, {}) == 20
    first = run.mlflow.run_id
    roll_back(run, 10, 10, 13, None)
    assert read_history(run).series["loss"].steps.tolist() == list(range(1, 11))  # what orch compare reads
    assert rolled_back(run, run.mlflow)  # `orch sync` sends even with nothing new committed
    for step in range(11, 21):
        spool.append(step, {"loss": 5 - step / 10, **({"goodput/percent": 60.0} if step == 20 else {})})
    assert send(stopped_run, run.tracking_uri, 20, {}, {}) == 20
    state = run.mlflow
    client = mlflow.MlflowClient(run.tracking_uri)
    history = client.get_metric_history(state.run_id, "loss")
    assert state.run_id != first and sorted(m.step for m in history) == list(range(1, 21))  # each step once
    assert {m.step: m.value for m in history} == {e["step"]: e["metrics"]["loss"] for e in spool.entries()}
    assert not rolled_back(run, state)
    old = client.get_run(first)
    assert old.info.lifecycle_stage == "deleted" and old.data.tags["orch.rolled_back_to"] == "10"
    new = client.get_run(state.run_id)
    assert new.data.tags["orch.replaces"] == first and new.data.tags["goodput/percent"] == "60"  # a tag, not a chart
    assert "system/grad_norm" in new.data.metrics and not {"grad_norm", "goodput/percent"} & new.data.metrics.keys()
    assert client.get_experiment(state.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    spool.append(21, {"loss": 2.0})  # trained, never committed, dropped when the next job starts from step 20
    spool.rollback(20)
    assert send(stopped_run, run.tracking_uri, 20, {}, {}) == 20 and run.mlflow.run_id == state.run_id


# --- the guard and orch rollback, end to end --------------------------------------------------------

STEPS = 20  # checkpoints every 10 steps (the tiny recipe); the spike comes at step 13, after the one at step 10


def orch_in(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "ORCH_HOME": str(home), **env}
    environment.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, env=environment, cwd=ROOT
    )


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of a guarded tiny run of 20 steps whose data step 12 is poisoned (its step spikes × 100)."""
    tmp = tmp_path_factory.mktemp("guarded")
    recipe = yaml.safe_load((ROOT / "recipes/tiny.yaml").read_text())
    recipe["spike_guard"] = {"factor": 3.0, "window": 50, "min_steps": 5}
    (tmp / "guarded.yaml").write_text(yaml.safe_dump(recipe))
    submitted = orch_in(tmp, "submit", "--profile", "local-slurm", "--recipe", str(tmp / "guarded.yaml"), "--steps",
                        str(STEPS), "--wait", ORCH_CHAOS="spike@12")  # fmt: skip
    return tmp / "runs" / submitted_run_id(submitted)


def spooled_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@needs_slurm
def test_a_loss_spike_goes_back_to_the_last_checkpoint_and_skips_the_steps_since(
    guarded: Path, capsys: pytest.CaptureFixture[str]
):
    [skip] = read_skips(guarded)
    assert (skip.by, skip.steps, skip.data_steps) == ("guard", (10, 13), (10, 13))
    assert spooled_steps(guarded) == list(range(1, STEPS + 1))  # each step once, the spike and its rollback gone
    assert max(spooled_losses(guarded).values()) < 10  # the planted spike (× 100) was never kept
    lines = (guarded / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["metrics"]["skipped_steps"] for line in lines] == [0] * 10 + [3] * 10
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{guarded.parent.parent / 'mlflow.db'}")
    mlflow_run = json.loads((guarded / "mlflow.json").read_text())["run_id"]
    history = client.get_metric_history(mlflow_run, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # held back: never a step the guard undid
    assert {m.step: m.value for m in history} == spooled_losses(guarded)
    log = next((guarded / "submitit").glob("*/*_0_log.err")).read_text()
    assert "rolling back to the checkpoint at step 10 and skipping the data of steps 11..13" in log
    goodput = report_goodput(guarded.name, "a loss spike", capsys, ORCH_HOME=str(guarded.parent.parent))
    assert goodput["steps"]["rolled_back"] == 2 and goodput["parts_h"]["rolled_back"] > 0  # steps 11, 12 went back
    assert goodput["parts_h"]["idle"] == 0  # within the job: no interruption


@pytest.mark.slow
@needs_slurm
def test_orch_rollback_by_hand_trains_bitwise_what_the_guard_trained(guarded: Path, tmp_path: Path):
    """A copy of the guarded run as it would be had its guard not acted (no skip list; steps 1..10 are the same
    either way), rolled back by hand over the same steps: a new job from the checkpoint at step 10. Its MLflow store
    is a copy too, whose MLflow run has steps 1..20: after the rollback MLflow shows the steps trained again, once."""
    import mlflow

    by_hand = tmp_path / "runs" / guarded.name
    shutil.copytree(guarded, by_hand, symlinks=True)
    (by_hand / "skips.json").unlink()
    shutil.copy(guarded.parent.parent / "mlflow.db", tmp_path / "mlflow.db")
    uri, state = f"sqlite:///{tmp_path / 'mlflow.db'}", json.loads((by_hand / "mlflow.json").read_text())
    (by_hand / "mlflow.json").write_text(json.dumps({**state, "tracking_uri": uri}))
    rolled = orch_in(tmp_path, "rollback", by_hand.name, "--to-step", "10", "--skip-steps", "10:13", "--wait")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert f"MLflow run {state['run_id']} has steps through {STEPS}" in rolled.stdout
    client = mlflow.MlflowClient(uri)
    mlflow_run = json.loads((by_hand / "mlflow.json").read_text())["run_id"]
    history = client.get_metric_history(mlflow_run, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert {m.step: m.value for m in history} == spooled_losses(by_hand)
    set_aside = client.get_run(state["run_id"])
    assert set_aside.info.lifecycle_stage == "deleted" and set_aside.data.tags["orch.rolled_back_to"] == "10"
    [skip] = read_skips(by_hand)
    assert (skip.by, skip.steps, skip.data_steps) == ("hand", (10, 13), (10, 13))
    assert (by_hand / "checkpoints/rolled_back_step_00000020/COMMITTED.json").is_file()  # set aside, not deleted
    assert spooled_steps(by_hand) == list(range(1, STEPS + 1))
    assert spooled_losses(by_hand) == spooled_losses(guarded)
    weights, reference = final_weights(by_hand, STEPS), final_weights(guarded, STEPS)
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in weights)
