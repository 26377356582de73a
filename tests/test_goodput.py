"""Goodput accounting (orchestrator/core/goodput.py): unit tests on hand-built run directories, and one killed and
resumed tiny run on the local profile whose `orch status --json` breakdown adds up."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator.cli.show import accounting
from orchestrator.core import goodput
from orchestrator.core.loading import load_profile, load_recipe
from orchestrator.core.rundir import Run, node_hours
from orchestrator.core.yamlio import dump_yaml
from tests.conftest import kill_job_tree, orch, run_dir_of, submitted_run_id, wait_for_step

T0 = 1_800_000_000.0  # the runs below start here (seconds since the epoch)
RANKS = 2  # the local profile: 2 CPU ranks on 1 node


def entry(step: int, end: float, step_s: float = 1.0, wait: float = 0.0, stall: float | None = 0.0, **extra) -> dict:
    """A spool line; `stall=None` writes it as jobs from before the accounting did (no checkpoint_stall_s)."""
    metrics = {"loss": 1.0, "step_time_s": step_s, "data_wait_fraction": wait / step_s, **extra}
    if stall is not None:
        metrics["checkpoint_stall_s"] = stall
    return {"step": step, "time_ms": round(end * 1000), "metrics": metrics}


def steps(first: int, last: int, start: float, step_s: float = 1.0, stall: float | None = 0.0) -> list[dict]:
    """Steps first..last trained back to back from `start`."""
    return [entry(s, start + (s - first + 1) * step_s, step_s, stall=stall) for s in range(first, last + 1)]


def lines(entries: list[dict]) -> str:
    return "".join(json.dumps(e) + "\n" for e in entries)


def make_run(
    folder: Path,
    attempts: list[dict],
    kept: list[dict],
    rolled_back: list[dict] = (),
    beat: float | None = None,
    committed: int | None = None,
    every_steps: int = 10,
) -> Run:
    """A run directory as the job leaves it: profile and recipe, attempts, spool, rolled-back steps, heartbeat."""
    folder.mkdir(parents=True)
    _, profile = load_profile("local")
    _, recipe = load_recipe("tiny")
    recipe = recipe.model_copy(update={"checkpoint": recipe.checkpoint.model_copy(update={"every_steps": every_steps})})
    (folder / "profile.yaml").write_text(dump_yaml(profile.model_dump(mode="json")))
    (folder / "recipe.yaml").write_text(dump_yaml(recipe.model_dump(mode="json")))
    jobs = {a["job_id"] for a in attempts}
    (folder / "jobs.json").write_text(json.dumps([{"job_id": j, "executor": "local", "submitted": T0} for j in jobs]))
    (folder / "attempts.json").write_text(json.dumps([{"nodes": 1, "start_step": 0, **a} for a in attempts]))
    (folder / "metrics.jsonl").write_text(lines(kept))
    if rolled_back:
        (folder / "rolled_back.jsonl").write_text(lines(rolled_back))
    if beat is not None:
        progress = {"state": "completed", "step": 0, "steps": 20, "job_id": attempts[-1]["job_id"], "updated": beat}
        (folder / "progress.json").write_text(json.dumps(progress))
    if committed is not None:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints/latest.json").write_text(json.dumps({"step": committed, "dir": f"step_{committed}"}))
    return Run(folder)


def rank_seconds(result: goodput.Goodput) -> dict[str, float | None]:
    return {part: None if hours is None else round(hours * 3600 / RANKS, 6) for part, hours in result.parts_h.items()}


def assert_adds_up(result: goodput.Goodput) -> None:
    assert sum(h for h in result.parts_h.values() if h is not None) == pytest.approx(result.allocated_h, rel=1e-9)


def test_startup_is_the_time_from_a_start_to_its_first_step_and_counted_steps_are_the_goodput(tmp_path):
    run = make_run(
        tmp_path / "run",
        [{"job_id": "100", "launched": T0, "started": T0 + 3, "stopped": T0 + 16}],  # recorded 3 s after the start
        kept=steps(1, 10, T0 + 5),  # first step starts 5 s in; the last ends at +15
        beat=T0 + 16,
        committed=10,
    )
    result = goodput.of_run(run, "completed")[1]
    assert result.allocated_h * 3600 == pytest.approx(16 * RANKS)
    parts = rank_seconds(result)
    assert (parts["startup"], parts["counted"], parts["other"], parts["idle"]) == (5, 10, 1, 0)
    assert result.percent == pytest.approx(100 * 10 / 16)
    assert result.device == "CPU rank" and result.steps["counted"] == 10
    assert_adds_up(result)


def test_steps_a_resume_discarded_are_rolled_back_and_the_wait_for_the_resume_is_not_allocated(tmp_path):
    """Killed after step 7 with a checkpoint at 5; resumed by a new job 12 s after its last step, from step 5: the
    killed job's allocation ended with it."""
    first = steps(1, 7, T0 + 1)
    run = make_run(
        tmp_path / "run",
        [
            {"job_id": "100", "started": T0},
            {"job_id": "200", "started": T0 + 20, "start_step": 5, "stopped": T0 + 27},
        ],
        kept=first[:5] + steps(6, 10, T0 + 21),
        rolled_back=first[5:],
        beat=T0 + 27,
        committed=10,
    )
    result = goodput.of_run(run, "completed")[1]
    parts = rank_seconds(result)
    assert result.allocated_h * 3600 == pytest.approx((8 + 7) * RANKS)
    assert (parts["rolled_back"], parts["idle"], parts["counted"], parts["startup"]) == (2, 0, 10, 2)
    assert result.steps == {"counted": 10, "uncommitted": 0, "rolled_back": 2}
    assert_adds_up(result)


