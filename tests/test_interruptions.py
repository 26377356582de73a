"""What an interrupted submission, a full disk and a job whose requeues ran out leave behind: a run that says what it
is and resumes, or one paragraph and exit code 2, never a traceback or a silent stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from orchestrator.cli import submit
from orchestrator.core.rundir import Run
from tests.conftest import ROOT, needs_root, orch, small_disk, status_json, wait_until


def test_a_run_whose_submission_was_killed_says_so_and_resume_submits_it(orch_home, monkeypatch):
    submitting = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "submit", "--steps", "4"],
        cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: list(orch_home.glob("runs/*/run.json")), "the run's creation", poll_s=0.05)
        os.killpg(submitting.pid, signal.SIGKILL)  # while it attaches the data: before a job is queued
    finally:
        submitting.wait()
    [run_dir] = (orch_home / "runs").iterdir()
    run = Run(run_dir)
    summary = status_json(run.id)
    assert summary["state"] == "unsubmitted" and f"orch resume {run.id}" in summary["error"], summary
    with run.lock():
        assert run.state() == "queued"  # a submission holds the lock until its job is recorded

    launched: list[str] = []  # the job is not at stake: what the run holds when it is queued is
    monkeypatch.setattr(submit, "launch", lambda run, profile, plan, *_: launched.append(run.id) or "not-started")
    assert submit.resume(run, None, None, [], force=False) == "not-started" and launched == [run.id]
    for made in ("data/tokens.json", "data/fingerprint.json", "code/manifest.json"):
        assert (run_dir / made).is_file(), made


def test_a_job_that_asked_for_a_requeue_after_its_last_says_why_and_where_resume_continues(tmp_path):
    run_dir, now = tmp_path / "run", time.time()
    run_dir.mkdir()
    info = {"run_id": "run", "created": now, "profile": "local", "recipe": "tiny", "steps": 100, "stop_before_end_s": 0}
    (run_dir / "run.json").write_text(json.dumps(info))
    (run_dir / "jobs.json").write_text(json.dumps([{"job_id": "4242", "executor": "local", "submitted": now}]))
    starts = [{"job_id": "4242", "start_step": 10 * k, "started": now, "ended": "requeued"} for k in range(6)]
    (run_dir / "attempts.json").write_text(json.dumps(starts))
    progress = {"state": "requeued", "step": 60, "steps": 100, "job_id": "4242", "updated": now}
    (run_dir / "progress.json").write_text(json.dumps({**progress, "last_checkpoint_step": 60}))
    summary = Run(run_dir).summary(alive=False)
    assert summary["state"] == "failed", summary
    assert "after the last of the requeues its plan allows" in summary["error"], summary["error"]
    assert "`orch resume run` continues from the checkpoint at step 60" in summary["error"], summary["error"]


def test_a_resume_waits_for_the_scheduler_to_let_go_of_a_job_that_reported_its_end_and_only_of_such_a_job(tmp_path):
    """Slurm lists a job that has ended as COMPLETING while it cleans up after it: a resume right after a run completed
    (`orch resume RUN --steps MORE`) waits for that instead of refusing it as a live job."""
    run_dir, now = tmp_path / "run", time.time()
    run_dir.mkdir()
    run = Run(run_dir)
    assert submit.settle_s(run, "4242") == 0  # no heartbeat: a job that never started is not waited for
    for state, job_id, waits in [
        ("completed", "4242", True),
        ("failed", "4242", True),
        ("running", "4242", False),  # alive as far as the run knows: refused at once, as before
        ("requeued", "4242", False),  # it asked to run again: the scheduler lists it on purpose
        ("completed", "4141", False),  # another job's end says nothing of this one
    ]:
        progress = {"state": state, "step": 3, "steps": 10, "job_id": job_id, "updated": now}
        (run_dir / "progress.json").write_text(json.dumps(progress))
        assert submit.settle_s(run, "4242") == (submit.ENDED_JOB_SETTLE_S if waits else 0), (state, job_id)
    (run_dir / "progress.json").write_text("{")
    assert submit.settle_s(run, "4242") == 0  # a damaged heartbeat says nothing of the job: no wait


@needs_root
def test_a_submission_that_fills_the_disk_says_where_in_one_paragraph_and_leaves_no_run(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as home:
        result = orch("submit", "--steps", "2", ORCH_HOME=str(home))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"Cannot write {home / 'runs'}/" in result.stderr, result.stderr
        assert "No space left on device (the filesystem is full)" in result.stderr, result.stderr
        assert not list((home / "runs").iterdir())
