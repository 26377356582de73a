"""Hang detection (docs/watchdog.md): the process group's timeout, the watchdog's rules and "stalled" in `orch status`.
A rank frozen mid-run on the local Slurm is tests/test_slurm_chaos.py's."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs import watchdog
from orchestrator.core.config import PROFILES_DIR, WatchdogSpec
from orchestrator.core.files import write_json_atomic
from orchestrator.core.rundir import TERMINAL_STATES, Run
from orchestrator.core.runfiles import SILENT_S, Hang, RankBeat
from tests.conftest import free_port

# --- the process group's timeout ----------------------------------------------------------------------------------


def test_a_process_group_whose_peer_never_comes_fails_after_the_profiles_timeout(monkeypatch: pytest.MonkeyPatch):
    """The timeout reaches the group: here its rendezvous, where rank 1 never arrives; gloo's collectives and NCCL's
    watchdog take the same value."""
    from jobs.compat import reset_accelerate_state
    from jobs.distributed import start_process_group

    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                            WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1").items():  # fmt: skip
        monkeypatch.setenv(name, value)
    timeout_s, started = 2.0, time.monotonic()
    try:
        with pytest.raises(Exception, match="[Tt]imed out|[Tt]imeout"):
            start_process_group("cpu", "gloo", timeout_s)
    finally:
        reset_accelerate_state()
    assert time.monotonic() - started >= timeout_s


# --- the watchdog's rules -----------------------------------------------------------------------------------------

NOW = 1_000_000.0


def beat(rank: int, phase: str = "forward_backward", step: int = 7, since: float = -10, bound: float = 60,
         updated: float = 0) -> RankBeat:  # fmt: skip
    """A rank's beat, its times relative to NOW."""
    return RankBeat(
        job_id="42", rank=rank, host="node1", pid=1000 + rank, step=step, phase=phase, since=NOW + since,
        deadline=NOW + since + bound, updated=NOW + updated,
    )  # fmt: skip


def test_a_rank_silent_for_longer_than_the_step_bound_is_a_hang_whatever_its_phase():
    beats = {0: beat(0, "save", since=-100, bound=1800, updated=-61), 1: beat(1, since=-70, updated=-0.5)}
    assert watchdog.hung(beats, 2, NOW, step_bound=60, started=NOW - 600)
    assert watchdog.stuck(beats, 2, NOW) == [0]
    beats[0] = beat(0, "save", since=-100, bound=1800, updated=-0.5)  # alive, in a long save
    assert not watchdog.hung(beats, 2, NOW, step_bound=60, started=NOW - 600)


def test_silence_counts_from_a_few_beats_up_however_short_the_step_bound():
    beats = {0: beat(0, since=-0.5, bound=1, updated=-(SILENT_S - 1)), 1: beat(1, since=-0.5, bound=1)}
    assert not watchdog.hung(beats, 2, NOW, step_bound=1, started=NOW - 600)
    beats[0] = beat(0, since=-0.5, bound=1, updated=-(SILENT_S + 1))
    assert watchdog.hung(beats, 2, NOW, step_bound=1, started=NOW - 600)


def test_every_rank_past_its_bound_is_a_hang_and_the_ranks_furthest_behind_are_named():
    beats = {0: beat(0, step=8, since=-70), 1: beat(1, "data", step=7, since=-71), 2: beat(2, step=8, since=-70)}
    assert watchdog.hung(beats, 3, NOW, step_bound=60, started=NOW - 600)
    assert watchdog.stuck(beats, 3, NOW) == [1]


def test_a_rank_that_never_reported_is_named_once_the_bound_has_passed():
    beats = {0: beat(0, since=-70)}
    assert not watchdog.hung(beats, 2, NOW, step_bound=60, started=NOW - 30)
    assert watchdog.hung(beats, 2, NOW, step_bound=60, started=NOW - 61)
    assert watchdog.stuck(beats, 2, NOW) == [1]


def test_a_job_with_a_rank_that_left_training_is_ending_not_hung():
    beats = {0: beat(0, since=-70), 1: beat(1, watchdog.EXITED, updated=-300)}  # rank 1 failed and said why
    assert not watchdog.hung(beats, 2, NOW, step_bound=60, started=NOW - 600)


def test_a_step_restarts_the_clock_and_slow_phases_have_their_own():
    notes = watchdog.Notes()
    notes.note("data", 3)
    notes.note("forward_backward")
    started = notes.now[2]
    notes.note("data")
    assert notes.now == ("data", 3, started)  # micro-batches of one step share its clock
    notes.step_done(4, 0.5)
    assert notes.now[1] == 4 and notes.now[2] >= started and not notes.step_times  # the first step is not timed
    notes.note("save")
    saving = notes.now[2]
    notes.note("data", 4)
    assert notes.now[2] >= saving and notes.now[0] == "data"


