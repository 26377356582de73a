"""Automatic recovery after a crash: a job requeues itself from its last checkpoint, within a budget, never for a
deterministic error, and keeps hosts that failed out of the next try. Crashes of real jobs on the local Slurm are
tests/test_slurm_chaos.py's."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs import watchdog
from jobs.chaos import PlantedFailure
from jobs.recovery import claim, decide, judge
from orchestrator.cli.app import app
from orchestrator.core.errors import OrchError
from orchestrator.core.files import write_json_atomic
from orchestrator.core.loading import load_profile
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import Hang, Recovery
from orchestrator.core.schedulers.slurm import excluding
from tests.conftest import ROOT


def local(**recovery: int):
    return load_profile("local", [{"recovery": recovery}] if recovery else [])[1]


def earlier(step: int, error: str, host: str = "n1") -> Recovery:
    return Recovery(job_id="7", attempt=1, rank=1, host=host, step=step, error=error, retried=True, reason="",
                    time=0.0)  # fmt: skip


def test_a_crash_is_retried_until_the_budget_is_spent_but_never_a_deterministic_or_user_error():
    crash = RuntimeError("NCCL error: unhandled system error")
    assert judge(local(), 13, "RuntimeError: x", [], crash)[0]
    assert judge(local(), 13, "RuntimeError: x", [earlier(5, "RuntimeError: y")], crash)[0]
    twice = judge(local(), 13, "RuntimeError: x", [earlier(13, "RuntimeError: x")], crash)
    assert not twice[0] and "same error at step 13" in twice[1]
    spent = judge(local(retries=1), 13, "RuntimeError: x", [earlier(5, "RuntimeError: y")], crash)
    assert not spent[0] and "1 automatic requeues" in spent[1]
    assert not judge(local(), 13, "OrchError: bad", [], OrchError("bad"))[0]
    assert not judge(local(retries=0), 13, "RuntimeError: x", [], crash)[0]


def test_orch_chaos_sigkill_kills_the_jobs_last_rank_once_per_run(tmp_path: Path):
    """sigkill@13 at training step 13: the last rank dies of SIGKILL the first time, and trains on after a requeue."""
    plant = "from pathlib import Path; from jobs import chaos; chaos.fail(13, {rank}, 2, Path({fired!r}))"
    env = {**os.environ, "ORCH_CHAOS": "sigkill@13"}
    tries = [
        subprocess.run([sys.executable, "-c", plant.format(rank=rank, fired=str(tmp_path))], env=env, cwd=ROOT)
        for rank in (0, 1, 1)
    ]
    assert [done.returncode for done in tries] == [0, -signal.SIGKILL, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["sigkill@13"]


def test_one_rank_decides_for_the_attempt_and_the_others_read_its_decision(tmp_path: Path):
    run = Run(tmp_path)
    write_json_atomic(tmp_path / "attempts.json", [{"job_id": "7", "start_step": 0, "started": 0.0}])
    first = decide(run, local(), "7", 1, 13, PlantedFailure("planted"))
    second = decide(run, local(), "7", 0, 13, RuntimeError("peer closed the connection"))
    assert first.retried and first.rank == 1 and second == first
    assert not claim(tmp_path / "errors" / "7.attempt1.recovery.json", second)  # taken: nothing is overwritten
    assert [p.name for p in (tmp_path / "errors").iterdir()] == ["7.attempt1.recovery.json"]


def test_a_failure_after_the_watchdog_requeued_the_job_for_a_hang_leaves_without_deciding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Rank 1 found the job hung and requeued it, and left; rank 0's collective broke with it. That is the hang's
    aftermath: no decision, no second requeue, no crash counted against the budget or the host."""
    run = Run(tmp_path)
    write_json_atomic(tmp_path / "attempts.json", [{"job_id": "7", "start_step": 0, "started": time.time()}])
    report = Hang(job_id="7", detected_by=1, time=time.time(), bound_s=5, stuck=[0], ranks=[])
    write_json_atomic(tmp_path / "hangs" / f"7.{int(report.time)}.json", report.model_dump())
    monkeypatch.setattr(watchdog, "exit_now", lambda code: sys.exit(code))
    with pytest.raises(SystemExit):
        decide(run, local(), "7", 0, 13, RuntimeError("Connection closed by peer"))
    assert not run.errors_dir.exists()


def test_orch_status_shows_a_crashs_message_as_written_whatever_brackets_it_quotes(orch_home: Path):
    """gloo's errors begin with their source line in brackets, which rich would read as a closing markup tag."""
    message = "[/__w/pytorch/third_party/gloo/pair.cc:537] Read error: Connection reset by peer"
    run_dir, now = orch_home / "runs" / "tiny-crashed", time.time()
    info = {"run_id": run_dir.name, "created": now, "profile": "local", "recipe": "tiny", "steps": 20}
    write_json_atomic(run_dir / "run.json", {**info, "stop_before_end_s": 30})
    write_json_atomic(run_dir / "jobs.json", [{"job_id": "999999999", "executor": "local", "submitted": now}])
    failure = {"job_id": "999999999", "rank": 0, "host": "n1", "step": 13, "type": "RuntimeError", "message": message}
    write_json_atomic(run_dir / "errors" / "999999999.rank0.json", {**failure, "time": now})
    shown = CliRunner().invoke(app, ["status", run_dir.name])
    assert shown.exit_code == 0, shown.output
    assert f"RuntimeError: {message} (rank 0 on n1 at step 13)" in " ".join(shown.output.split())


def test_hosts_that_failed_often_enough_are_excluded_from_the_next_job(tmp_path: Path):
    run = Run(tmp_path)
    for attempt, host in enumerate(["n1", "n2", "n1"], start=1):
        decision = earlier(13, "RuntimeError: x", host).model_copy(update={"attempt": attempt})
        write_json_atomic(tmp_path / "errors" / f"7.attempt{attempt}.recovery.json", decision.model_dump())
    assert run.suspect_hosts(exclude_after=2) == ["n1"]
    assert run.suspect_hosts(exclude_after=2, also_failed=("n2",)) == ["n1", "n2"]
    profile = load_profile("local-slurm", [{"slurm": {"extra_sbatch": {"exclude": "n9"}}}])[1]
    assert excluding(profile, ["n1"], lambda _: ["n1", "n2", "n9"]).slurm.extra_sbatch["exclude"] == "n1,n9"
    assert excluding(profile, ["n1"], lambda _: None).slurm.extra_sbatch["exclude"] == "n1,n9"  # sinfo cannot say
    assert excluding(local(), ["n1"]) == local()  # no scheduler to tell


def test_suspects_are_not_excluded_where_the_partition_would_keep_too_few_nodes_for_the_job(caplog):
    profile = load_profile("local-slurm", [{"nodes": 2}])[1]
    assert excluding(profile, ["n1"], lambda _: ["n1", "n2"]) == profile  # the job would wait for good
    assert "not excluding the suspect hosts n1: partition debug has 2 nodes" in caplog.text
    assert excluding(profile, ["n1"], lambda _: ["n1", "n2", "n3"]).slurm.extra_sbatch["exclude"] == "n1"
