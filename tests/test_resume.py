"""Interruption is a non-event: killed, corrupted, timed-out or resized runs end exactly like uninterrupted ones."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from orchestrator.core.files import read_json
from orchestrator.core.rundir import CODE_MANIFEST, Run
from orchestrator.core.runfiles import FolderManifest
from orchestrator.core.schedulers.local import descendants
from tests.conftest import (
    ROOT,
    final_weights,
    kill_job_tree,
    measure_pace,
    orch,
    run_dir_of,
    spooled_losses,
    status_json,
    steps_for_allocations,
    submitted_run_id,
    wait_for_step,
)

pytestmark = pytest.mark.slow
STEPS = 40


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """Per-step losses and final weights of a 40-step run that never stopped."""
    home = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", "--steps", str(STEPS), "--wait"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "ORCH_HOME": str(home)},
    )
    run_dir = run_dir_of(home, submitted_run_id(result))
    return spooled_losses(run_dir), final_weights(run_dir, STEPS)


def assert_same_training(run_dir: Path, uninterrupted: tuple[dict, dict]) -> None:
    losses, weights = uninterrupted
    assert spooled_losses(run_dir) == losses  # bitwise, every step
    resumed = final_weights(run_dir, STEPS)
    assert resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)


def start(*args: str) -> tuple[str, Path]:
    result = orch("submit", "--steps", str(STEPS), *args)
    run_id = submitted_run_id(result)
    return run_id, Path(status_json(run_id)["run_dir"])


def test_killed_at_step_17_and_resumed_matches_the_uninterrupted_run(orch_home, uninterrupted):
    run_id, run_dir = start()
    wait_for_step(run_dir, 17)
    kill_job_tree(status_json(run_id)["job_ids"][-1])
    assert status_json(run_id)["state"] == "failed"

    result = orch("resume", run_id, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    status = status_json(run_id)
    assert (status["state"], status["step"], len(status["job_ids"])) == ("completed", STEPS, 2)
    assert_same_training(run_dir, uninterrupted)


def test_chaos_kills_including_during_saves_never_load_an_incomplete_checkpoint(orch_home, uninterrupted):
    rng = random.Random(7)
    run_id, run_dir = start()
    kills = 0
    for attempt in range(4):
        if attempt % 2 == 0:  # the moment a checkpoint is being written
            while not list((run_dir / "checkpoints").glob(".step_*.partial")) and not finished(run_dir):
                time.sleep(0.001)
        else:
            wait_for_step(run_dir, min(rng.randint(1, STEPS), STEPS - 1))
        if finished(run_dir):
            break
        kill_job_tree(status_json(run_id)["job_ids"][-1])
        kills += 1
        assert orch("resume", run_id).returncode == 0
    assert kills >= 3
    assert wait_state(run_id, ("completed", "failed"), timeout=300) == "completed"
    assert_same_training(run_dir, uninterrupted)
    logs = "".join(p.read_text() for p in run_dir.glob("submitit/*/*_0_log.err"))
    assert "damaged" not in logs  # an interrupted save is never mistaken for a checkpoint


def test_a_preemption_saves_at_the_next_step_and_resume_matches_the_uninterrupted_run(orch_home, uninterrupted):
    """Also: every job of a run runs the code frozen in the run at submission, not the checkout's."""
    run_id, run_dir = start("--set", "preemptible=true")
    wait_for_step(run_dir, 13)
    for pid in descendants(int(status_json(run_id)["job_ids"][-1])):  # the scheduler signals every task
        os.kill(pid, signal.SIGTERM)
    assert wait_state(run_id, ("preempted", "failed", "completed"), timeout=120) == "preempted"
    status = status_json(run_id)
    assert status["last_checkpoint_step"] == status["step"] < STEPS  # saved where it stopped, off the cadence
    assert json.loads((run_dir / "attempts.json").read_text())[-1]["ended"] == "preempted"
    assert f"code {run_dir / 'code'}" in rank_0_logs(run_dir)
    frozen = run_dir / "code/jobs/train.py"  # a change that only the run's copy has, in its manifest too
    frozen.write_text(frozen.read_text().replace('"rank %d/%d on %s', '"frozen-code rank %d/%d on %s'))
    manifest = FolderManifest(files=FolderManifest.listing(run_dir / "code", CODE_MANIFEST))
    (run_dir / "code" / CODE_MANIFEST).write_text(manifest.model_dump_json())

    result = orch("resume", run_id, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_training(run_dir, uninterrupted)
    assert "frozen-code rank 0/2" in rank_0_logs(run_dir)
    Run(run_dir).freeze_code()  # what `orch resume --update-code` does before queueing
    assert frozen.read_text() == (ROOT / "jobs/train.py").read_text()


def rank_0_logs(run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted(run_dir.glob("submitit/*/*_0_log.err")))


def finished(run_dir: Path) -> bool:
    return read_json(run_dir / "progress.json", {}).get("state") == "completed"


def test_damaged_newest_checkpoints_fall_back_to_the_last_good_one(orch_home):
    """A truncated shard (its size is wrong) and a flipped bit (its digest is wrong) are both found: each checkpoint is
    set aside and the job resumes from the newest one that verifies."""
    result = orch("submit", "--steps", "30", "--set", "recipe.checkpoint.keep_last=3", "--wait")
    run_id = submitted_run_id(result)
    run_dir = Path(status_json(run_id)["run_dir"])
    truncated, flipped = (sorted((run_dir / f"checkpoints/step_{s:08d}").glob("*.distcp"))[0] for s in (30, 20))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x10
    flipped.write_bytes(bytes(data))

    result = orch("resume", run_id, "--steps", "40", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    logs = "".join(p.read_text() for p in run_dir.glob("submitit/*/*_0_log.err"))
    assert "checkpoint at step 30 is damaged" in logs and "checkpoint at step 20 is damaged" in logs
    assert "resumed from the checkpoint at step 10" in logs
    assert (run_dir / "checkpoints/damaged_step_00000030").is_dir()
    assert (run_dir / "checkpoints/damaged_step_00000020").is_dir()
    assert status_json(run_id)["state"] == "completed"


def test_timeouts_under_the_local_executor_requeue_until_done(orch_home):
    """A 45 s limit with the warning 15 s before it: each allocation trains until its deadline, saves and requeues.
    The steps are sized from this machine's measured pace to take about 2.2 allocations: at least 2 even if the
    machine gets much quieter meanwhile. That the steps after each
    save are the uninterrupted run's is the preemption test's and the Karolina rehearsal's to show."""
    pace = measure_pace()
    steps = steps_for_allocations(pace, 2.2, limit_s=45, stop_before_end_s=15)
    run_id = submitted_run_id(
        orch("submit", "--steps", str(steps), "--set", "time_limit_min=0.75", "--set", "signal_delay_s=15")
    )
    run_dir = Path(status_json(run_id)["run_dir"])
    assert wait_state(run_id, ("completed", "failed"), timeout=1200) == "completed", status_json(run_id)
    starts = [a["start_step"] for a in json.loads((run_dir / "attempts.json").read_text())]
    assert len(starts) >= 2 and starts == sorted(set(starts)), (pace, steps, starts)  # requeued, each after progress
    spooled = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert spooled == list(range(1, steps + 1))  # every step once, in order: none lost or repeated across requeues


def wait_state(run_id: str, states: tuple[str, ...], timeout: float) -> str:
    until = time.time() + timeout
    while time.time() < until:
        state = status_json(run_id)["state"]
        if state in states:
            return state
        time.sleep(1)
    raise TimeoutError(f"run {run_id} still {state}")


def test_world_size_change_sees_the_same_samples(orch_home, uninterrupted):
    result = orch("submit", "--steps", "20", "--wait")
    run_id = submitted_run_id(result)
    run_dir = Path(status_json(run_id)["run_dir"])
    result = orch("resume", run_id, "--steps", str(STEPS), "--set", "launch.tasks_per_node=1", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    losses, _ = uninterrupted
    resumed = spooled_losses(run_dir)
    assert [resumed[s] for s in range(1, 21)] == [losses[s] for s in range(1, 21)]
    # same samples in a different reduction order: the losses agree to float precision, not bitwise
    assert [resumed[s] for s in range(21, STEPS + 1)] == pytest.approx(
        [losses[s] for s in range(21, STEPS + 1)], rel=2e-3
    )


def test_two_resumes_at_once_start_exactly_one_job_and_a_forced_resume_with_bad_input_stops_nothing(orch_home):
    run_id, run_dir = start()
    wait_for_step(run_dir, 5)
    kill_job_tree(status_json(run_id)["job_ids"][-1])
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: orch("resume", run_id), range(2)))
    assert sorted(r.returncode for r in results) == [0, 2]
    refused = next(r for r in results if r.returncode == 2)
    assert "already has a live job" in refused.stderr
    assert len(status_json(run_id)["job_ids"]) == 2
    # --force with a typo or a bad value is refused before the live job is stopped: it trains on.
    for bad, says in (
        (("--profile", "lcoal"), "Unknown profile 'lcoal'"),
        (("--set", "time_limit_min=-5"), "time_limit_min"),
    ):
        result = orch("resume", run_id, "--force", *bad)
        assert result.returncode == 2 and says in result.stderr, result.stderr
        summary = status_json(run_id)
        assert summary["state"] in ("queued", "running") and len(summary["job_ids"]) == 2
    assert orch("cancel", run_id).returncode == 0
    wait_state(run_id, ("cancelled",), timeout=60)


def test_cancel_keeps_checkpoints_and_resume_continues(orch_home, uninterrupted):
    run_id, run_dir = start()
    wait_for_step(run_dir, 12)
    result = orch("cancel", run_id)
    assert result.returncode == 0 and "Cancelled job" in result.stdout
    assert wait_state(run_id, ("cancelled",), timeout=60) == "cancelled"
    assert (run_dir / "checkpoints/step_00000010/COMMITTED.json").is_file()
    result = orch("resume", run_id, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_training(run_dir, uninterrupted)