def test_the_days_between_a_completed_run_and_its_resume_are_not_allocated(tmp_path):
    """Completed at T0 + 16, resumed three days later by a new job: allocated are the two jobs' own spans, while the
    new job waits in the queue too; node-hours count the same."""
    days = 3 * 86400
    run = make_run(
        tmp_path / "run",
        [
            {"job_id": "100", "launched": T0, "started": T0, "stopped": T0 + 16},
            {"job_id": "200", "launched": T0 + days, "started": T0 + days, "start_step": 10, "stopped": T0 + days + 7},
        ],
        kept=steps(1, 10, T0 + 5) + steps(11, 15, T0 + days + 1),
        beat=T0 + days + 7,
        committed=15,
    )
    result = goodput.of_run(run, "completed")[1]
    assert result.allocated_h * 3600 == pytest.approx((16 + 7) * RANKS) and rank_seconds(result)["idle"] == 0
    assert_adds_up(result)
    assert node_hours(run.attempts, run.progress, "completed", "200") * 3600 == pytest.approx(16 + 7)

    queued = make_run(  # while the resume's job waits in the queue
        tmp_path / "queued", [{"job_id": "100", "started": T0, "stopped": T0 + 16}], steps(1, 10, T0 + 5), beat=T0 + 16
    )
    jobs = json.loads((queued.dir / "jobs.json").read_text())
    (queued.dir / "jobs.json").write_text(json.dumps(jobs + [{**jobs[0], "job_id": "200", "submitted": T0 + days}]))
    assert goodput.of_run(queued, "queued", now=T0 + days)[1].allocated_h * 3600 == pytest.approx(16 * RANKS)
    assert node_hours(queued.attempts, queued.progress, "queued", "200") * 3600 == pytest.approx(16)


def test_a_hang_is_an_interruption_and_the_time_it_hung_is_idle(tmp_path):
    """The watchdog stopped the job 30 s after its last step (attempts.json: ended "hang"); the requeued job started
    10 s later."""
    run = make_run(
        tmp_path / "run",
        [
            {"job_id": "100", "started": T0, "ended": "hang", "stopped": T0 + 35},
            {"job_id": "100", "started": T0 + 45, "start_step": 5, "stopped": T0 + 51},
        ],
        kept=steps(1, 5, T0) + steps(6, 10, T0 + 46),
        beat=T0 + 51,
        committed=10,
    )
    history, result = goodput.of_run(run, "completed")
    assert rank_seconds(result)["idle"] == 40 and history.interruptions == 1
    assert_adds_up(result)


