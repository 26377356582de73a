"""Backfill-shaped jobs (`orch submit --nodes MIN-MAX --time-min T`, docs/goodput.md#backfill-shaped-jobs): Slurm may
start the job earlier on fewer nodes or with a shorter limit, and the job trains on what it is granted, on the samples
any other shape would see at each step."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator.core.checkpoints import committed_step
from orchestrator.core.config import Profile
from orchestrator.core.deadline import read_records
from orchestrator.core.loading import load_profile, load_recipe
from orchestrator.core.plan import Batching, batching, granted, make_plan, shape_plans, shortest_limit_min
from orchestrator.core.rundir import TERMINAL_STATES, Run
from orchestrator.core.runfiles import mix_phases
from orchestrator.core.schedulers.slurm import ranges, slurm_minutes
from tests.conftest import module_home, orch, run_dir_of, spooled_losses, submitted_run_id, wait_until

if TYPE_CHECKING:
    from jobs.data import GlobalOrder

CONF = "/etc/slurm-two-node/slurm.conf"
TWO_NODES = {"SLURM_CONF": CONF}


def two_node_profile(**slurm: object) -> Profile:
    return load_profile("local-slurm-2node", [{"slurm": slurm}] if slurm else [])[1]


# --- the request and the plan ----------------------------------------------------------------------------------------


def test_a_range_and_a_minimum_time_reach_sbatch_and_a_fixed_shape_asks_as_before():
    ranged = load_profile("local-slurm-2node", [{"time_limit_min": 4, "slurm": {"nodes_min": 1, "time_min_min": 2}}])
    assert ranges(ranged[1]) == {"nodes": "1-2", "time-min": 2}
    assert ranges(two_node_profile()) == {}


def test_each_shape_of_the_range_gets_its_own_ranks_and_accumulation_of_the_same_global_batch():
    profile = two_node_profile(nodes_min=1)
    _, recipe = load_recipe("tiny")
    plan = make_plan(profile, recipe, 50)
    shapes = shape_plans(profile, plan)
    assert {n: (p.world_size, p.grad_accum) for n, p in shapes.items()} == {1: (2, 2), 2: (4, 1)}
    assert granted(profile, 2).nodes == 1 and granted(profile, 4) is profile


def test_the_plan_sizes_the_warning_for_the_smallest_shape_and_counts_allocations_at_the_minimum_time():
    profile = load_profile("karolina", [{"nodes": 2, "slurm": {"account": "OPEN-1-1", "nodes_min": 1}}])[1]
    _, recipe = load_recipe("cstinyllama-1.2b")
    fixed, ranged = (make_plan(p, recipe, 20_000) for p in (profile.model_copy(update={"slurm": None}), profile))
    slowest = shape_plans(profile, ranged)[1]
    assert ranged.signal_delay_s >= 2 * (slowest.step_s + slowest.save_s) > 2 * (fixed.step_s + fixed.save_s)
    short = profile.model_copy(update={"slurm": profile.slurm.model_copy(update={"time_min_min": 360.0})})
    assert shortest_limit_min(short) == 360 and make_plan(short, recipe, 20_000).allocations > ranged.allocations


def step_samples(order: GlobalOrder, step: int) -> list[int]:
    """The block ids of a step, micro-batch by micro-batch and rank by rank: what every rank together reads."""
    accumulation = order.split.accumulation
    ranks = range(order.split.world_size)
    return [
        int(block)
        for micro in range(accumulation)
        for rank in ranks
        for block in order.block_indices(step, micro, rank)
    ]


def test_the_samples_of_a_step_are_the_same_whatever_shape_trains_it():
    """The same sequence for every world size whose accumulation is whole: a job granted fewer nodes reads what the
    full shape would."""
    from jobs.data import GlobalOrder

    orders = [GlobalOrder(97, Batching.of(16, 2, w), seed=3) for w in (1, 2, 4, 8)]
    for step in range(40):
        assert len({tuple(step_samples(order, step)) for order in orders}) == 1


# --- bad input: one paragraph, exit code 2, nothing submitted --------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (
            [
                "--profile",
                "local-slurm-2node",
                "--nodes",
                "3-4",
                "--set",
                "slurm.max_nodes=4",
                "--set",
                "recipe.train.global_batch_size=32",
            ],
            ["field 'slurm.nodes_min'", "on 3 node(s)", "whole gradient accumulation", "counts that do: 1, 2, 4"],
        ),
        (
            ["--profile", "local-slurm-2node", "--nodes", "1-2", "--time-min", "1"],
            ["field 'slurm.time_min_min' (--time-min)", "one save", "e.g. --time-min 2"],
        ),
        (
            ["--profile", "local", "--nodes", "1-2"],
            ["local.yaml", "slurm.nodes_min", "the local executor runs a job on exactly what it asks for"],
        ),
        (["--profile", "local", "--time-min", "30"], ["slurm.time_min_min", "one time limit (--time)"]),
        (["--profile", "local-slurm-2node", "--nodes", "2-1"], ["a node range is MIN-MAX"]),
    ],  # fmt: skip
)
def test_a_range_that_cannot_train_is_refused_in_one_paragraph(orch_home: Path, arguments: list[str], words: list[str]):
    result = orch("submit", "--steps", "30", *arguments)
    assert result.returncode == 2, result.stdout + result.stderr
    said = " ".join(result.stderr.split())
    assert all(w in said for w in words), said
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 8
    assert not (orch_home / "runs").exists() or not any((orch_home / "runs").iterdir())


def test_the_dry_run_shows_the_range_in_the_script_and_each_shape(orch_home: Path):
    result = orch("submit", "--profile", "local-slurm-2node", "--steps", "30", "--nodes", "1-2", "--time", "4",
                  "--time-min", "2", "--dry-run")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=1-2" in result.stdout and "#SBATCH --time-min=2" in result.stdout
    rows = [line.split()[:3] for line in result.stdout.splitlines() if line.strip()[:1] in ("1", "2")]
    assert ["1", "2", "2"] in rows and ["2", "4", "1"] in rows  # nodes, ranks, accumulation
    assert "as asked (1-2 nodes):" in result.stdout


# --- on the two-node cluster -----------------------------------------------------------------------------------------


def two_node_cluster() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10, env={**os.environ, **TWO_NODES}
                              ).returncode == 0  # fmt: skip
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def slurm(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, **TWO_NODES})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def squeue(job_id: str) -> dict[str, str]:
    """State, node count and time limit (minutes) of a job, as Slurm reports it now."""
    shown = slurm("squeue", "--noheader", "--jobs", job_id, "--format", "%T|%D|%l")
    state, nodes, limit = [*shown.split("|"), "", ""][:3]
    return {"state": state, "nodes": nodes, "limit": limit}


# TIME_MIN: the smallest whole minutes that hold a start-up, a step and a save (`check_range`). The holder's limit,
# LIMIT_MIN - 1, leaves the free node a window of at least TIME_MIN + 1 minutes: Slurm's backfill sees time in
# whole minutes (bf_resolution, 60 s), so a window of TIME_MIN + a few seconds closed before its next pass when the
# holder started late in a minute.
LIMIT_MIN, TIME_MIN = 5, 2
PAST_REQUEUE = 3  # steps the run trains on two nodes before it is stopped


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Run, Run, dict[str, str]]]:
    """One node of two is held by a job (`sbatch --exclusive`), and a job that needs both is next in line for when
    the holder's limit ends, so that Slurm's backfill can start a `--nodes 1-2 --time-min` job at once only on the free
    node and only until then. Once that job runs, both are cancelled: its next allocation gets both nodes. Beside it,
    on the LocalExecutor, the undisturbed reference with the ranks of one node. Both run with steps to spare and are
    cancelled once they have trained a few steps past the save the run stopped its one-node allocation with."""
    if not two_node_cluster():
        pytest.skip("no two-node cluster (run: bash envs/slurm-two-node.sh)")
    nodes = slurm("sinfo", "--noheader", "--partition", "two", "--Node", "--format", "%N").split()
    held, free, others = nodes[0], nodes[1], nodes[2:]  # orch-n3, where there, is kept out: two nodes in play
    steps = "100000"  # never reached: the runs are stopped on events, not sized to a pace
    recipe = ["--set", f"recipe.schedule.total_steps={steps}"]  # the same learning rates for both runs
    with module_home(tmp_path_factory, "backfill", **TWO_NODES) as home:
        holder = slurm("sbatch", "--parsable", "--partition", "two", "--nodelist", held, "--exclusive", "--time",
                       str(LIMIT_MIN - 1), "--output", "/dev/null", "--wrap", "sleep 600")  # fmt: skip
        jobs, found = [holder], {}
        try:
            wait_until(lambda: squeue(holder)["state"] == "RUNNING", "the holding job to start", timeout=120)
            jobs.append(slurm("sbatch", "--parsable", "--partition", "two", "--nodes", "2", "--nodelist",
                              f"{held},{free}", "--exclusive", "--time", "1", "--output", "/dev/null", "--wrap",
                              "true"))  # fmt: skip
            excluded = ["--set", f"slurm.extra_sbatch.exclude={','.join(others)}"] if others else []
            result = orch("submit", "--profile", "local-slurm-2node", "--steps", steps, "--nodes", "1-2", "--time",
                          str(LIMIT_MIN), "--time-min", str(TIME_MIN), *excluded, *recipe)  # fmt: skip
            run = found["run"] = Run(run_dir_of(home, submitted_run_id(result)))
            job_id = run.jobs[-1].job_id
            wait_until(lambda: squeue(job_id)["state"] == "RUNNING", "the backfilled job to start", timeout=120)
            first = squeue(job_id)
            slurm("scancel", *jobs)
            reference = found["reference"] = Run(run_dir_of(home, submitted_run_id(orch("submit", "--profile",
                                                  "local", "--steps", steps, *recipe))))  # fmt: skip

            def trained(made: Run) -> int:
                assert made.state() not in TERMINAL_STATES, made.summary()  # not ended (nor cancelled) before
                return max(spooled_losses(made.dir), default=0)

            wait_until(lambda: [a.ended for a in run.attempts][:1] == ["requeued"], "the save before the end",
                       timeout=300, poll_s=1)  # fmt: skip
            last = (committed_step(run.checkpoints_dir) or 0) + PAST_REQUEUE  # the run stops there, on two nodes
            wait_until(lambda: trained(reference) >= last, "the reference", timeout=300, poll_s=0.5)
            orch("cancel", reference.id)  # before the second allocation starts, where it can: it has what it needs
            wait_until(lambda: trained(run) >= last, "training on two nodes", timeout=300, poll_s=0.5)
            orch("cancel", run.id)
            yield run, found["reference"], first
        finally:
            slurm("scancel", *jobs)
            for made in found.values():
                orch("cancel", made.id)


@pytest.mark.slow
def test_the_job_starts_on_the_free_node_with_a_limit_from_the_range_and_saves_before_its_end(backfilled):
    run, _, first = backfilled
    assert first["nodes"] == "1", first
    assert TIME_MIN <= slurm_minutes(first["limit"]) < LIMIT_MIN, (
        first
    )  # shortened to what fits before the job next in line
    attempts = run.attempts
    assert [a.nodes for a in attempts[:2]] == [1, 2] and attempts[0].ended == "requeued", attempts
    stop = [r for r in read_records(run.dir) if r.job_id == attempts[0].job_id and r.stopped_step is not None][-1]
    assert stop.committed is not None and stop.committed < stop.end and stop.source == "time limit", stop
    assert attempts[1].start_step == stop.stopped_step > 0  # the second allocation resumed from that save


@pytest.mark.slow
def test_every_step_sees_the_samples_and_the_losses_of_the_undisturbed_run(backfilled):
    """Same samples whatever the shape; a different reduction order on two nodes: equal to float precision."""
    from jobs.data import load_blocks, make_order

    run, reference, _ = backfilled
    losses, expected = spooled_losses(run.dir), spooled_losses(reference.dir)
    assert sorted(losses) == list(range(1, max(losses) + 1))
    steps = [s for s in losses if s in expected]  # the run may pass the reference's last step while it is cancelled
    assert max(steps) >= run.attempts[1].start_step + PAST_REQUEUE  # steps of both shapes
    assert [losses[s] for s in steps] == pytest.approx([expected[s] for s in steps], rel=2e-3)
    blocks, train = load_blocks(run.data_dir), run.recipe().train
    splits = (batching(train, world) for world in (2, 4))  # the shapes' ranks
    one, two = (make_order(blocks, split, train.seed, (), mix_phases({}, [])) for split in splits)
    for step in range(max(losses)):
        assert step_samples(one, step) == step_samples(two, step)
