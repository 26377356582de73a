"""A job belongs to its run: the run directory it writes to, as the scheduler knows it, not whichever directory names
its id (issue 28). A copy of a running run never stops, nor counts as alive, the original's job; a local job's ranks
die with its controller, so `orch resume` never starts a second job beside them; and a hang-up of the terminal during
`--wait` stops the following, never the training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from orchestrator.core.compat import SUBMITIT_TASK_MODULE
from orchestrator.core.files import write_json_atomic
from orchestrator.core.runfiles import RunInfo
from orchestrator.core.schedulers import cancel_job, foreign_owner, job_alive
from orchestrator.core.schedulers.base import ForeignJob, Job
from orchestrator.core.schedulers.local import CONTROLLER_MARKERS, JOB_ID_VARIABLE, named_folder
from tests.conftest import (
    ROOT,
    module_home,
    needs_slurm,
    orch,
    status_json,
    wait_for_step,
    wait_until,
)
from tests.test_settings import FOLDER, fake_controller, fake_squeue, local_job, slurm_jobs, squeue_lines

COPY = Path("/runs/COPY/submitit")  # where a copy of FOLDER's run keeps its jobs' files


def test_a_slurm_job_that_writes_to_another_run_is_not_this_runs_and_gets_no_scancel(tmp_path, monkeypatch):
    fake_squeue(tmp_path, monkeypatch, squeue_lines(("5", "RUNNING")))
    scancel = tmp_path / "scancel"
    scancel.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scancelled"}\n')
    scancel.chmod(0o755)
    [original] = slurm_jobs("5")
    copied = Job("slurm", "5", original.submitted, COPY)
    assert job_alive(original) and not job_alive(copied)
    assert foreign_owner(copied) == FOLDER and foreign_owner(original) is None
    with pytest.raises(ForeignJob, match="job 5 is not this run's: it writes to /runs/RUN/submitit"):
        cancel_job(copied)
    assert not (tmp_path / "scancelled").exists()


def test_a_local_controller_of_another_run_is_not_this_runs_and_gets_no_signal():
    controller = fake_controller(FOLDER)
    try:
        copied = local_job(controller.pid, folder=COPY)
        assert job_alive(local_job(controller.pid)) and not job_alive(copied)
        with pytest.raises(ForeignJob):
            cancel_job(copied)
        assert controller.poll() is None
    finally:
        controller.kill()
        controller.wait()


def test_ranks_that_outlived_their_controller_keep_the_job_alive_until_cancelled(tmp_path: Path):
    """Ranks found by their command line (the job's folder) and environment (its id), whatever their parent."""
    controller = subprocess.Popen([sys.executable, "-c", "pass"])
    controller.wait()  # its id stays in the ranks' environment after it is gone, as after a kill -9
    sleep = "import time; time.sleep(60)"
    rank = subprocess.Popen(
        [sys.executable, "-c", sleep, SUBMITIT_TASK_MODULE, str(FOLDER / "%j")],
        env={**os.environ, JOB_ID_VARIABLE: str(controller.pid)},
    )
    try:
        job = local_job(controller.pid)
        assert job_alive(job) and not job_alive(local_job(controller.pid, folder=COPY))
        assert cancel_job(job)
        assert rank.wait(timeout=30) == -signal.SIGKILL
        assert not job_alive(job)
    finally:
        rank.kill()
        rank.wait()


@needs_slurm
def test_cancelling_a_copy_never_cancels_the_originals_slurm_job(tmp_path_factory: pytest.TempPathFactory):
    """A held job (it never starts: nothing to wait for) queued as submitit queues a run's job."""
    with module_home(tmp_path_factory, "slurm-copy") as home:
        original = home / "runs" / "original"
        info = RunInfo(run_id="original", created=time.time(), profile="local-slurm", recipe="tiny", steps=10,
                       stop_before_end_s=0)  # fmt: skip
        write_json_atomic(original / "run.json", info.model_dump())
        output = original / "submitit" / "%j" / "%j_%t_log.out"
        queued = subprocess.run(["sbatch", "--parsable", "--hold", "--job-name=orch-original", f"--output={output}",
                                 "--wrap=sleep 60"], capture_output=True, text=True, check=True)  # fmt: skip
        job_id = queued.stdout.strip().split(";")[0]
        try:
            write_json_atomic(original / "jobs.json", [{"job_id": job_id, "executor": "slurm", "submitted": 0}])
            subprocess.run(["cp", "-a", original, home / "runs" / "copy"], check=True)
            refused = orch("cancel", "copy")
            assert refused.returncode == 2 and f"job {job_id} is not this run's" in refused.stderr, refused.stderr
            assert status_json("original")["state"] == "queued"
            copied = status_json("copy")
            assert copied["state"] == "failed" and f"job {job_id} is not this run's" in copied["error"]
            assert orch("cancel", "original").returncode == 0
            assert status_json("original")["state"] == "cancelled"
        finally:
            subprocess.run(["scancel", "--", job_id], capture_output=True)


# --- a local run, trained through the module ----------------------------------------------------------------------


def run_processes(run_dir: Path) -> list[psutil.Process]:
    """The live controllers and ranks whose command line names the run's submitit folder."""
    folder = str(run_dir.resolve() / "submitit")
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and folder in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def job_of(process: psutil.Process) -> str:
    """The job a controller (its PID) or a rank (its environment) belongs to."""
    controller = named_folder(process.cmdline(), *CONTROLLER_MARKERS) is not None
    return str(process.pid) if controller else process.environ()[JOB_ID_VARIABLE]


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`orch submit --wait` of a long run, in its own process group as a terminal's foreground job is, once its
    job trains; whatever job of the run is left at the end is cancelled."""
    with module_home(tmp_path_factory, "ownership") as home:
        with open(home.parent / "following.log", "w") as log:
            following = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "submit", "--steps", "2000", "--wait"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            runs = home / "runs"
            wait_until(lambda: runs.is_dir() and any(runs.iterdir()), "the run directory", 120, 0.2)
            [run_dir] = runs.iterdir()
            wait_for_step(run_dir, 1)
            yield following, run_dir
        finally:
            following.kill()
            following.wait()
            if status_json(run_dir.name)["state"] in ("queued", "running", "stalled"):
                orch("cancel", run_dir.name)


@pytest.mark.slow
def test_a_hang_up_during_wait_stops_the_following_and_the_job_trains_on(training):
    following, run_dir = training
    os.killpg(following.pid, signal.SIGHUP)  # what an SSH connection that drops sends the terminal's jobs
    assert following.wait(timeout=60) == -signal.SIGHUP
    step = status_json(run_dir.name)["step"]
    wait_for_step(run_dir, step + 2)
    assert status_json(run_dir.name)["state"] == "running"


@pytest.mark.slow
def test_cancelling_a_copy_of_a_running_run_leaves_the_originals_job_training(training):
    _, run_dir = training
    copy = run_dir.with_name(f"copy-{run_dir.name}")
    subprocess.run(["cp", "-a", run_dir, copy])  # while it trains: a file renamed meanwhile is left out, and said
    assert (copy / "jobs.json").is_file()
    refused = orch("cancel", copy.name)
    assert refused.returncode == 2 and "is not this run's" in refused.stderr, refused.stderr
    copied = status_json(copy.name)
    assert copied["state"] == "failed" and "is not this run's" in copied["error"]
    step = status_json(run_dir.name)["step"]
    wait_for_step(run_dir, step + 2)
    assert status_json(run_dir.name)["state"] == "running"


@pytest.mark.slow
def test_a_killed_local_controller_takes_its_ranks_down_and_resume_starts_one_job(training):
    _, run_dir = training
    job_id = status_json(run_dir.name)["job_ids"][-1]
    ranks = psutil.Process(int(job_id)).children()
    assert ranks
    os.kill(int(job_id), signal.SIGKILL)
    wait_until(lambda: all(gone(rank) for rank in ranks), "the ranks to die with their controller", 60, 0.1)
    assert status_json(run_dir.name)["state"] == "failed"

    resumed = orch("resume", run_dir.name)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    new_job = status_json(run_dir.name)["job_ids"][-1]
    assert new_job != job_id
    assert {job_of(process) for process in run_processes(run_dir)} == {new_job}
