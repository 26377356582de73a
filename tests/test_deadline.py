"""The job's deadline (orchestrator/core/deadline.py, jobs/deadline.py): the lead, the earliest end, the warning
signal, the record and its goodput part as pure functions; and one run on the local Slurm whose limit is shortened,
whose node is reserved for maintenance and whose saves are slow, each stop committing before the end and resuming
from the step it stopped at."""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.chaos import SLOW_SAVE_S
from orchestrator.core import deadline, goodput
from orchestrator.core.checkpoints import committed_step
from orchestrator.core.deadline import Deadline, End, Lead
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import Attempt
from orchestrator.core.schedulers.slurm import slurm_time
from tests.conftest import module_home, needs_slurm, orch, status_json, submitted_run_id, wait_until
from tests.test_goodput import T0, assert_adds_up, make_run, rank_seconds, steps


def test_the_lead_is_the_p95_step_interval_plus_the_longest_save_plus_the_margin():
    found = deadline.lead([1.0] * 19 + [5.0], planned_step_s=2.0, save_s=3.0, planned_save_s=0.5)
    assert found.step_s == pytest.approx(1.2)  # the 95th percentile of 20 intervals, between the 19th and the 20th
    assert found.total_s == pytest.approx(1.2 + 3.0 + deadline.SAFETY_MARGIN_S)
    assert (found.steps_measured, found.save_measured) == (20, True)
    assert "measured, the run's longest" in found.why()


def test_before_anything_is_measured_the_planner_s_step_and_save_make_the_lead():
    found = deadline.lead([], planned_step_s=2.0, save_s=None, planned_save_s=0.5)
    assert (found.step_s, found.save_s, found.save_measured) == (2.0, 0.5, False)
    assert "planned, no save measured yet" in found.why()


def test_the_earliest_end_decides_and_the_job_stops_the_lead_before_it():
    ends = [End(1000.0, "time limit"), End(900.0, "reservation maint"), None]
    chosen = Deadline(deadline.earliest(ends), Lead(1.0, 10, 4.0, True))
    assert chosen.end.source == "reservation maint"
    assert chosen.stop_at == pytest.approx(900 - 1 - 4 - deadline.SAFETY_MARGIN_S)
    assert deadline.earliest([None]) is None


def test_a_deadline_is_recorded_again_when_its_end_changes_or_its_stop_moves_beyond_the_jitter():
    base = Deadline(End(1000.0, "time limit"), Lead(1.0, 10, 4.0, True))
    assert base.differs(None)
    assert not base.differs(Deadline(End(1000.0, "time limit"), Lead(1.5, 11, 4.0, True)))
    assert base.differs(Deadline(End(1000.0, "time limit"), Lead(1.0, 11, 9.0, True)))
    assert base.differs(Deadline(End(990.0, "time limit"), Lead(1.0, 10, 4.0, True)))


def test_a_warning_signal_the_time_limit_explains_changes_nothing_and_any_other_stops_the_job():
    assert deadline.signal_explained(arrived=1000, reported_end=1080, signal_delay_s=60, check_s=30)
    assert not deadline.signal_explained(arrived=1000, reported_end=1200, signal_delay_s=60, check_s=30)
    assert not deadline.signal_explained(arrived=1000, reported_end=None, signal_delay_s=60, check_s=30)


def test_slurm_times_are_read_as_the_controller_s_local_time_and_unknown_ones_as_none():
    assert slurm_time("2026-12-06T17:18:12") == time.mktime((2026, 12, 6, 17, 18, 12, 0, 0, -1))
    assert [slurm_time(text) for text in ("N/A", "Unknown", "NONE", "")] == [None] * 4


def test_the_run_s_longest_measured_save_carries_over_to_its_next_jobs(tmp_path: Path):
    chosen = Deadline(End(T0 + 100, "time limit"), Lead(1.0, 10, 6.5, True))
    deadline.append_record(tmp_path, deadline.record("100", chosen, T0))
    deadline.append_record(tmp_path, deadline.record("100", Deadline(chosen.end, Lead(1, 0, 0.1, False)), T0 + 1))
    deadline.append_record(tmp_path, deadline.record("100", chosen, T0 + 80, stopped_step=42))
    records = deadline.read_records(tmp_path)
    assert deadline.longest_save(records) == 6.5
    assert deadline.commits(records) == [T0 + 80] and records[-1].stopped_step == 42


