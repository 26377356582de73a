"""What a careless or hostile user does to a run, end to end with real jobs: damaged checkpoints and data, refused
submissions, Ctrl-C on --wait, a run directory moved to another ORCH_HOME. Each gets a one-paragraph error or the
right result, never a traceback and never a silent restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    module_home,
    needs_slurm,
    orch,
    run_dir_of,
    spooled_losses,
    status_json,
    submitted_run_id,
    wait_for_step,
)

pytestmark = pytest.mark.slow


def assert_refused(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An ORCH_HOME with one 20-step run (checkpoints at steps 10 and 20) that each test below copies and mistreats:
    training it once per test would cost each a job's start and 20 steps."""
    with module_home(tmp_path_factory, "trained") as home:
        return home, submitted_run_id(orch("submit", "--steps", "20", "--wait"))


def copy_of(trained: tuple[Path, str], orch_home: Path) -> tuple[str, Path]:
    """The trained run in this test's ORCH_HOME (its MLflow store too): its id and its directory."""
    home, run_id = trained
    shutil.copytree(home, orch_home, symlinks=True)
    return run_id, run_dir_of(orch_home, run_id)


def damage_checkpoint(run_dir: Path, step: int) -> None:
    shard = sorted((run_dir / f"checkpoints/step_{step:08d}").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])


def test_when_every_checkpoint_is_damaged_the_job_stops_instead_of_training_from_step_0(orch_home, trained):
    run_id, run_dir = copy_of(trained, orch_home)
    first_losses = spooled_losses(run_dir)
    for step in (10, 20):
        damage_checkpoint(run_dir, step)

    result = orch("resume", run_id, "--steps", "30", "--wait")
    assert_refused(result, "no committed checkpoint can be loaded", "nothing was trained", "--from-scratch")
    summary = status_json(run_id)
    assert summary["state"] == "failed" and "no committed checkpoint can be loaded" in summary["error"]
    assert " on " in summary["error"] and "(rank " in summary["error"]  # which rank, on which host
    assert max(spooled_losses(run_dir)) == 20  # nothing trained again

    result = orch("resume", run_id, "--steps", "30", "--from-scratch", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    retrained = spooled_losses(run_dir)
    assert sorted(retrained) == list(range(1, 31)) and status_json(run_id)["step"] == 30
    assert {step: retrained[step] for step in first_losses} == first_losses  # trained again from step 0, same seed


def test_retention_keeps_the_last_good_checkpoint_before_a_damaged_one(orch_home, trained):
    run_id, run_dir = copy_of(trained, orch_home)
    damage_checkpoint(run_dir, 20)
    result = orch("resume", run_id, "--steps", "40", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000010", "step_00000030", "step_00000040"]  # keep_last 2, and step 10 protected
    assert "10" in json.loads((run_dir / "checkpoints/protected.json").read_text())


def test_a_data_shard_overwritten_with_noise_is_refused_before_training(orch_home, trained):
    run_id, run_dir = copy_of(trained, orch_home)
    shard = run_dir / "data/train/shard_00000.bin"
    shard.write_bytes(os.urandom(shard.stat().st_size))

    result = orch("resume", run_id, "--steps", "22", "--wait")
    assert_refused(result, "the training data is damaged", "shard_00000.bin", "changed after it was prepared")
    assert max(spooled_losses(run_dir)) == 20
    logs = orch("logs", run_id)
    assert "the training data is damaged" in logs.stderr and logs.returncode == 0


@needs_slurm
def test_a_submission_the_scheduler_refuses_leaves_no_run_behind(orch_home):
    # A feature no node has: only sbatch knows (orch's own checks of the partition pass).
    result = orch(
        "submit", "--profile", "local-slurm", "--steps", "2", "--set", "slurm.extra_sbatch={constraint: nowhere}"
    )
    assert_refused(result, "The slurm scheduler refused the job", "Invalid feature specification")
    assert not any((orch_home / "runs").iterdir()) if (orch_home / "runs").is_dir() else True
    assert orch("ls").stdout.strip() == ""


@needs_slurm
def test_a_refused_resume_leaves_the_run_as_it_was(orch_home, trained):
    run_id, run_dir = copy_of(trained, orch_home)
    before = {name: (run_dir / name).read_bytes() for name in ("run.json", "profile.yaml", "jobs.json")}
    result = orch("resume", run_id, "--steps", "22", "--profile", "local-slurm", "--set", "slurm.partition=nowhere")
    assert_refused(result, "which this cluster does not have", "nowhere")
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    fewer = orch("resume", run_id, "--steps", "13")  # the run has committed step 20: a resume only trains further
    assert_refused(fewer, "has committed step 20; --steps 13 is below it", "orch rollback")
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert orch("resume", run_id, "--steps", "22", "--wait").returncode == 0  # and it still resumes


def test_ctrl_c_on_wait_stops_following_and_the_training_goes_on(orch_home):
    following = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "submit", "--steps", "2000", "--wait"],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job has
    )
    try:
        until = time.time() + 300
        while not (orch_home / "runs").is_dir() or not any((orch_home / "runs").iterdir()):
            assert time.time() < until and following.poll() is None
            time.sleep(0.2)
        [run_dir] = (orch_home / "runs").iterdir()
        wait_for_step(run_dir, 3)
        os.killpg(following.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        output = following.communicate(timeout=60)[0]
    finally:
        if following.poll() is None:
            following.kill()
    assert following.returncode == 130, output
    assert "Stopped following run" in output and "orch cancel" in output and "Traceback" not in output
    step = status_json(run_dir.name)["step"]
    wait_for_step(run_dir, step + 3)  # still training
    assert status_json(run_dir.name)["state"] == "running"
    assert orch("cancel", run_dir.name).returncode == 0
    until = time.time() + 120
    while status_json(run_dir.name)["state"] != "cancelled":
        assert time.time() < until, status_json(run_dir.name)
        time.sleep(0.5)


def test_a_run_moved_to_another_orch_home_reports_to_that_store(orch_home, trained, tmp_path, monkeypatch):
    run_id, _ = copy_of(trained, orch_home)
    other_home = tmp_path / "other-home"
    (other_home / "runs").mkdir(parents=True)
    shutil.move(run_dir_of(orch_home, run_id), other_home / "runs" / run_id)
    monkeypatch.setenv("ORCH_HOME", str(other_home))

    result = orch("resume", run_id, "--steps", "30", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    with sqlite3.connect(other_home / "mlflow.db") as store:
        steps = [row[0] for row in store.execute("SELECT step FROM metrics WHERE key = 'loss' ORDER BY step")]
    assert steps == list(range(1, 31))  # every step, in the store the run lives beside now


def test_a_garbled_metrics_line_and_latest_json_do_not_block_a_resume(orch_home, trained):
    run_id, run_dir = copy_of(trained, orch_home)
    with (run_dir / "metrics.jsonl").open("a") as spool:
        spool.write('{"step": "twenty-one", "garbled": }\n')
    (run_dir / "checkpoints/latest.json").write_text("{not json")

    result = orch("resume", run_id, "--steps", "30", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(spooled_losses(run_dir)) == list(range(1, 31))
    assert json.loads((run_dir / "checkpoints/latest.json").read_text())["step"] == 30
