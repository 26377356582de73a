"""The requeue-loop guard: a job that restarts at the same committed step twice in a row is stopped."""

from pathlib import Path

from jobs.train import end_attempt, record_start
from orchestrator.core.rundir import Run


def test_third_start_of_one_job_at_the_same_step_is_refused_with_the_reason(tmp_path: Path):
    run = Run(tmp_path)
    assert record_start(run, "41", 0, nodes=1) is None  # first allocation
    end_attempt(run, "41", "requeued")
    assert record_start(run, "41", 0, nodes=1) is None  # requeued without progress once
    end_attempt(run, "41", "requeued")
    reason = record_start(run, "41", 0, nodes=1)
    assert reason and "requeue loop" in reason and "job 41" in reason and "step 0" in reason


def test_restarts_by_the_scheduler_do_not_count_toward_the_loop(tmp_path: Path):
    run = Run(tmp_path)
    for _ in range(3):
        assert record_start(run, "41", 0, nodes=1) is None
        end_attempt(run, "41", "preempted")
    for _ in range(3):  # killed from outside (a node failure) and restarted by Slurm: the job marked nothing
        assert record_start(run, "41", 0, nodes=1) is None
    assert [a.ended for a in run.attempts] == ["preempted"] * 3 + [None] * 3


def test_progress_between_requeues_keeps_the_chain_going(tmp_path: Path):
    run = Run(tmp_path)
    for step in (0, 0, 100, 100, 200):
        assert record_start(run, "41", step, nodes=2) is None
        end_attempt(run, "41", "requeued")


def test_a_new_job_of_the_same_run_starts_a_new_count(tmp_path: Path):
    run = Run(tmp_path)
    for _ in range(2):
        record_start(run, "41", 10, nodes=1)
        end_attempt(run, "41", "requeued")
    assert record_start(run, "57", 10, nodes=1) is None
