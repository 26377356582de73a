"""The requeue-loop guard: a job that restarts at the same committed step twice in a row is stopped."""

from pathlib import Path

from jobs.train import record_start
from orchestrator.core.rundir import Run


def test_third_start_of_one_job_at_the_same_step_is_refused_with_the_reason(tmp_path: Path):
    run = Run(tmp_path)
    assert record_start(run, "41", 0, nodes=1) is None  # first allocation
    assert record_start(run, "41", 0, nodes=1) is None  # requeued without progress once
    reason = record_start(run, "41", 0, nodes=1)
    assert reason and "requeue loop" in reason and "job 41" in reason and "step 0" in reason


def test_progress_between_requeues_keeps_the_chain_going(tmp_path: Path):
    run = Run(tmp_path)
    assert all(record_start(run, "41", step, nodes=2) is None for step in (0, 0, 100, 100, 200))


def test_a_new_job_of_the_same_run_starts_a_new_count(tmp_path: Path):
    run = Run(tmp_path)
    for _ in range(2):
        record_start(run, "41", 10, nodes=1)
    assert record_start(run, "57", 10, nodes=1) is None
