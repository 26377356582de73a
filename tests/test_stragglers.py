"""Slow hosts (docs/stragglers.md): the robust score, the cost test, the chaos slowdowns that plant them, the refusals,
and on the two-node cluster (three nodes in partition `two`) a persistent straggler left behind and a transient one
kept."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs import chaos
from orchestrator.core import stragglers
from orchestrator.core.errors import OrchError
from orchestrator.core.rundir import Run
from orchestrator.core.schedulers.slurm import LIVE_SLURM_STATES, hostnames
from orchestrator.core.stragglers import HostScore, cost_test, score_hosts
from tests.conftest import module_home, orch, run_dir_of, spooled_losses, submitted_run_id, wait_until, wait_until_ended

WINDOW, THRESHOLD = 6, 0.25


def steps(n: int, slow: dict[int, float] | None = None, base: float = 0.1) -> list[dict[str, float]]:
    """n steps of hosts a, b, c computing `base` s, host b `slow[i]` s longer in step i."""
    slow = slow or {}
    return [{"a": base, "b": base + slow.get(i, 0.0), "c": base * 1.01} for i in range(n)]


# --- the score ----------------------------------------------------------------------------------------------------


def test_a_host_slow_in_every_step_of_the_window_is_persistent_and_named_first():
    scores = score_hosts(steps(WINDOW, {i: 0.2 for i in range(WINDOW)}), WINDOW, THRESHOLD)
    assert scores[0].host == "b" and scores[0].persistent
    assert scores[0].slowdown == pytest.approx(2.0, rel=0.02)
    assert not any(s.persistent for s in scores[1:])


def test_a_slowdown_shorter_than_the_window_is_transient():
    window = steps(WINDOW, {i: 0.2 for i in range(WINDOW - 1)})  # slow in all but one step
    assert not any(s.persistent for s in score_hosts(window, WINDOW, THRESHOLD))


def test_nothing_is_persistent_before_the_window_is_full():
    assert not any(s.persistent for s in score_hosts(steps(WINDOW - 1, {i: 1.0 for i in range(9)}), WINDOW, 0.25))


def test_two_hosts_are_enough_to_name_the_slow_one_and_one_is_not():
    scores = score_hosts([{"a": 0.1, "b": 0.3}] * WINDOW, WINDOW, THRESHOLD)
    assert [(s.host, s.persistent) for s in scores] == [("b", True), ("a", False)]
    assert score_hosts([{"a": 0.1}] * WINDOW, WINDOW, THRESHOLD) == []


@given(st.lists(st.tuples(*[st.floats(0.09, 0.11)] * 3), min_size=WINDOW, max_size=3 * WINDOW))
def test_hosts_within_the_threshold_of_each_other_are_never_persistent(times: list[tuple[float, float, float]]):
    window = [dict(zip("abc", t, strict=True)) for t in times][-WINDOW:]
    assert not any(s.persistent for s in score_hosts(window, WINDOW, THRESHOLD))


# --- the cost test ------------------------------------------------------------------------------------------------


def slow_host(excess_s: float) -> HostScore:
    return HostScore(host="b", compute_s=0.1 + excess_s, others_s=0.1, slowdown=excess_s / 0.1, z=50, slow_steps=8,
                     persistent=True)  # fmt: skip


def decide(excess_s: float, steps_left: int, allocation_left_s: float = 3600, step_s: float = 1.0):
    return cost_test(slow_host(excess_s), job_id="1", step=10, step_s=step_s, steps_left=steps_left,
                     allocation_left_s=allocation_left_s, save_s=5, queue_wait_s=60, startup_s=35, now=0)  # fmt: skip


def test_leaving_pays_when_the_time_the_host_costs_exceeds_a_save_a_queue_wait_and_a_start():
    leave = decide(excess_s=0.5, steps_left=400)  # 200 s lost against 100 s
    assert leave.leave and leave.keep_loss_s == 200 and leave.leave_cost_s == 100
    assert leave.action == "requeue without b"
    assert not decide(excess_s=0.5, steps_left=150).leave  # 75 s against 100 s


def test_the_steps_ahead_end_with_the_allocation():
    bounded = decide(excess_s=0.5, steps_left=10_000, allocation_left_s=150, step_s=1.5)
    assert bounded.steps_ahead == 100 and bounded.keep_loss_s == 50 and not bounded.leave


@given(st.floats(0, 10), st.integers(0, 100_000), st.floats(0, 1e6))
def test_the_decision_is_keep_loss_against_leave_cost(excess_s: float, steps_left: int, allocation_left_s: float):
    found = decide(excess_s, steps_left, allocation_left_s)
    assert found.steps_ahead <= steps_left
    assert found.leave == (found.keep_loss_s > found.leave_cost_s)
    assert found.leave <= decide(excess_s * 2, steps_left, allocation_left_s).leave  # a slower host is left sooner


# --- a pause of a rank's own: the garbage collector -----------------------------------------------------------------


def test_training_leaves_the_set_up_objects_out_of_full_collections_and_still_collects_its_own_garbage():
    import gc
    import weakref

    from jobs.train import frozen_heap

    class Node:
        pass

    def walked() -> set[int]:
        """What a full collection walks: every object in the collector's three generations."""
        return {id(each) for generation in range(3) for each in gc.get_objects(generation)}

    made_before = Node()
    assert id(made_before) in walked()
    with frozen_heap():
        assert id(made_before) not in walked()
        cycle = Node()
        cycle.itself = cycle
        gone = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert gone() is None
    assert id(made_before) in walked()