def test_the_time_from_a_deadline_s_final_commit_to_the_allocation_s_end_is_its_own_goodput_part(tmp_path: Path):
    """Steps 1-10 end at +11; the save the job stopped with commits at +12; it requeues and starts again at +20."""
    run = make_run(
        tmp_path / "run",
        [
            {"job_id": "100", "launched": T0, "started": T0, "ended": "requeued", "stopped": T0 + 13},
            {"job_id": "100", "launched": T0 + 20, "started": T0 + 20, "start_step": 10, "stopped": T0 + 27},
        ],
        kept=steps(1, 10, T0 + 1) + steps(11, 15, T0 + 21),
        beat=T0 + 27,
        committed=15,
    )
    stopped = Deadline(End(T0 + 25, "time limit"), Lead(1.0, 10, 2.0, True))
    deadline.append_record(run.dir, deadline.record("100", stopped, T0 + 12, stopped_step=10))
    parts = rank_seconds(goodput.of_run(run, "completed")[1])
    assert (parts["after_last_commit"], parts["other"], parts["idle"]) == (8, 1 + 1, 0)  # +1: the second job's exit
    assert_adds_up(goodput.of_run(run, "completed")[1])


# --- on the local Slurm -----------------------------------------------------------------------------------------------

RESERVATION = "orch_deadline_test"
POLL_S = 1  # the run's deadline_poll_s: a change is seen within it
HEADROOM_S = 6  # a new end comes this long beyond the job's lead (the poll, a step, the scheduler's answer)


