"""`orch compare`: the distance in steps at which two runs reach the same loss, read from the runs' metrics.jsonl
(what `orch status` reads), plotted and logged to MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from orchestrator.cli.commands.analysis import app
from orchestrator.core.errors import OrchError
from orchestrator.tools.compare import (
    centred_average,
    monotone_envelope,
    smoothed_envelope,
    smoothing_window,
    step_distance,
)
from tests.conftest import ROOT

OFFSET = 300
STEPS = np.arange(5, 4001, 5)


def analysis(*args: str) -> subprocess.CompletedProcess[str]:
    """The real `orch` command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
        cwd=ROOT,
    )


def decaying_loss(steps: np.ndarray) -> np.ndarray:
    return 3.0 + 5.0 * np.exp(-steps / 1500)


def fake_run_dir(home: Path, name: str, uri: str, mlflow_run_id: str | None) -> Path:
    """A run directory as `orch submit` and the job leave it, as far as `orch compare` reads it."""
    run_dir = home / "runs" / name
    run_dir.mkdir(parents=True)
    info = {"run_id": name, "created": time.time(), "profile": "local", "recipe": "tiny", "tracking_uri": uri}
    info.update(steps=int(STEPS[-1]), stop_before_end_s=0)
    (run_dir / "run.json").write_text(json.dumps(info))
    if mlflow_run_id:
        (run_dir / "mlflow.json").write_text(json.dumps({"run_id": mlflow_run_id, "sent_through": int(STEPS[-1])}))
    return run_dir