# --- chaos slowdowns and the refusals -----------------------------------------------------------------------------


def test_chaos_slows_a_host_for_good_and_a_rank_for_a_few_steps(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ORCH_CHAOS", "slow@5:host=orch-n2:0.5, hiccup@3:rank=1:0.25:2")
    assert [chaos.delay(s, 0, "orch-n2") for s in (4, 5, 500)] == [0, 0.5, 0.5]
    assert [chaos.delay(s, 1, "orch-n1") for s in (2, 3, 4, 5)] == [0, 0.25, 0.25, 0]
    assert chaos.delay(5, 1, "orch-n2") == 0.5


@pytest.mark.parametrize("planted", ["slow@5:host=orch-n2:0", "slow@5:rank=-1:0.5", "hiccup@5:rank=1:0.5:0",
                                     "slow@5:node=x:0.5", "slow@5:host=a:7200"])  # fmt: skip
def test_chaos_slowdowns_out_of_range_are_refused_in_one_paragraph(monkeypatch: pytest.MonkeyPatch, planted: str):
    monkeypatch.setenv("ORCH_CHAOS", planted)
    with pytest.raises(OrchError, match="out of range; allowed: TARGET host=NAME or rank=K") as refused:
        chaos.planned()
    assert "\n" not in str(refused.value)


def test_submit_refuses_a_bad_slowdown_and_acting_where_the_scheduler_cannot_exclude(orch_home):
    bad_chaos = orch("submit", "--steps", "5", "--dry-run", ORCH_CHAOS="hiccup@5:rank=1:0.5")
    acting = orch("submit", "--steps", "5", "--dry-run", "--set", "stragglers.act=true")
    for result, said in ((bad_chaos, "has 2 argument(s) after the step"), (acting, "field 'stragglers.act' is true")):
        assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
        assert said in " ".join(result.stderr.split())
    assert not (orch_home / "runs").exists()


def test_the_exclusion_sent_after_the_requeue_outlives_the_sigterm_that_ends_the_job():
    """`Slurm.keep_off` runs while Slurm ends the requeued job's tasks with SIGTERM: its scontrol must finish."""
    from orchestrator.core.schedulers.slurm import ignore_sigterm

    script = "kill -TERM $$; echo sent"  # what SIGTERM does to a child started the way keep_off starts scontrol
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, preexec_fn=ignore_sigterm)
    assert (done.returncode, done.stdout) == (0, "sent\n")


# --- on the two-node cluster: kept through a transient slowdown, left when persistent -------------------------------

CONF = "/etc/slurm-two-node/slurm.conf"
WINDOW_E2E, STEPS = 3, 40  # the tiny recipe commits at 10, 20, 30, 40
# Only a slowdown of 3× counts: the planted one (5 s or more on a step of well under a second) does, and the noise of
# hosts that share this machine's cores with other tests does not.
THRESHOLD_E2E = 2.0
SLOW_HOST = "orch-n2"  # the first allocation's second node (Slurm fills orch-n1, orch-n2 first)
BRIEF_FROM, SLOW_FROM = 2, 6  # training steps (0-based) where each slowdown begins
STEPS_LEFT = STEPS - SLOW_FROM - WINDOW_E2E - 1  # at the decision: what keeping the slow host would cost, per step


def planted(startup_s: float) -> str:
    """A slowdown for fewer steps than the window, then the same for good: it makes leaving pay three times over
    against a start-up as long as the one measured on this machine now (at least 5 s a step: a clear straggler
    whatever the step time)."""
    seconds = max(5.0, round(3 * startup_s / STEPS_LEFT, 1))
    slow = f"host={SLOW_HOST}:{seconds}"
    return f"hiccup@{BRIEF_FROM}:{slow}:{WINDOW_E2E - 1},slow@{SLOW_FROM}:{slow}"


