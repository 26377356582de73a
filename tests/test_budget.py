"""`orch budget` (orchestrator/core/budget.py): an account's node-hours from its runs' goodput accounting, in flight,
still planned, against its allocation; the burn rate and when it runs out; the warning of `orch submit`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.core import goodput
from orchestrator.core.budget import Budget, RunCost, budget_of, remaining_node_hours, run_cost
from orchestrator.core.loading import load_profile
from orchestrator.core.rundir import Run
from orchestrator.core.schedulers.base import Usage
from orchestrator.core.yamlio import dump_yaml
from tests.conftest import orch
from tests.test_goodput import RANKS, T0, make_run, steps

DAY = 86400.0


def stored_run(home: Path, run_id: str, attempts: list[dict], kept: list[dict], account: str | None = None,
               allocation: float | None = None, run_steps: int = 20, **kwargs) -> Run:  # fmt: skip
    """A run in ORCH_HOME as its jobs leave it (tests.test_goodput.make_run) with its run.json; with an account, on
    the local Slurm profile with that account (and allocation)."""
    run = make_run(home / "runs" / run_id, attempts, kept, **kwargs)
    profile = "local"
    if account is not None:
        profile = "local-slurm"
        slurm = {"account": account, **({"allocation_node_hours": allocation} if allocation else {})}
        resolved = load_profile(profile, [{"slurm": slurm}])[1]
        (run.dir / "profile.yaml").write_text(dump_yaml(resolved.model_dump(mode="json")))
    info = {"run_id": run_id, "created": attempts[0]["started"], "profile": profile, "recipe": "tiny"}
    (run.dir / "run.json").write_text(json.dumps({**info, "steps": run_steps, "stop_before_end_s": 30}))
    return run


def cost(node_hours: float, live: bool = False, remaining: float = 0.0, created: float = T0) -> RunCost:
    return RunCost("r", "OPEN-1-1", "slurm", live, node_hours, remaining, created, None)


def budget(costs: list[RunCost], allocation: float | None = 100.0, sacct: float | None = None, days: float = 10):
    usage = Usage(sacct, 3 if sacct else 0, "")
    return Budget("OPEN-1-1", costs, allocation, "--allocation", usage, T0, T0 + days * DAY)


def test_ended_runs_are_spent_live_runs_in_flight_and_their_steps_left_planned():
    found = budget([cost(30), cost(10, live=True, remaining=25)])
    assert (found.spent, found.in_flight, found.planned, found.used) == (30, 10, 25, 40)
    assert found.left == 60


def test_slurm_accounting_counts_every_job_of_the_account_when_it_answers():
    found = budget([cost(30)], sacct=45.0)
    assert found.used == 45.0 and found.left == 55.0


def test_burn_rate_and_the_day_the_allocation_runs_out():
    found = budget([cost(40)], days=10)  # 4 node-hours a day, 60 left: 15 more days
    assert found.burn_per_day == pytest.approx(4.0)
    assert found.runs_out == pytest.approx(found.now + 15 * DAY)


def test_a_spent_allocation_runs_out_now_and_none_without_an_allocation():
    assert budget([cost(120)]).runs_out == pytest.approx(T0 + 10 * DAY)
    assert budget([cost(120)], allocation=None).runs_out is None


def test_node_hours_of_a_run_are_its_goodput_allocation_over_its_devices(tmp_path):
    run = stored_run(tmp_path, "a", [{"job_id": "101", "started": T0, "stopped": T0 + 3600}], steps(1, 10, T0 + 600),
                     beat=T0 + 3600, committed=10)  # fmt: skip
    found = run_cost(run, "completed", T0 + 7200)
    allocated = goodput.of_run(run, "completed", T0 + 7200)[1].allocated_h
    assert found.node_hours == pytest.approx(allocated / RANKS) == pytest.approx(1.0)
    assert not found.live and found.remaining_node_hours == 0


def test_a_live_run_plans_its_steps_after_the_newest_checkpoint_at_its_measured_step_time(tmp_path):
    run = stored_run(tmp_path, "a", [{"job_id": "101", "started": T0}], steps(1, 10, T0, step_s=2.0), committed=10,
                     run_steps=1810)  # fmt: skip
    history = goodput.read_history(run, "running", T0 + 30)
    assert remaining_node_hours(run, run.profile(), history) == pytest.approx(1800 * 2.0 / 3600)
    assert run_cost(run, "running", T0 + 30).live


def test_allocation_comes_from_the_runs_profile_unless_given(tmp_path):
    run = stored_run(tmp_path, "a", [{"job_id": "101", "started": T0, "stopped": T0 + 3600}], steps(1, 10, T0),
                     account="OPEN-1-1", allocation=500.0, beat=T0 + 3600)  # fmt: skip
    costs = [run_cost(run, "completed", T0 + DAY)]
    assert budget_of("OPEN-1-1", costs, None, None, T0 + DAY).allocation == 500.0
    assert budget_of("OPEN-1-1", costs, 80.0, None, T0 + DAY).allocation == 80.0


@pytest.fixture
def two_accounts(orch_home: Path) -> Path:
    """Two completed runs of account OPEN-1-1 (1 and 3 node-hours) and one local run."""
    hour = [{"job_id": "101", "started": T0, "stopped": T0 + 3600}]
    stored_run(orch_home, "one", hour, steps(1, 10, T0), account="OPEN-1-1", allocation=10.0, beat=T0 + 3600)
    three = [{"job_id": "102", "started": T0 + DAY, "stopped": T0 + DAY + 3 * 3600}]
    stored_run(orch_home, "two", three, steps(1, 10, T0 + DAY), account="OPEN-1-1", allocation=10.0,
               beat=T0 + DAY + 3 * 3600)  # fmt: skip
    stored_run(orch_home, "here", hour, steps(1, 10, T0), beat=T0 + 3600)
    return orch_home


def test_budget_of_every_account_in_json(two_accounts):
    result = orch("budget", "--json")
    assert result.returncode == 0, result.stderr
    found = {a["account"]: a for a in json.loads(result.stdout)["accounts"]}
    assert found.keys() == {"OPEN-1-1", None}
    account = found["OPEN-1-1"]
    assert account["spent_node_hours"] == pytest.approx(4.0) and account["in_flight_node_hours"] == 0
    assert account["allocation_node_hours"] == 10.0 and account["left_node_hours"] == pytest.approx(6.0)
    assert account["scheduler_node_hours"] is None and "accounting" in account["scheduler_note"]


def test_budget_of_one_account_says_what_is_left_and_when_it_runs_out(two_accounts):
    result = orch("budget", "--account", "open-1-1", "--allocation", "5")
    assert result.returncode == 0, result.stderr
    assert "OPEN-1-1: 2 run(s) of orch, 0 in flight" in result.stdout
    assert "allocation is spent" not in result.stdout and "runs out on" in result.stdout
    assert "Slurm accounting does not answer here" in " ".join(result.stdout.split())


def test_an_unknown_account_is_refused_in_one_paragraph(two_accounts):
    result = orch("budget", "--account", "OPEN-9-9")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "OPEN-9-9" in result.stderr and "OPEN-1-1" in result.stderr and len(result.stderr.splitlines()) == 1


def test_submit_warns_when_the_plan_needs_more_than_the_account_has_left(two_accounts):
    args = ["--profile", "karolina", "--account", "OPEN-1-1", "--steps", "200000", "--nodes", "2", "--dry-run"]
    result = orch("submit", *args, "--set", "slurm.allocation_node_hours=100")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "Warning: the plan needs 401 node-hours, and account OPEN-1-1 has 96 left of its 100" in text
