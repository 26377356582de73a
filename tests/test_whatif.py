"""What-if plans (`orch submit --dry-run --nodes 1,2,4,8`, orchestrator/core/budget.py): a priced row per node count,
the earliest finish and the fewest node-hours marked, impossible counts with their reason, Slurm's start hint."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from orchestrator.core import goodput
from orchestrator.core.budget import CHEAPEST, EARLIEST, FailureRate, Shape, Speed, marks, priced
from orchestrator.core.loading import load_profile, load_recipe
from orchestrator.core.plan import STARTUP_MIN, make_plan
from orchestrator.core.schedulers.base import StartHint
from tests.conftest import needs_slurm, orch
from tests.test_budget import stored_run
from tests.test_goodput import T0, entry

KAROLINA = ["--profile", "karolina", "--account", "OPEN-29-12", "--steps", "200000", "--dry-run"]
NOW = T0
NO_FAILURES = FailureRate(0, 0.0)


def karolina_plan(nodes: int):
    _, profile = load_profile("karolina", [{"nodes": nodes, "slurm": {"account": "OPEN-29-12"}}])
    _, recipe = load_recipe("cstinyllama-1.2b")
    return make_plan(profile, recipe, 200_000)


def test_wall_time_is_training_and_a_start_up_per_allocation_and_node_hours_are_nodes_times_it():
    plan = karolina_plan(2)
    shape = priced(2, plan, None, NO_FAILURES, None, 1000)
    assert shape.wall_h == pytest.approx(plan.hours + plan.allocations * STARTUP_MIN / 60)
    assert shape.node_hours == pytest.approx(2 * shape.wall_h)


def test_failures_lose_half_a_checkpoint_interval_and_a_restart_each():
    plan = karolina_plan(4)
    rate = FailureRate(interruptions=3, device_hours=600.0)  # one per 200 GPU-hours
    shape = priced(4, plan, None, rate, None, 1000)
    assert shape.failures == pytest.approx(32 * shape.wall_h / 200)
    per_failure_h = 1000 * plan.step_s / 3600 / 2 + STARTUP_MIN / 60
    assert shape.lost_h == pytest.approx(shape.failures * per_failure_h)
    assert shape.expected_node_hours == pytest.approx(shape.node_hours + 4 * shape.lost_h)


def test_without_an_observed_failure_the_rate_is_goodputs_prior():
    assert NO_FAILURES.prior and NO_FAILURES.per_device_hour == 1 / goodput.PRIOR_DEVICE_HOURS_PER_INTERRUPTION
    assert FailureRate(2, 100.0).per_device_hour == 0.02


def test_a_measured_speed_replaces_the_planners_per_rank():
    plan = karolina_plan(2)
    shape = priced(2, plan, Speed(per_rank=10_000.0, run_id="r", world_size=8), NO_FAILURES, None, 1000)
    assert shape.plan.tokens_per_s == 160_000.0 and "measured by run r" in shape.speed_source
    assert shape.plan.hours == pytest.approx(plan.total_tokens / 160_000 / 3600)


def shapes(*nodes: int, hints: dict[int, float] | None = None) -> list[Shape]:
    hints = hints or {}
    return [
        priced(n, karolina_plan(n), None, NO_FAILURES, StartHint(hints.get(n), ""), 1000) if n != 3 else
        Shape(3, None, refused="does not divide")
        for n in nodes
    ]  # fmt: skip


def test_more_nodes_finish_first_and_fewer_cost_least_when_all_start_now():
    assert marks(shapes(1, 2, 3, 4, 8), NOW) == {8: [EARLIEST], 1: [CHEAPEST]}


def test_a_later_start_hint_moves_the_earliest_finish_to_a_smaller_shape():
    later = {8: NOW + 7 * 86400}  # 8 nodes wait a week in the queue
    assert marks(shapes(1, 2, 4, 8, hints=later), NOW)[4] == [EARLIEST]


def test_a_single_priced_shape_gets_both_marks_and_impossible_ones_none():
    assert marks(shapes(3, 2), NOW) == {2: [EARLIEST, CHEAPEST]}
    unpriced = [replace(s, plan=replace(s.plan, tokens_per_s=None)) for s in shapes(1, 2)]
    assert marks(unpriced, NOW) == {}


def row_of(stdout: str, nodes: int) -> str:
    return next(line for line in stdout.splitlines() if re.match(rf"\s*{nodes}\s", line))


def test_whatif_table_marks_rows_and_shows_an_impossible_count_with_its_reason(orch_home):
    result = orch("submit", *KAROLINA, "--nodes", "1,2,3,4,8")
    assert result.returncode == 0, result.stderr
    assert EARLIEST in row_of(result.stdout, 8) and CHEAPEST in row_of(result.stdout, 1)
    assert "impossible" in row_of(result.stdout, 3)
    assert "3 node(s) impossible: Global batch 512 is not a multiple" in result.stdout
    assert "goodput's prior" in result.stdout and not (orch_home / "runs").exists()


def test_a_list_of_node_counts_without_dry_run_is_refused_and_nothing_is_submitted(orch_home):
    result = orch("submit", *[a for a in KAROLINA if a != "--dry-run"], "--nodes", "1,2")
    assert result.returncode == 2 and "add --dry-run" in result.stderr and "Traceback" not in result.stderr
    assert not (orch_home / "runs").exists()
    assert orch("submit", *KAROLINA, "--nodes", "1,two").returncode == 2


def test_whatif_uses_the_speed_and_failures_earlier_runs_measured(orch_home):
    kept = [entry(s, T0 + 10 + s, tokens_per_s=2000.0) for s in range(1, 11)]
    failed = {"job_id": "101", "started": T0, "ended": "crashed", "stopped": T0 + 30}
    stored_run(orch_home, "earlier", [failed, {"job_id": "101", "started": T0 + 60, "stopped": T0 + 100}], kept,
               beat=T0 + 100, committed=10)  # fmt: skip
    result = orch("submit", "--steps", "20000", "--dry-run", "--nodes", "1,2")
    assert result.returncode == 0, result.stderr
    assert re.match(r"\s*1\s+2,000\s", row_of(result.stdout, 1))  # 1,000 per rank measured, 2 ranks
    assert "measured by run earlier" in result.stdout and "1 failure(s)/preemption(s)" in result.stdout
    assert "nodes is 2: the local executor runs on this one machine" in result.stdout


@needs_slurm
def test_slurm_gives_its_start_hint_and_refuses_a_shape_beyond_the_partition(orch_home):
    result = orch("submit", "--profile", "local-slurm", "--dry-run", "--nodes", "1,2")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", row_of(result.stdout, 1))  # sbatch --test-only's start
    assert "2 node(s) impossible" in result.stdout and "limit of 1" in result.stdout
    assert not (orch_home / "runs").exists()