def two_node_cluster() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10, env={**os.environ,
                              "SLURM_CONF": CONF}).returncode == 0  # fmt: skip
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """First, on the LocalExecutor, the undisturbed reference with as many ranks (the reduction order, and so every
    loss's last bit, depends on the world size), whose start-up sizes the slowdown; then a run on partition `two`
    (three nodes, the job takes two) whose host orch-n2 is slowed first for fewer steps than the window, then for
    good."""
    if not two_node_cluster():
        pytest.skip("no two-node cluster (run: bash envs/slurm-two-node.sh)")
    with module_home(tmp_path_factory, "stragglers", SLURM_CONF=CONF) as home:
        reference = orch("submit", "--profile", "local", "--steps", str(STEPS), "--set", "launch.tasks_per_node=4",
                         "--set", "node.cores=4", "--wait")  # fmt: skip
        reference_dir = run_dir_of(home, submitted_run_id(reference))
        submitted = json.loads((reference_dir / "jobs.json").read_text())[0]["submitted"]
        first_step = json.loads((reference_dir / "metrics.jsonl").read_text().splitlines()[0])["time_ms"] / 1000
        slowed = orch("submit", "--profile", "local-slurm-2node", "--steps", str(STEPS), "--set", "stragglers.act=true",
                      "--set", f"stragglers.window_steps={WINDOW_E2E}", "--set", "stragglers.queue_wait_s=0",
                      "--set", f"stragglers.threshold={THRESHOLD_E2E}",
                      ORCH_CHAOS=planted(first_step - submitted))  # fmt: skip
        found = {name: Run(run_dir_of(home, submitted_run_id(result))) for name, result in
                 (("slowed", slowed), ("reference", reference))}  # fmt: skip
        try:
            for run in found.values():
                wait_until_ended(run, timeout=400)
            yield found
        finally:
            for run in found.values():
                orch("cancel", run.id)


def job_fields(job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


@pytest.mark.slow
def test_a_transient_slowdown_does_nothing(runs: dict[str, Run]):
    """Slowed for fewer steps than the window: no decision until the persistent slowdown has lasted a window."""
    [decision] = stragglers.read(runs["slowed"].dir).decisions
    assert decision.step > SLOW_FROM


@pytest.mark.slow
def test_a_persistent_straggler_is_named_left_behind_and_the_run_keeps_its_losses(runs: dict[str, Run]):
    run = runs["slowed"]
    assert run.state() == "completed", run.summary()
    [decision] = stragglers.read(run.dir).decisions
    assert decision.host == SLOW_HOST and decision.leave and decision.keep_loss_s > decision.leave_cost_s
    assert decision.step <= SLOW_FROM + WINDOW_E2E + 1  # named within a window of its first slow step
    assert [a.ended for a in run.attempts] == ["requeued", None]
    job = job_fields(run.jobs[-1].job_id)
    assert job["ExcNodeList"] == SLOW_HOST and SLOW_HOST not in job["NodeList"]
    assert runs["reference"].state() == "completed", runs["reference"].summary()
    assert spooled_losses(run.dir) == spooled_losses(runs["reference"].dir)  # bitwise
    status = orch("status", run.id)
    assert f"straggler {SLOW_HOST} at step {decision.step}" in status.stdout, status.stdout
    print(status.stdout)


@pytest.mark.slow
def test_mlflow_gets_every_hosts_figures(runs: dict[str, Run]):
    import mlflow

    run = runs["slowed"]
    client = mlflow.MlflowClient(f"sqlite:///{run.dir.parent.parent / 'mlflow.db'}")
    slowdowns = {
        step.step: step.value
        for step in client.get_metric_history(run.mlflow.run_id, f"system/straggler/{SLOW_HOST}/slowdown")
    }
    assert min(slowdowns) <= SLOW_FROM and slowdowns[SLOW_FROM + WINDOW_E2E] > 1  # 5 s on top of a sub-second step
    for field in ("data_s", "forward_backward_s", "sync_s", "optimizer_s", "compute_s"):
        assert client.get_metric_history(run.mlflow.run_id, f"system/straggler/orch-n1/{field}")


@pytest.mark.slow
def test_a_resume_keeps_off_the_host_left_for_slowness(runs: dict[str, Run]):
    """A new job of the run (`orch resume`) is queued with the left host excluded, says so, and Slurm launches its
    ranks (the job's step 0) on the other nodes; the job is then left to the fixture's cancel."""
    run = runs["slowed"]
    [decision] = stragglers.read(run.dir).decisions
    # a finished job stays in Slurm's queue while it completes, and orch resume refuses to start beside a live one
    wait_until(lambda: job_fields(run.jobs[-1].job_id).get("JobState") not in LIVE_SLURM_STATES,
               "the finished job to leave the queue", timeout=120, poll_s=0.5)  # fmt: skip
    resumed = orch("resume", run.id, "--steps", str(STEPS + 2))
    assert resumed.returncode == 0, resumed.stderr
    said = f"excluding {SLOW_HOST}, left for slowness at step {decision.step} (+{100 * decision.slowdown:.0f} %)"
    assert said in " ".join(resumed.stderr.split())
    job_id = run.jobs[-1].job_id
    assert job_fields(job_id)["ExcNodeList"] == SLOW_HOST
    wait_until(lambda: ranks_step_nodes(job_id), "the resumed job's ranks", timeout=120, poll_s=0.5)
    assert hostnames(ranks_step_nodes(job_id)) == {"orch-n1", "orch-n3"}


def ranks_step_nodes(job_id: str) -> str:
    """The nodes of the job's step 0 (srun's: every rank), as squeue lists them; "" before it is launched."""
    steps = subprocess.run(["squeue", "--noheader", "--steps", "--jobs", job_id, "--format", "%i %N"],
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    return dict(zip(steps[::2], steps[1::2], strict=False)).get(f"{job_id}.0", "")
