"""A damaged run directory never takes orch down: each run file in turn is truncated, garbled, emptied, given the
wrong type or replaced by a symbolic link, in one run of a store that holds a healthy one too.

Invariants checked for every case: no traceback (an OrchError is the one-paragraph message `orch` prints), the
healthy run is still listed as it was, the damaged one is listed (as damaged where the file says what the run is),
and no process outside the run ever gets a signal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from orchestrator.cli import submit
from orchestrator.cli.app import app
from orchestrator.core.errors import OrchError
from tests.conftest import orch, status_json, submitted_run_id

RUN_FILES = [
    "run.json",
    "jobs.json",
    "progress.json",
    "attempts.json",
    "mlflow.json",
    "metrics.jsonl",
    "checkpoints/latest.json",
    "checkpoints/step_00000010/COMMITTED.json",
    "profile.yaml",
    "recipe.yaml",
]
DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbled": lambda data: bytes(b ^ 0x5A for b in data[:64]) + data[64:],
    "empty": lambda data: b"",
    "wrong type": lambda data: b'"a string where a mapping or list belongs"',
    "not UTF-8": lambda data: b"\xff\xfe\x00" + data,
}
IDENTIFYING = {"run.json", "jobs.json", "progress.json", "attempts.json", "mlflow.json"}  # what status reads


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run, trained to completion by the local profile (10 steps, checkpoints at 5 and 10)."""
    home = tmp_path_factory.mktemp("template") / "orch-home"
    env = {**os.environ, "ORCH_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", "--steps", "10", "--set", "signal_delay_s=5", "--wait"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=Path(__file__).parent.parent,
    )
    submitted_run_id(result)
    return home


def store_with_two_runs(template: Path, home: Path) -> tuple[str, str]:
    """A copy of the template's store holding the run twice: (damaged-to-be, healthy)."""
    [source] = (template / "runs").iterdir()
    shutil.copytree(template, home)
    healthy = home / "runs" / source.name
    damaged = healthy.with_name(f"damaged-{source.name}")
    shutil.copytree(healthy, damaged, symlinks=True)
    return damaged.name, healthy.name


def invoke(*args: str) -> tuple[int, str]:
    """The CLI in this process (fast enough for hundreds of cases): an OrchError is what `orch` prints as its one
    paragraph and exit code 2; any other exception is a crash."""
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit | OrchError):
        raise AssertionError(f"orch {' '.join(args)} crashed") from result.exception
    return (2 if isinstance(result.exception, OrchError) else result.exit_code), result.output


def check_store(damaged: str, healthy: str, file: str) -> None:
    code, out = invoke("status", "--json")
    assert code == 0, out
    listed = {s["run_id"]: s for s in json.loads(out)}
    assert listed[healthy]["state"] == "completed" and listed[healthy]["step"] == 10
    assert damaged in listed
    if file in IDENTIFYING:
        assert listed[damaged]["state"] in ("damaged", "completed", "failed")
        if listed[damaged]["state"] == "damaged":
            assert listed[damaged]["error"].startswith(f"damaged: {Path(file).name}:")
    code, out = invoke("ls")
    assert code == 0 and healthy in out and damaged in out, out
    code, out = invoke("status", damaged)
    assert code in (0, 2), out


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("file", RUN_FILES)
def test_a_damaged_run_file_marks_its_run_and_leaves_the_others(template, tmp_path, monkeypatch, file, kind):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, healthy = store_with_two_runs(template, tmp_path / "home")
    path = tmp_path / "home" / "runs" / damaged / file
    path.write_bytes(DAMAGE[kind](path.read_bytes()))
    check_store(damaged, healthy, file)


@pytest.mark.parametrize("file", ["run.json", "jobs.json", "progress.json", "checkpoints/latest.json"])
def test_a_symbolic_link_in_place_of_a_run_file_is_damage_not_a_path_to_follow(template, tmp_path, monkeypatch, file):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, healthy = store_with_two_runs(template, tmp_path / "home")
    path = tmp_path / "home" / "runs" / damaged / file
    path.unlink()
    path.symlink_to(tmp_path / "nowhere")
    check_store(damaged, healthy, file)


def fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def link_to_dev_zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def link_outside_the_run(path: Path) -> None:
    """The run's own file moved out of the run and linked back: valid content, but not a file of the run."""
    outside = path.parent.parent / f"outside-{path.name}"
    if path.exists():
        path.rename(outside)
    else:
        outside.touch()
    path.symlink_to(outside)


@contextmanager
def answers_within(seconds: int) -> Iterator[None]:
    """Fail instead of hanging the suite where a command waits forever (a FIFO opened for reading)."""

    def hung(*_: object) -> None:
        raise AssertionError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("special", [fifo, link_to_dev_zero, link_outside_the_run])
@pytest.mark.parametrize("file", [*RUN_FILES, ".orch.lock"])
def test_a_special_file_in_place_of_a_run_file_is_damage_never_read_or_waited_on(
    template, tmp_path, monkeypatch, file, special
):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, healthy = store_with_two_runs(template, tmp_path / "home")
    path = tmp_path / "home" / "runs" / damaged / file
    special(path)
    with answers_within(60):
        check_store(damaged, healthy, file)
        for command in (("cancel", damaged), ("repair", damaged, "--check")):
            code, out = invoke(*command)
            assert code in (0, 1, 2), out


