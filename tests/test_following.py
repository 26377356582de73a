"""Following a run: the job log's progress lines, the one ETA, and the phase the progress display shows (the
commands themselves, on a training run: tests/test_end_to_end.py)."""

import json
import logging
import time
from pathlib import Path

import pytest

from jobs.progress_log import ProgressLog, step_line, validation_line
from orchestrator.core.eta import clock, eta_s
from orchestrator.core.rundir import Run
from tests.conftest import ROOT


def test_the_eta_is_the_steps_left_at_the_step_time():
    assert eta_s(150, 200, 2.0) == 100.0
    assert eta_s(200, 200, 2.0) == eta_s(210, 200, 2.0) == 0.0
    assert eta_s(10, 200, None) is None
    assert clock(3 * 86400 + 61.9) == "72:01:01"
    assert clock(None) == "-"


def metrics(loss: float, step_time_s: float, tokens_per_s: float, data_wait: float, **more: float) -> dict:
    return {
        "loss": loss,
        "lr": 1e-4,
        "step_time_s": step_time_s,
        "tokens_per_s": tokens_per_s,
        "data_wait_fraction": data_wait,
        **more,
    }


def test_a_step_line_gives_the_interval_its_rates_over_its_time():
    interval = [metrics(4.0, 1.0, 1000, 0.1, mfu=0.4), metrics(2.0, 3.0, 2000, 0.0, mfu=0.2)]
    assert step_line(20, 100, interval) == (
        "step 20/100 | loss 3.0000 | lr 1.000e-04 | 1,750 tok/s | MFU 25.0% | step time 2.000 s | data wait 2.5% | "
        "ETA 0:02:40"
    )


def test_the_first_step_of_a_job_is_start_up_and_gives_no_eta():
    line = step_line(31, 100, [metrics(3.5, 42.0, 24, 0.0)], first=True)
    assert line.startswith("step 31/100 | loss 3.5000 | lr 1.000e-04 | 24 tok/s | step time 42.000 s | data wait 0.0%")
    assert "ETA - (the job's first step: warm-up and any compilation" in line and "MFU" not in line


def test_a_validation_line_names_every_score():
    found = {"loss": 3.0, "val_loss": 2.5, "val_perplexity": 12.18249, "val_loss/cs": 2.4, "eval_s": 1.26}
    assert validation_line(10, found) == (
        "validation at step 10: val_loss 2.5000, val_perplexity 12.1825, val_loss/cs 2.4000 (1.3 s)"
    )


def logged_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "orch.train"]


def test_a_job_logs_every_n_steps_its_validations_commits_and_end(caplog: pytest.LogCaptureFixture):
    committed: list[int | None] = [None]
    progress = ProgressLog(every_steps=10, steps=25, start_step=0, committed=lambda: committed[-1])
    with caplog.at_level(logging.INFO, logger="orch.train"):
        for done in range(1, 26):
            if done == 12:
                committed.append(10)  # the save of step 10 commits in the background
            validated = {"val_loss": 2.0, "eval_s": 0.5} if done % 10 == 0 else {}
            progress.step(done, {**metrics(3.0, 0.5, 100, 0.0), **validated}, last=done == 25)
        committed.append(25)
        progress.completed()
    lines = logged_lines(caplog)
    assert [line.split(" |")[0] for line in lines] == [
        "step 1/25",
        "step 10/25",
        "validation at step 10: val_loss 2.0000 (0.5 s)",
        "checkpoint saved at step 10 (committed)",
        "step 20/25",
        "validation at step 20: val_loss 2.0000 (0.5 s)",
        "step 25/25",
        "checkpoint saved at step 25 (committed)",
        "training completed: 25 steps",
    ]
    assert lines[1].endswith("step time 0.500 s | data wait 0.0% | ETA 0:00:07")  # 15 steps at 0.5 s


def test_a_stop_says_where_the_next_start_resumes(caplog: pytest.LogCaptureFixture):
    committed = [30]
    progress = ProgressLog(every_steps=10, steps=100, start_step=30, committed=lambda: committed[-1])
    with caplog.at_level(logging.INFO, logger="orch.train"):
        for done in (31, 32, 33):
            progress.step(done, metrics(3.0, 0.5, 100, 0.0), last=done == 33)
        committed.append(33)
        progress.stopped("requeued", 33)
    assert [line.split(" |")[0] for line in logged_lines(caplog)] == [
        "step 31/100",
        "step 33/100",
        "checkpoint saved at step 33 (committed)",
        "stopping at step 33/100, at the time limit, requeued: the next start resumes from the checkpoint at step 33",
    ]


def write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_the_phase_of_a_starting_job_comes_from_its_log_attempt_and_rank_0s_beat(tmp_path: Path):
    run = Run(tmp_path / "run")
    recipe = (ROOT / "recipes/tiny.yaml").read_text().replace("  seed: 0\n", "  seed: 0\n  compile: true\n")
    run.dir.mkdir()
    (run.dir / "recipe.yaml").write_text(recipe)
    now = time.time()
    write(run.dir / "jobs.json", [{"job_id": "4242", "executor": "local", "submitted": now}])
    assert run.phase("queued") == "queued"
    log = run.log_files("4242", 0)[0]
    log.parent.mkdir(parents=True)
    log.touch()  # the scheduler started the job: imports, joining the ranks
    assert run.phase("queued") == "starting"

    def started(start_step: int, ended: str | None = None) -> None:
        write(run.dir / "attempts.json", [{"job_id": "4242", "start_step": start_step, "started": now, "ended": ended}])

    def beat(phase: str, step: int) -> None:
        beat = {"job_id": "4242", "rank": 0, "host": "h", "pid": 99, "step": step, "phase": phase}
        write(run.ranks_dir / "4242.rank0.json", {**beat, "since": now, "deadline": now + 60, "updated": now})

    def heartbeat(step: int) -> None:
        report = {"state": "running", "step": step, "steps": 40, "job_id": "4242", "updated": now}
        write(run.dir / "progress.json", report)

    started(0)
    assert run.phase("queued") == "starting"  # no beat yet
    beat("load", 0)
    assert run.phase("running") == "starting"  # nothing to load at step 0
    started(20)
    beat("start", 0)
    assert run.phase("queued") == "starting"
    beat("load", 0)
    heartbeat(20)
    assert run.phase("running") == "loading checkpoint"
    beat("forward_backward", 20)
    assert run.phase("running") == "compiling"
    heartbeat(21)
    assert run.phase("running") == "training"  # a step is done: rank 0's beat is behind
    beat("data", 21)
    assert run.phase("running") == "training"
    beat("eval", 30)
    heartbeat(30)
    assert run.phase("running") == "validating"
    beat("save", 30)
    assert run.phase("running") == "saving checkpoint"
    heartbeat(31)
    assert run.phase("running") == "training"
    started(20, ended="requeued")
    assert run.phase("queued") == "requeued"
    assert run.phase("completed") == "completed"
