"""Faults on the real local Slurm (profile local-slurm, envs/slurm-local.sh), each held to what orch promises: a rank
frozen with SIGSTOP, a rank killed with SIGKILL, the node set down, an exception once: the run ends completed with
bitwise the per-step losses of an undisturbed run; the same exception twice: the chain stops and says why. Each test
prints its run's goodput table and checks that the breakdown accounts for the fault (docs/goodput.md).

The undisturbed reference and the first four runs are submitted at once and train side by side (the partition shares
its cores); the node-down run comes last and alone, since a node that goes down takes every job on it. The loss-spike
guard on Slurm is tests/test_rollback.py's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jobs import watchdog
from orchestrator.core.checkpoints import committed_step
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import SILENT_S, Hang, Recovery, read_model
from orchestrator.core.schedulers import job_alive
from tests.conftest import (
    module_home,
    needs_slurm,
    orch,
    report_goodput,
    spooled_losses,
    submitted_run_id,
    wait_for_step,
    wait_until,
    wait_until_ended,
)

pytestmark = [pytest.mark.slow, needs_slurm]
STEPS, FAULT = 20, 13  # the tiny recipe commits every 10 steps: each fault comes between the checkpoints at 10 and 20
COMMITTED = 10
FACTOR = 20  # the frozen run's step bound is FACTOR × its own median step time; the floor is set below any step
RUNS = {  # name: (extra `orch submit` arguments, ORCH_CHAOS)
    "reference": ((), ""),
    "frozen": (("--set", "watchdog.min_step_s=0.001", "--set", f"watchdog.step_factor={FACTOR}"), ""),
    "killed": ((), f"sigkill@{FAULT}"),
    "crashed": ((), f"fail@{FAULT}"),
    "crashed_twice": ((), f"fail-always@{FAULT}"),
}


def submit(*extra: str, chaos: str = "") -> str:
    args = ("submit", "--profile", "local-slurm", "--recipe", "tiny", "--steps", str(STEPS), *extra)
    return submitted_run_id(orch(*args, ORCH_CHAOS=chaos))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One ORCH_HOME for the module's runs; whatever job of theirs is left at the end is cancelled."""
    with module_home(tmp_path_factory, "chaos") as folder:
        yield folder
        for run_dir in (folder / "runs").glob("*"):
            if (jobs := (run := Run(run_dir)).jobs) and job_alive(run.job(jobs[-1])):
                orch("cancel", run_dir.name)


@pytest.fixture(scope="module")
def runs(home: Path) -> dict[str, Run]:
    """The reference and the runs whose faults the job plants itself or the tests bring from outside, all submitted
    at once."""
    with ThreadPoolExecutor(len(RUNS)) as pool:
        submitted = pool.map(lambda plan: submit(*plan[0], chaos=plan[1]), RUNS.values())
        return {name: Run(home / "runs" / run_id) for name, run_id in zip(RUNS, submitted, strict=True)}