def test_a_metrics_line_with_a_string_for_a_number_is_left_out_and_found_by_repair(template, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, healthy = store_with_two_runs(template, tmp_path / "home")
    spool = tmp_path / "home" / "runs" / damaged / "metrics.jsonl"
    with spool.open("a") as f:
        f.write(json.dumps({"step": 11, "time_ms": 1, "metrics": {"loss": "high"}}) + "\n")
    check_store(damaged, healthy, "metrics.jsonl")
    code, out = invoke("repair", damaged, "--check")
    assert code == 2 and "1 unreadable lines" in out, out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=st.sampled_from(RUN_FILES), payload=st.binary(max_size=300) | st.from_type(type(None)))
def test_any_bytes_in_any_run_file_never_crash_orch(template, tmp_path_factory, file, payload):
    home = tmp_path_factory.mktemp("fuzz") / "home"
    os.environ["ORCH_HOME"] = str(home)
    try:
        damaged, healthy = store_with_two_runs(template, home)
        path = home / "runs" / damaged / file
        if payload is None:
            path.unlink()
        else:
            path.write_bytes(payload)
        check_store(damaged, healthy, file)
    finally:
        del os.environ["ORCH_HOME"]


def sacrificial_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


@pytest.mark.parametrize("job_id", ["-1", "0", "1", "--user=root", "12; rm -rf /", "99999999999", "own pid"])
def test_job_ids_from_a_run_directory_never_signal_a_process_outside_the_run(template, tmp_path, monkeypatch, job_id):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    # what a resume would start is not at stake here, only what it signals first: its jobs would train on in the
    # background through the tests that follow
    launched: list[str] = []
    monkeypatch.setattr(submit, "launch", lambda run, profile, plan: launched.append(run.id) or "not-started")
    damaged, _ = store_with_two_runs(template, tmp_path / "home")
    bystander = sacrificial_process()
    try:
        for executor, ids in (("local", [job_id, str(bystander.pid)]), ("slurm", [job_id])):
            ids = [str(os.getpid()) if i == "own pid" else i for i in ids]
            for each in ids:
                jobs = [{"job_id": each, "executor": executor, "submitted": time.time() - 3600}]
                (tmp_path / "home" / "runs" / damaged / "jobs.json").write_text(json.dumps(jobs))
                for command in (("cancel", damaged), ("resume", damaged, "--force"), ("status", damaged)):
                    invoke(*command)
        time.sleep(0.3)
        assert bystander.poll() is None, "a process outside the run was signalled"
        assert launched, "no resume got past stopping the recorded job"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
def test_orch_repair_rebuilds_what_other_files_allow_and_the_run_resumes(template, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, _ = store_with_two_runs(template, tmp_path / "home")
    run_dir = tmp_path / "home" / "runs" / damaged
    (run_dir / "jobs.json").write_text("{torn")
    (run_dir / "checkpoints/latest.json").write_text('{"step": 999, "dir": "step_00000999"}')
    with (run_dir / "metrics.jsonl").open("a") as spool:
        spool.write("garbage that is not json}\n")
    (run_dir / "progress.json").write_text("")
    assert status_json(damaged)["state"] == "damaged"

    check = orch("repair", damaged, "--check")
    assert check.returncode == 2 and "jobs.json" in check.stdout and "damaged" in check.stdout, check.stdout
    assert "{torn" in (run_dir / "jobs.json").read_text()  # --check changes nothing
    repaired = orch("repair", damaged)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert json.loads((run_dir / "checkpoints/latest.json").read_text())["step"] == 10
    assert "garbage" not in (run_dir / "metrics.jsonl").read_text()
    assert status_json(damaged)["state"] in ("failed", "queued", "completed")

    resumed = orch("resume", damaged, "--steps", "12", "--wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert status_json(damaged)["step"] == 12


@pytest.mark.slow
def test_orch_repair_sets_aside_a_checkpoint_whose_commit_marker_is_damaged(template, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, _ = store_with_two_runs(template, tmp_path / "home")
    checkpoints = tmp_path / "home" / "runs" / damaged / "checkpoints"
    (checkpoints / "step_00000010/COMMITTED.json").write_text('"a string where a mapping belongs"')

    check = orch("repair", damaged, "--check")
    assert check.returncode == 2 and "step_00000010" in check.stdout, check.stdout
    repaired = orch("repair", damaged)
    assert (checkpoints / "damaged_step_00000010").is_dir(), repaired.stdout
    # the template keeps one checkpoint: none is left, and latest.json keeps naming it so no job trains from step 0
    assert repaired.returncode == 2 and "--from-scratch" in repaired.stdout, repaired.stdout
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 10


def test_a_spool_planted_as_a_link_is_never_appended_through(tmp_path):
    from jobs.tracking import MetricSpool
    from orchestrator.core.files import NotAPlainFile

    run_dir, outside = tmp_path / "run", tmp_path / "outside.jsonl"
    run_dir.mkdir()
    outside.write_text("kept\n")
    spool = MetricSpool(run_dir)
    for step in (1, 2, 3):
        spool.append(step, {"loss": 1.0 / step})
    spool.rolled_back.symlink_to(outside)
    with pytest.raises(NotAPlainFile):
        spool.rollback(1)
    spool.path.unlink()
    spool.path.symlink_to(outside)
    with pytest.raises(NotAPlainFile):
        spool.append(4, {"loss": 0.25})
    assert outside.read_text() == "kept\n"


def test_a_diverged_loss_of_nan_is_shown_not_taken_for_damage(template, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    diverged, healthy = store_with_two_runs(template, tmp_path / "home")
    path = tmp_path / "home" / "runs" / diverged / "progress.json"
    path.write_text(path.read_text().replace('"loss": ', '"loss": NaN, "was": '))
    code, out = invoke("status", "--json")
    assert code == 0, out
    assert {s["run_id"]: s["state"] for s in json.loads(out)}[diverged] == "completed"