def write_spool(run_dir: Path, loss: np.ndarray, val_ppl: dict[int, float] | None = None) -> None:
    """RUN_DIR/metrics.jsonl as the job writes it: a line per step of STEPS, with the test perplexity where given."""
    val_ppl = val_ppl or {}
    lines = []
    for step, value in zip(STEPS.tolist(), loss.tolist(), strict=True):
        metrics = {"loss": value, **({"val_perplexity": val_ppl[step]} if step in val_ppl else {})}
        lines.append(json.dumps({"step": step, "time_ms": 0, "metrics": metrics}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def offset_runs(orch_home: Path, tmp_path: Path):
    """Two runs with MLflow runs in a real SQLite store: B's loss is A's delayed by OFFSET steps, each with its own
    noise. Each MLflow run holds a loss of 99 at every step that its metrics.jsonl no longer has (a rollback undid
    them): compare reads what `orch status` reads."""
    import mlflow
    from mlflow.entities import Metric

    uri = f"sqlite:///{orch_home / 'mlflow.db'}"
    orch_home.mkdir(parents=True)
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("orch", artifact_location=(tmp_path / "artifacts").as_uri())
    rng = np.random.default_rng(0)
    runs = {}
    for name, shift in (("run-a", 0), ("run-b", OFFSET)):
        loss = decaying_loss(STEPS - shift) + rng.normal(0, 0.02, len(STEPS))
        val_ppl = {s: float(np.exp(decaying_loss(np.array(s - shift)) + 0.1)) for s in range(500, 4001, 500)}
        run_id = client.create_run(experiment_id, run_name=name, tags={"orch.run_id": name}).info.run_id
        client.log_batch(run_id, metrics=[Metric("loss", 99.0, 0, int(s)) for s in STEPS[-100:]])
        write_spool(fake_run_dir(orch_home, name, uri, run_id), loss, val_ppl)
        runs[name] = run_id
    return client, runs


def test_the_centred_average_follows_a_straight_line_to_its_ends_and_is_the_mean_of_the_window_within():
    line = np.arange(10, dtype=float) * -0.5 + 8
    assert centred_average(line, 5).tolist() == pytest.approx(line.tolist())  # no lag, at the ends neither
    assert centred_average(np.array([4.0, 2.0, 6.0, 0.0, 5.0]), 3).tolist() == [4.0, 4.0, 8 / 3, 11 / 3, 5.0]
    assert centred_average(np.array([1.0, 2.0]), 9).tolist() == [1.0, 2.0]


def test_the_smoothing_window_is_odd_and_at_most_a_tenth_of_the_points():
    assert [smoothing_window(50, points) for points in (80, 800, 4000, 5)] == [7, 49, 49, 1]
    assert smoothing_window(1, 4000) == 1


def test_smoothing_a_short_falling_loss_does_not_lag_it():
    """`--smooth 50` on an 80-point run: a trailing mean of 50 points ended 0.8 above the loss it smoothed."""
    steps = np.arange(1, 81)
    truth = 3.0 + 6.0 * np.exp(-steps / 40)
    noisy = truth + np.random.default_rng(1).normal(0, 0.01, len(steps))
    trailing = np.convolve(noisy, np.ones(50))[49:80] / 50
    assert trailing[-1] - truth[-1] > 0.75  # what the old smoothing did
    smoothed = centred_average(noisy, smoothing_window(50, len(steps)))
    assert np.abs(smoothed - truth).max() < 0.02


def test_monotone_envelope_is_the_lowest_value_so_far():
    assert monotone_envelope(np.array([5.0, 4.0, 4.5, 3.0, 3.5])).tolist() == [5.0, 4.0, 4.0, 3.0, 3.0]


def test_step_distance_recovers_an_exact_offset():
    steps = np.arange(0, 2000)
    envelope_a = smoothed_envelope(decaying_loss(steps), 1)
    envelope_b = smoothed_envelope(decaying_loss(steps - OFFSET), 1)
    found = step_distance(steps, envelope_a, steps, envelope_b)
    assert len(found.step_a) == len(steps) - OFFSET  # B reaches A's last losses only after the last step
    assert set(found.distance.tolist()) == {OFFSET}


def test_step_distance_leaves_out_losses_the_other_run_never_reaches():
    steps = np.array([10, 20, 30])
    found = step_distance(steps, np.array([5.0, 4.0, 3.0]), steps, np.array([4.5, 4.0, 3.5]))
    assert found.step_a.tolist() == [10, 20]
    assert found.step_b.tolist() == [10, 20]


def test_step_distance_refuses_an_envelope_that_rises():
    steps = np.array([1, 2])
    with pytest.raises(ValueError, match="envelope_b rises"):
        step_distance(steps, np.array([2.0, 1.0]), steps, np.array([1.0, 2.0]))


def test_compare_recovers_a_known_step_offset_and_logs_the_plots_to_both_runs(offset_runs, orch_home: Path):
    client, runs = offset_runs
    result = analysis("compare", "run-a", "run-b", "--smooth", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    output = orch_home / "compare" / "run-a-vs-run-b"
    report = json.loads((output / "compare.json").read_text())
    assert report["median_distance"] == pytest.approx(OFFSET, abs=15)
    assert report["median_offset"] == pytest.approx(OFFSET, abs=15)  # B needs more steps
    assert report["runs"]["b"]["final_loss"] < 90 and report["runs"]["b"]["last_step"] == STEPS[-1]  # not MLflow's
    assert (report["smooth_window"], report["smooth_asked"]) == (19, 20)  # odd, centred on its point
    assert "Median distance for the same smoothed loss" in result.stdout
    plots = ["loss.png", "val_perplexity.png", "step_distance.png"]
    assert report["plots"] == plots
    for name in plots:
        assert (output / name).read_bytes().startswith(b"\x89PNG"), name
    for mlflow_run_id in runs.values():
        logged = {Path(a.path).name for a in client.list_artifacts(mlflow_run_id, "compare/run-a-vs-run-b")}
        assert logged == {*plots, "compare.json"}


def spooled_run(home: Path, name: str, loss: np.ndarray) -> None:
    """A run that MLflow has not heard of yet: its losses are only in RUN_DIR/metrics.jsonl."""
    run_dir = fake_run_dir(home, name, f"sqlite:///{home / 'mlflow.db'}", None)
    write_spool(run_dir, loss)


def test_compare_of_runs_that_mlflow_has_no_run_for(orch_home: Path, tmp_path: Path):
    spooled_run(orch_home, "spool-a", decaying_loss(STEPS))
    spooled_run(orch_home, "spool-b", decaying_loss(STEPS - 100))
    output = tmp_path / "out"
    result = analysis("compare", "spool-a", "spool-b", "--output", str(output), "--smooth", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((output / "compare.json").read_text())
    assert report["runs"]["a"]["points"] == len(STEPS)
    assert report["median_distance"] == pytest.approx(100, abs=5)
    assert report["plots"] == ["loss.png", "step_distance.png"]
    assert "the test perplexity plot is skipped" in result.stdout
    assert "not logged to MLflow" in result.stdout
    assert not (orch_home / "mlflow.db").exists()  # reading never creates a store


def test_compare_says_when_b_never_reaches_a_loss_of_a(orch_home: Path):
    spooled_run(orch_home, "low", decaying_loss(STEPS))
    spooled_run(orch_home, "high", decaying_loss(STEPS) + 10)
    result = CliRunner().invoke(app, ["compare", "low", "high"])
    assert result.exit_code == 0, result.output
    assert "B never reaches a smoothed loss of A" in result.output
    report = json.loads((orch_home / "compare" / "low-vs-high" / "compare.json").read_text())
    assert report["median_distance"] is None and report["distance"]["steps"] == []


def test_compare_refuses_a_smoothing_window_below_one(orch_home: Path):
    result = CliRunner().invoke(app, ["compare", "run-a", "run-b", "--smooth", "0"])
    assert isinstance(result.exception, OrchError)
    assert "--smooth is 0" in str(result.exception)


def test_compare_refuses_a_run_that_has_no_loss_yet(orch_home: Path):
    for name in ("empty-a", "empty-b"):
        fake_run_dir(orch_home, name, f"sqlite:///{orch_home / 'mlflow.db'}", None)
    result = CliRunner().invoke(app, ["compare", "empty-a", "empty-b"])
    assert isinstance(result.exception, OrchError)
    assert "Run empty-a has no loss yet" in str(result.exception)