@pytest.fixture(scope="module")
def undisturbed(runs: dict[str, Run]) -> dict[int, float]:
    """The per-step losses of the run that no fault touched."""
    assert wait_until_ended(runs["reference"]) == "completed"
    losses = spooled_losses(runs["reference"].dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def task_of(job_id: str, pid: int) -> bool:
    """Whether process `pid` is a task that Slurm started for job `job_id`."""
    try:
        return f"SLURM_JOB_ID={job_id}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def on_node(job_id: str) -> bool:
    """Whether any process of the job (a task, or the slurmstepd that watches it) is left on this machine."""
    prefix = f"slurmstepd: [{job_id}.".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.joinpath("cmdline").read_bytes().startswith(prefix) or task_of(job_id, int(proc.name)):
                return True
        except OSError:
            continue
    return False


def slurm(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def queued_jobs() -> set[str]:
    """The jobs that run or may start on the node: a held job (another run's leftover, say) never does."""
    listed = (line.split("|", 1) for line in slurm("squeue", "--noheader", "--format=%i|%r").splitlines())
    return {job_id for job_id, reason in listed if not reason.startswith("JobHeld")}


def attempts_of(run: Run) -> list[tuple[str, int, str | None]]:
    """Each start of the run's jobs: job id, the step it started from, how it ended where it ended itself."""
    return [(a.job_id, a.start_step, a.ended) for a in run.attempts]


def test_a_rank_frozen_mid_step_is_stopped_by_its_peers_watchdog_and_slurm_runs_the_job_again(
    runs: dict[str, Run], request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
):
    run = runs["frozen"]  # frozen from here while it trains: the reference is waited for afterwards
    wait_for_step(run.dir, FAULT, timeout=600)
    job_id = run.jobs[-1].job_id
    frozen = run.rank_beat(job_id, 0)
    assert frozen is not None and task_of(job_id, frozen.pid)
    os.kill(frozen.pid, signal.SIGSTOP)  # rank 0, mid-step: its peer blocks in the next collective
    frozen_at, committed = time.time(), committed_step(run.checkpoints_dir)
    trained = len(spooled_losses(run.dir))  # rank 0 writes the spool: nothing more until the requeue

    assert wait_until_ended(run) == "completed"
    [report] = [read_model(path, Hang) for path in run.hangs_dir.iterdir()]
    assert report.stuck == [0] and report.detected_by == 1 and report.ranks[0].pid == frozen.pid
    assert report.time - frozen_at <= max(report.bound_s, SILENT_S) + 3 * watchdog.BEAT_S
    assert attempts_of(run) == [(job_id, 0, "hang"), (job_id, committed, None)]  # one Slurm job, requeued
    assert not Path(f"/proc/{frozen.pid}").exists()  # Slurm ended it with the job's first try
    assert spooled_losses(run.dir) == request.getfixturevalue("undisturbed")

    goodput = report_goodput(run.id, "a rank frozen with SIGSTOP", capsys)
    assert goodput["steps"]["rolled_back"] == trained - committed > 0
    assert goodput["parts_h"]["idle"] > 0  # from its last step through the bound and the requeue


def test_a_rank_killed_with_sigkill_is_replaced_by_a_requeue_that_its_surviving_peer_asks_for(
    runs: dict[str, Run], undisturbed: dict[int, float], capsys: pytest.CaptureFixture[str]
):
    run = runs["killed"]
    assert wait_until_ended(run) == "completed"
    [job_id] = [job.job_id for job in run.jobs]
    assert (run.dir / "chaos" / f"sigkill@{FAULT}").is_file()
    log = (run.submitit_dir / job_id / f"{job_id}_0_log.err").read_text()
    assert "task 1: Killed" in log  # srun saw rank 1 die of the signal, and ended the job's step
    decision = read_model(run.errors_dir / f"{job_id}.attempt1.recovery.json", Recovery)
    assert decision.retried and decision.rank == 0 and decision.step == FAULT  # the survivor decided
    assert attempts_of(run) == [(job_id, 0, "crashed"), (job_id, COMMITTED, None)]
    assert spooled_losses(run.dir) == undisturbed

    goodput = report_goodput(run.id, "a rank killed with SIGKILL", capsys)
    assert goodput["steps"]["rolled_back"] == FAULT - COMMITTED and goodput["parts_h"]["idle"] > 0


def test_an_exception_at_one_step_requeues_the_job_and_the_run_ends_with_the_undisturbed_losses(
    runs: dict[str, Run], undisturbed: dict[int, float], capsys: pytest.CaptureFixture[str]
):
    run = runs["crashed"]
    assert wait_until_ended(run) == "completed"
    [job_id] = [job.job_id for job in run.jobs]
    decision = read_model(run.errors_dir / f"{job_id}.attempt1.recovery.json", Recovery)
    assert decision.retried and decision.rank == 1 and decision.step == FAULT
    assert attempts_of(run) == [(job_id, 0, "crashed"), (job_id, COMMITTED, None)]
    assert spooled_losses(run.dir) == undisturbed

    goodput = report_goodput(run.id, "an exception at one step", capsys)
    assert goodput["steps"]["rolled_back"] == FAULT - COMMITTED and goodput["parts_h"]["idle"] > 0


def test_the_same_exception_at_the_same_step_twice_stops_the_chain_with_the_reason(
    runs: dict[str, Run], capsys: pytest.CaptureFixture[str]
):
    run = runs["crashed_twice"]
    assert wait_until_ended(run) == "failed"
    summary = run.summary()
    assert "PlantedFailure" in summary["error"] and f"same error at step {FAULT}" in summary["error"], summary
    [job_id] = [job.job_id for job in run.jobs]
    decisions = [read_model(path, Recovery) for path in sorted(run.errors_dir.glob("*.recovery.json"))]
    assert [(d.attempt, d.retried) for d in decisions] == [(1, True), (2, False)]
    assert [start for _, start, _ in attempts_of(run)] == [0, COMMITTED]

    goodput = report_goodput(run.id, "the same exception twice", capsys)
    assert goodput["steps"]["rolled_back"] == goodput["steps"]["uncommitted"] == FAULT - COMMITTED
    assert goodput["parts_h"]["idle"] > 0


def test_a_node_set_down_mid_run_has_slurm_requeue_the_job_which_ends_with_the_undisturbed_losses(
    home: Path, undisturbed: dict[int, float], capsys: pytest.CaptureFixture[str]
):
    """Slurm requeues the job of a node that fails (the job asks --requeue); on this cluster the node stays down until
    `scontrol update state=resume` (ReturnToService=1), which the test gives once the job has left it."""
    wait_until(lambda: not queued_jobs(), "an empty queue: a node that goes down takes every job on it", timeout=600)
    run = Run(home / "runs" / submit())
    wait_for_step(run.dir, FAULT, timeout=600)
    job_id = run.jobs[-1].job_id
    assert queued_jobs() == {job_id}, "another job arrived on the node: rerun when the queue is free"
    node = slurm("squeue", "--noheader", "--format=%N", "--jobs", job_id)
    ranks = [beat.pid for rank in (0, 1) if (beat := run.rank_beat(job_id, rank))]
    assert len(ranks) == 2 and all(task_of(job_id, pid) for pid in ranks)
    try:
        slurm("scontrol", "update", f"nodename={node}", "state=down", "reason=chaos")
        for pid in ranks:  # a node that fails takes its processes along; Slurm would end these after KillWait
            os.kill(pid, signal.SIGKILL)
        trained, committed = len(spooled_losses(run.dir)), committed_step(run.checkpoints_dir)
        assert trained < STEPS, "the job finished before the node went down"
        wait_until(lambda: not on_node(job_id), "the job to leave the node", timeout=120, poll_s=0.2)
        assert slurm("sinfo", "--noheader", "--partition=debug", "--nodes", node, "--format=%T").rstrip("*") == "down"
        assert slurm("squeue", "--noheader", "--format=%T", "--jobs", job_id) == "PENDING"  # requeued, waiting
    finally:  # back in service whatever happened above (Slurm refuses this for a node that is not down)
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True, timeout=60)

    assert wait_until_ended(run) == "completed"
    assert attempts_of(run) == [(job_id, 0, None), (job_id, committed, None)]  # the first try never ended itself
    assert "Restarts=1" in slurm("scontrol", "show", "job", job_id)
    assert not list(run.errors_dir.glob("*.recovery.json"))  # Slurm requeued it; orch's recovery had nothing to do
    assert spooled_losses(run.dir) == undisturbed

    goodput = report_goodput(run.id, "the node set down", capsys)
    assert goodput["steps"]["rolled_back"] == trained - committed > 0
    assert goodput["parts_h"]["idle"] > 0  # the node down, the job pending