def test_the_step_bound_is_the_factor_times_the_median_step_with_a_floor(tmp_path: Path):
    spec = WatchdogSpec(step_factor=10, min_step_s=5, first_step_s=900)
    dog = watchdog.Watchdog(tmp_path, "42", 0, 2, spec, "local", on_hang=lambda: None)
    watchdog.NOTES.reset()
    assert dog.step_bound() == 900  # no step timed yet: compiling, loading
    for seconds in (9.0, 0.2, 0.3, 0.4):  # the first step of a job is not timed
        watchdog.step_done(1, seconds)
    assert dog.step_bound() == 5  # 10 × 0.3 s is below the floor
    for _ in range(5):
        watchdog.step_done(2, 2.0)
    assert dog.step_bound() == pytest.approx(10 * 2.0)
    watchdog.note("eval")
    assert dog.beat(NOW).deadline - dog.beat(NOW).since == 900


def test_a_hang_counts_toward_the_requeue_loop_guard_like_a_requeue(tmp_path: Path):
    from jobs.train import end_attempt, record_start  # here: the process group test's ranks import this module

    run = Run(tmp_path)
    for ended in ("hang", "requeued"):
        assert record_start(run, "41", 10, nodes=1) is None
        end_attempt(run, "41", ended)
    reason = record_start(run, "41", 10, nodes=1)
    assert reason and "requeue loop" in reason
    assert [a.ended for a in run.attempts] == ["hang", "requeued", None]


def test_a_rank_that_finds_the_hang_reported_by_its_peer_leaves_instead_of_reporting_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Rank 0 was frozen while rank 1 reported the hang and requeued the job; Slurm's requeue wakes it (SIGCONT) past
    its own bound. Its watchdog finds the job hung, and the report of it: it leaves, without a second report or
    requeue."""
    dog = watchdog.Watchdog(tmp_path, "42", 0, 2, WatchdogSpec(first_step_s=10), "slurm", on_hang=lambda: None)
    dog.started = NOW - 200
    watchdog.NOTES.reset()
    watchdog.NOTES.now = ("forward_backward", 13, NOW - 100)  # untimed: the bound is first_step_s, long past
    write_json_atomic(tmp_path / "ranks/42.rank1.json", beat(1, since=-70, bound=60, updated=-0.5).model_dump())
    fired: list[float] = []
    monkeypatch.setattr(dog, "fire", lambda beats, now, bound: fired.append(now))
    dog.look(NOW)
    assert fired == [NOW]  # no report yet: this rank acts

    report = Hang(job_id="42", detected_by=1, time=NOW - 1, bound_s=10, stuck=[0], ranks=[beat(0), beat(1)])
    write_json_atomic(tmp_path / f"hangs/42.{int(NOW) - 1}.json", report.model_dump())
    monkeypatch.setattr(watchdog, "exit_now", lambda code: sys.exit(code))
    with pytest.raises(SystemExit):
        dog.look(NOW)
    assert fired == [NOW] and [p.name for p in (tmp_path / "hangs").iterdir()] == [f"42.{int(NOW) - 1}.json"]


def node_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: WatchdogSpec, ranks_per_node: int,
                seconds: int, step_s: float | None = None) -> list[float]:  # fmt: skip
    """The times at which the watchdogs of one node's ranks rewrite their beats over `seconds` of looks, one look a
    second each as in a job; `step_s`: steps of that length are timed first."""
    watchdog.NOTES.reset()
    for _ in range(3 if step_s else 0):
        watchdog.step_done(1, step_s)
    monkeypatch.setattr(watchdog, "time", SimpleNamespace(time=lambda: NOW))  # the watchdogs start at NOW
    dogs = [watchdog.Watchdog(tmp_path, "42", r, ranks_per_node, spec, "slurm", lambda: None, ranks_per_node)
            for r in range(ranks_per_node)]  # fmt: skip
    writes: list[float] = []
    for dog in dogs:
        monkeypatch.setattr(dog, "_write", lambda beat: writes.append(beat.updated))
    for tick in range(1, seconds + 1):
        watchdog.NOTES.now = ("forward_backward", 1, NOW + tick)  # a step has just finished: no rank is late
        for dog in dogs:
            dog.look(NOW + tick)
    return sorted(writes)


def test_a_node_of_eight_ranks_rewrites_one_beat_every_few_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Karolina's 8 ranks a node under the default bounds: one beat every NODE_BEAT_S from the node, spread out,
    instead of eight a second."""
    writes = node_writes(tmp_path, monkeypatch, WatchdogSpec(), 8, seconds=600, step_s=1.0)
    assert len(writes) / 600 <= 1 / watchdog.NODE_BEAT_S + 0.02  # 8 ranks × 1 per 20 s
    gaps = [b - a for a, b in zip(writes, writes[1:], strict=False)]
    assert min(gaps) >= watchdog.NODE_BEAT_S - 1  # turns, not bursts (looks come once a second)