def scontrol(*arguments: str) -> None:
    done = subprocess.run(["scontrol", *arguments], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def attempts(run: Run) -> list[Attempt]:
    return run.attempts


def stop_records(run: Run) -> list[deadline.DeadlineRecord]:
    return [r for r in deadline.read_records(run.dir) if r.stopped_step is not None]


def lead_with_slow_save(run: Run, since: float) -> float | None:
    """The lead of the newest deadline chosen after `since` once it counts a slow save (slow-save@3), else None."""
    chosen = [r for r in deadline.read_records(run.dir) if r.chosen > since and r.save_s >= SLOW_SAVE_S]
    return chosen[-1].lead_s if chosen else None


def end_within_lead(run: Run, since: float, wait: str) -> float:
    """Once the job's lead counts a slow save: the end that leaves it its lead and HEADROOM_S, from now."""
    wait_until(lambda: lead_with_slow_save(run, since), wait, timeout=120, poll_s=0.2)
    return math.ceil(lead_with_slow_save(run, since) + HEADROOM_S)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One run, two starts of its job: the first stopped by a limit shortened mid-run, the second by a maintenance
    reservation created on its node mid-run; every save from step 3 on is slow (ORCH_CHAOS=slow-save@3). Tracking to
    the spool only and no system metrics: each start costs less, and neither is what this checks."""
    with module_home(tmp_path_factory, "deadline", ORCH_CHAOS="slow-save@3"):
        began = time.time()
        result = orch("submit", "--profile", "local-slurm", "--recipe", "tiny", "--steps", "2000", "--time", "10",
                      "--set", f"deadline_poll_s={POLL_S}", "--set", "recipe.checkpoint.every_steps=3",
                      "--set", "job_tracking=spool", "--set", "system_metrics_interval_s=0")  # fmt: skip
        run_id = submitted_run_id(result)
        run = Run(Path(status_json(run_id)["run_dir"]))
        job_id = run.jobs[-1].job_id
        try:
            left = end_within_lead(run, 0, "a lead that counts the slow save")
            scontrol("update", f"JobId={job_id}", f"EndTime=now+{left}seconds")
            shortened = {"at": time.time(), "end_in_s": left}
            wait_until(lambda: len(stop_records(run)) == 1, "the stop at the shortened limit", timeout=120, poll_s=0.2)
            scontrol("update", f"JobId={job_id}", "TimeLimit=10")  # the requeued job gets its limit back
            wait_until(lambda: len(attempts(run)) == 2, "the second start", timeout=120, poll_s=0.2)
            left = end_within_lead(run, attempts(run)[1].started, "the second start's lead")
            scontrol("create", "reservation", f"ReservationName={RESERVATION}", f"StartTime=now+{left}seconds",
                     "Duration=10", "Users=root", "Flags=maint,ignore_jobs", "Nodes=ALL")  # fmt: skip
            reserved = {"at": time.time(), "end_in_s": left}
            wait_until(lambda: len(stop_records(run)) == 2, "the stop before the reservation", timeout=120, poll_s=0.2)
            wait_until(lambda: attempts(run)[1].ended, "the second start's end", timeout=60, poll_s=0.2)
        finally:
            orch("cancel", run_id)  # its requeue waits for the reservation: it would resume as the second start did
            subprocess.run(["scontrol", "delete", f"ReservationName={RESERVATION}"], capture_output=True, timeout=60)
        yield {"run": run, "shortened": shortened, "reserved": reserved, "took_s": time.time() - began}


def spooled_steps(run: Run) -> list[int]:
    return [json.loads(line)["step"] for line in (run.dir / "metrics.jsonl").read_text().splitlines()]


def stop_of(found: dict[str, Any], allocation: int) -> deadline.DeadlineRecord:
    return stop_records(found["run"])[allocation]


def report(found: dict[str, Any], case: str, allocation: int, capsys: pytest.CaptureFixture[str]) -> None:
    """The lead the job chose and the steps it lost, printed into the test output whatever pytest captures."""
    stop, run = stop_of(found, allocation), found["run"]
    spooled = spooled_steps(run)
    lost = sum(1 for line in (run.dir / "rolled_back.jsonl").read_text().splitlines()) if (
        run.dir / "rolled_back.jsonl").exists() else 0  # fmt: skip
    with capsys.disabled():
        print(f"\n{case}: stopped at step {stop.stopped_step} with a lead of {stop.lead_s:.1f} s ({stop.why}), "
              f"committed {stop.end - stop.committed:.1f} s before the {stop.source}; {lost} step(s) rolled back; "
              f"{len(spooled)} steps spooled; the run took {found['took_s']:.0f} s")  # fmt: skip


@pytest.mark.slow
@needs_slurm
def test_a_limit_shortened_mid_run_is_followed_and_the_job_commits_before_it(chain, capsys):
    stop, second = stop_of(chain, 0), attempts(chain["run"])[1]
    assert stop.source == "time limit" and stop.committed < stop.end
    assert stop.end <= chain["shortened"]["at"] + chain["shortened"]["end_in_s"] + 1  # the shortened end, not 10 min
    assert attempts(chain["run"])[0].ended == "requeued"
    assert second.start_step == stop.stopped_step  # resumed from the step it stopped at: nothing lost
    report(chain, "limit shortened", 0, capsys)


@pytest.mark.slow
@needs_slurm
def test_a_maintenance_reservation_on_the_job_s_node_is_followed_and_the_job_commits_before_it(chain, capsys):
    stop, run = stop_of(chain, 1), chain["run"]
    assert stop.source == f"reservation {RESERVATION}" and stop.committed < stop.end
    assert attempts(run)[1].ended == "requeued"
    # the next start resumes from the newest committed checkpoint, as the second did: the step it stopped at
    assert committed_step(run.checkpoints_dir) == stop.stopped_step == spooled_steps(run)[-1]
    report(chain, "maintenance reservation", 1, capsys)


@pytest.mark.slow
@needs_slurm
def test_a_slow_save_lengthens_the_lead_and_the_slow_final_save_still_commits_before_the_end(chain):
    for stop in stop_records(chain["run"]):
        assert stop.save_measured and stop.save_s >= SLOW_SAVE_S
        assert stop.lead_s >= stop.save_s + deadline.SAFETY_MARGIN_S and stop.committed < stop.end
