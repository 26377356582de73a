"""Automatic recovery after a crash: a job requeues itself from its last checkpoint, within a budget, never for a
deterministic error, and keeps hosts that failed out of the next try."""

import json
import time
from pathlib import Path

import pytest

from jobs.chaos import PlantedFailure
from jobs.recovery import claim, decide, judge
from orchestrator.cli.executors import excluding
from orchestrator.core.config import load_profile
from orchestrator.core.errors import OrchError
from orchestrator.core.files import write_json_atomic
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import Recovery
from tests.conftest import orch, run_dir_of, spooled_losses, status_json, submitted_run_id

STEPS = 20


def local(**recovery: int):
    return load_profile("local", [{"recovery": recovery}] if recovery else [])[1]


def earlier(step: int, error: str, host: str = "n1") -> Recovery:
    return Recovery(job_id="7", attempt=1, rank=1, host=host, step=step, error=error, retried=True, reason="",
                    time=0.0)  # fmt: skip


def test_a_crash_is_retried_until_the_budget_is_spent_but_never_a_deterministic_or_user_error():
    crash = RuntimeError("NCCL error: unhandled system error")
    assert judge(local(), 13, "RuntimeError: x", [], crash)[0]
    assert judge(local(), 13, "RuntimeError: x", [earlier(5, "RuntimeError: y")], crash)[0]
    twice = judge(local(), 13, "RuntimeError: x", [earlier(13, "RuntimeError: x")], crash)
    assert not twice[0] and "same error at step 13" in twice[1]
    spent = judge(local(retries=1), 13, "RuntimeError: x", [earlier(5, "RuntimeError: y")], crash)
    assert not spent[0] and "1 automatic requeues" in spent[1]
    assert not judge(local(), 13, "OrchError: bad", [], OrchError("bad"))[0]
    assert not judge(local(retries=0), 13, "RuntimeError: x", [], crash)[0]


def test_one_rank_decides_for_the_attempt_and_the_others_read_its_decision(tmp_path: Path):
    run = Run(tmp_path)
    write_json_atomic(tmp_path / "attempts.json", [{"job_id": "7", "start_step": 0, "started": 0.0}])
    first = decide(run, local(), "7", 1, 13, PlantedFailure("planted"))
    second = decide(run, local(), "7", 0, 13, RuntimeError("peer closed the connection"))
    assert first.retried and first.rank == 1 and second == first
    assert not claim(tmp_path / "errors" / "7.attempt1.recovery.json", second)  # taken: nothing is overwritten
    assert [p.name for p in (tmp_path / "errors").iterdir()] == ["7.attempt1.recovery.json"]


def test_hosts_that_failed_often_enough_are_excluded_from_the_next_job(tmp_path: Path):
    run = Run(tmp_path)
    for attempt, host in enumerate(["n1", "n2", "n1"], start=1):
        decision = earlier(13, "RuntimeError: x", host).model_copy(update={"attempt": attempt})
        write_json_atomic(tmp_path / "errors" / f"7.attempt{attempt}.recovery.json", decision.model_dump())
    assert run.suspect_hosts(exclude_after=2) == ["n1"]
    assert run.suspect_hosts(exclude_after=2, also_failed=("n2",)) == ["n1", "n2"]
    profile = load_profile("local-slurm", [{"slurm": {"extra_sbatch": {"exclude": "n9"}}}])[1]
    assert excluding(profile, ["n1"]).slurm.extra_sbatch["exclude"] == "n1,n9"
    assert excluding(local(), ["n1"]) == local()  # no scheduler to tell


def wait_ended(run_id: str, timeout: float = 600) -> dict:
    until = time.time() + timeout
    while time.time() < until:
        status = status_json(run_id)
        if status["state"] in ("completed", "failed", "cancelled"):
            return status
        time.sleep(1)
    raise TimeoutError(f"run {run_id} still {status['state']}")


@pytest.mark.slow
def test_a_crash_requeues_by_itself_and_the_run_ends_with_the_undisturbed_losses(orch_home, monkeypatch):
    reference = submitted_run_id(orch("submit", "--steps", str(STEPS)))
    monkeypatch.setenv("ORCH_CHAOS", "fail@13")
    crashed = submitted_run_id(orch("submit", "--steps", str(STEPS)))
    monkeypatch.setenv("ORCH_CHAOS", "fail-always@13")
    looping = submitted_run_id(orch("submit", "--steps", str(STEPS)))

    assert wait_ended(crashed)["state"] == "completed"
    assert wait_ended(reference)["state"] == "completed"
    crashed_dir = run_dir_of(orch_home, crashed)
    assert spooled_losses(crashed_dir) == spooled_losses(run_dir_of(orch_home, reference))  # bitwise, every step
    decision = json.loads(next((crashed_dir / "errors").glob("*.attempt1.recovery.json")).read_text())
    assert decision["retried"] and decision["rank"] == 1 and decision["step"] == 13
    attempts = json.loads((crashed_dir / "attempts.json").read_text())
    assert [a["start_step"] for a in attempts] == [0, 10] and len({a["job_id"] for a in attempts}) == 1

    stopped = wait_ended(looping)
    assert stopped["state"] == "failed" and "same error at step 13" in stopped["error"], stopped
    decisions = sorted((run_dir_of(orch_home, looping) / "errors").glob("*.recovery.json"))
    assert [json.loads(p.read_text())["retried"] for p in decisions] == [True, False]