def test_data_wait_evaluation_and_checkpoint_stalls_are_taken_out_of_the_steps(tmp_path):
    kept = [
        entry(1, T0 + 2, step_s=2.0, wait=0.5),
        entry(2, T0 + 5, step_s=2.0, eval_s=1.0, val_loss=2.0),  # evaluated after the step
        entry(3, T0 + 8, step_s=2.0, stall=1.0),  # the save after step 2 held the loop 1 s
    ]
    run = make_run(tmp_path / "run", [{"job_id": "100", "started": T0, "stopped": T0 + 8}], kept, committed=3)
    parts = rank_seconds(goodput.of_run(run, "completed")[1])
    assert (parts["counted"], parts["data_wait"], parts["evaluation"], parts["checkpoint_stall"]) == (5.5, 0.5, 1, 1)
    assert (parts["startup"], parts["other"]) == (0, 0)


def test_steps_after_the_newest_checkpoint_count_only_once_one_commits(tmp_path):
    run = make_run(tmp_path / "run", [{"job_id": "100", "started": T0}], steps(1, 7, T0), committed=5)
    result = goodput.of_run(run, "running", now=T0 + 10)[1]
    parts = rank_seconds(result)
    assert (parts["counted"], parts["uncommitted"], parts["other"]) == (5, 2, 3)  # other: since the last step
    assert result.allocated_h * 3600 == pytest.approx(10 * RANKS)
    assert_adds_up(result)


def test_a_run_from_before_the_accounting_shows_its_goodput_and_says_the_rest_was_not_recorded(tmp_path):
    """No checkpoint_stall_s in its steps, no rolled_back.jsonl, no stop times: what every job measured (steps and data
    wait) is shown, the rest of its allocations is "not recorded", and the JSON names the parts it lacks."""
    run = make_run(
        tmp_path / "run",
        [{"job_id": "100", "started": T0}, {"job_id": "200", "started": T0 + 20, "start_step": 5}],
        kept=steps(1, 5, T0 + 1, stall=None) + steps(6, 10, T0 + 21, stall=None),
        beat=T0 + 27,
        committed=10,
    )
    found = accounting(run, "completed", suggest=True)["goodput"]
    assert found["percent"] == pytest.approx(100 * 10 / 13)  # job 100 to its last step, T0 + 6; job 200 from T0 + 20
    unmeasured = {"startup", "rolled_back", "evaluation", "checkpoint_stall", "other", "idle"}
    assert set(found["parts_not_recorded"]) == unmeasured
    assert found["parts_h"]["not_recorded"] * 3600 / RANKS == pytest.approx(13 - 10)
    assert sum(h for h in found["parts_h"].values() if h is not None) == pytest.approx(found["allocated_h"])


def test_young_daly_interval_from_the_median_save_stall_and_the_observed_failures(tmp_path):
    """Saves every 10 steps stalled 0.5 s (measured on the step after each save); one failure, retried in the same
    job, in 7,200 s of allocations: MTBF 2 h, Young's interval sqrt(2 × 0.5 × 7200) = 84.9 s, Daly's 84.5 s, 85 steps
    of 1 s."""
    kept = [entry(s, T0 + s, stall=0.5 if s % 10 == 1 else 0.0) for s in range(1, 40)]
    run = make_run(
        tmp_path / "run",
        [{"job_id": "100", "started": T0}, {"job_id": "100", "started": T0 + 3600, "stopped": T0 + 7200}],
        kept=kept,
        beat=T0 + 7200,
        committed=39,
    )
    history = goodput.read_history(run, "completed", T0 + 7200)
    suggestion = goodput.suggest(history, goodput.account(history, None))
    assert (suggestion.save_stall_s, suggestion.saves_measured, suggestion.step_s) == (0.5, 3, 1.0)
    assert (suggestion.interruptions, suggestion.mtbf_h, suggestion.prior) == (1, 2.0, False)
    ratio = 0.5 / (2 * 7200)
    daly = math.sqrt(2 * 0.5 * 7200) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - 0.5
    assert suggestion.interval_s == pytest.approx(daly)
    assert suggestion.interval_s == pytest.approx(84.5, abs=0.1) and suggestion.interval_steps == 85
    assert suggestion.expected_loss(85) < suggestion.expected_loss(10)