def test_a_short_step_bound_keeps_beats_frequent_enough_to_tell_a_live_rank_from_a_silent_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    spec = WatchdogSpec(min_step_s=0.001, step_factor=3)
    writes = node_writes(tmp_path, monkeypatch, spec, 2, seconds=60, step_s=0.1)
    period = 60 * 2 / len(writes)
    assert period <= SILENT_S / 3 + 1  # a rank's beat is never older than a third of the silence that is a hang
    live = beat(0, updated=-period)
    assert not live.silent(NOW)


def test_a_rank_entering_a_save_rewrites_its_beat_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A save's deadline is first_step_s, not the step bound: peers past their own bound must see it at once."""
    dog = watchdog.Watchdog(tmp_path, "42", 0, 8, WatchdogSpec(), "slurm", lambda: None, 8)
    written: list[str] = []
    monkeypatch.setattr(dog, "_write", lambda beat: written.append(beat.phase))
    dog.next_write, dog.written_slow = NOW + 100, False
    watchdog.NOTES.now = ("forward_backward", 3, NOW - 0.5)
    dog.look(NOW)
    assert written == []
    watchdog.NOTES.now = ("save", 3, NOW)
    dog.look(NOW + 1)
    assert written == ["save"]


def test_a_beat_is_silent_after_two_missed_rewrites_and_never_before_the_floor():
    assert not beat(0, updated=-(SILENT_S - 1)).silent(NOW)
    assert beat(0, updated=-(SILENT_S + 1)).silent(NOW)
    slow = beat(0, updated=-30).model_copy(update={"every_s": 20.0})
    assert not slow.silent(NOW) and slow.model_copy(update={"updated": NOW - 41}).silent(NOW)


# --- "stalled" in orch status -------------------------------------------------------------------------------------


def running_run(tmp_path: Path, quiet_s: float, step_time_s: float | None) -> Run:
    """A run whose job (id 4242) reported running `quiet_s` ago, with the local profile's watchdog set to a floor of
    5 s, a factor of 10 and 300 s for a first step."""
    run, now = Run(tmp_path / "run"), time.time()
    bounds = "watchdog:\n  min_step_s: 5\n  step_factor: 10\n  first_step_s: 300\n"
    run.dir.mkdir(parents=True)
    (run.dir / "profile.yaml").write_text((PROFILES_DIR / "local.yaml").read_text() + bounds)
    write_json_atomic(run.dir / "run.json", {"run_id": "run", "created": now, "profile": "local", "recipe": "tiny",
                                             "steps": 100, "stop_before_end_s": 30})  # fmt: skip
    write_json_atomic(run.dir / "jobs.json", [{"job_id": "4242", "executor": "local", "submitted": now - 600}])
    progress = {"state": "running", "step": 30, "steps": 100, "job_id": "4242", "updated": now - quiet_s}
    write_json_atomic(run.dir / "progress.json", {**progress, "step_time_s": step_time_s})
    return run


def test_a_live_job_without_a_heartbeat_for_longer_than_the_bound_is_stalled(tmp_path: Path):
    assert running_run(tmp_path / "a", quiet_s=15, step_time_s=2.0).state(alive=True) == "running"  # bound 20 s
    stalled = running_run(tmp_path / "b", quiet_s=25, step_time_s=2.0)
    assert stalled.state(alive=True) == "stalled" and "stalled" not in TERMINAL_STATES
    summary = stalled.summary(alive=True)
    assert summary["state"] == "stalled" and "no step finished for 25 s" in summary["error"]
    assert stalled.state(alive=False) == "failed"  # a job that is gone is not stalled
    assert running_run(tmp_path / "c", quiet_s=6, step_time_s=0.1).state(alive=True) == "stalled"  # the 5 s floor


def test_before_its_first_step_a_job_has_the_first_step_bound(tmp_path: Path):
    assert running_run(tmp_path / "a", quiet_s=200, step_time_s=None).state(alive=True) == "running"
    assert running_run(tmp_path / "b", quiet_s=301, step_time_s=None).state(alive=True) == "stalled"


def test_rank_0_in_a_long_phase_within_its_bound_is_not_stalled(tmp_path: Path):
    run, now = running_run(tmp_path, quiet_s=60, step_time_s=2.0), time.time()
    saving = RankBeat(job_id="4242", rank=0, host="n1", pid=99, step=30, phase="save", since=now - 60,
                      deadline=now + 240, updated=now)  # fmt: skip
    write_json_atomic(run.ranks_dir / "4242.rank0.json", saving.model_dump())
    assert run.state(alive=True) == "running"
    write_json_atomic(run.ranks_dir / "4242.rank0.json", saving.model_copy(update={"updated": now - 30}).model_dump())
    assert run.state(alive=True) == "stalled"  # its watchdog went silent too