def test_without_an_observed_failure_the_interval_rests_on_the_stated_prior(tmp_path):
    kept = [entry(s, T0 + s, stall=0.5 if s % 10 == 1 else 0.0) for s in range(1, 25)]
    run = make_run(tmp_path / "run", [{"job_id": "100", "started": T0, "stopped": T0 + 25}], kept, committed=20)
    history = goodput.read_history(run, "completed", T0 + 25)
    suggestion = goodput.suggest(history, goodput.account(history, None))
    assert suggestion.prior and suggestion.mtbf_h == goodput.PRIOR_DEVICE_HOURS_PER_INTERRUPTION / RANKS
    assert suggestion.interval_steps == round(suggestion.interval_s)


def test_the_job_accounts_for_its_last_step_before_the_final_save_commits_it(tmp_path):
    run = make_run(tmp_path / "run", [{"job_id": "100", "started": T0}], steps(1, 9, T0 + 1), committed=5)
    metrics = entry(10, T0 + 11)["metrics"]
    result = goodput.before_final_save(run, 10, metrics, now=T0 + 11)
    assert result.steps == {"counted": 10, "uncommitted": 0, "rolled_back": 0}
    assert result.metrics()["goodput/percent"] == pytest.approx(100 * 10 / 11)
    assert {"goodput/startup_h", "goodput/rolled_back_h", "goodput/allocated_h"} <= result.metrics().keys()


def test_a_rollback_keeps_the_steps_it_drops_in_rolled_back_jsonl(tmp_path):
    from jobs.tracking import MetricSpool

    spool = MetricSpool(tmp_path)
    for step in range(1, 8):
        spool.append(step, {"loss": 1.0})
    spool.rollback(5)
    assert [e["step"] for e in spool.entries()] == [1, 2, 3, 4, 5]
    assert [json.loads(line)["step"] for line in (tmp_path / "rolled_back.jsonl").read_text().splitlines()] == [6, 7]


@pytest.mark.slow
def test_a_killed_and_resumed_tiny_run_accounts_for_every_allocated_hour(orch_home):
    """Killed with kill -9 at step 13 (the checkpoint at 10 survives), resumed to the end: `orch status --json` has a
    goodput whose parts add up to the allocated total, with the discarded steps rolled back."""
    run_id = submitted_run_id(orch("submit", "--steps", "20"))
    run_dir = run_dir_of(orch_home, run_id)
    wait_for_step(run_dir, 13)
    kill_job_tree(json.loads((run_dir / "jobs.json").read_text())[-1]["job_id"])
    assert orch("resume", run_id, "--wait").returncode == 0

    result = orch("status", run_id, "--json", "--suggest")
    status = json.loads(result.stdout)
    found, parts = status["goodput"], status["goodput"]["parts_h"]
    assert found["parts_not_recorded"] == [] and found["device"] == "CPU rank"
    assert sum(parts.values()) == pytest.approx(found["allocated_h"], rel=1e-6)
    assert (run_dir / "rolled_back.jsonl").read_text() and parts["rolled_back"] > 0
    assert parts["idle"] == 0  # the kill ended the first job's allocation: the wait for `orch resume` is not in it
    assert found["steps"]["counted"] == 20 and found["steps"]["rolled_back"] >= 3
    assert 0 < found["percent"] < 100
    assert status["checkpoint_interval"]["interruptions"] == 1 and status["checkpoint_interval"]["interval_steps"]
    table = orch("status", run_id).stdout
    assert "Goodput: where the allocated CPU rank-h went" in table and "rolled_back" in table, table
