"""How `orch status` reads a store of many runs: each run file once, through pydantic's JSON parser where it can, with
the same values and the same words for damage as parsing with json.loads and validating the result."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from orchestrator.cli import app
from orchestrator.cli.app import run_summaries
from orchestrator.core import rundir, status_cache
from orchestrator.core.rundir import Run, all_runs, listed_runs
from orchestrator.core.runfiles import DamagedFile, JobRecord, Progress, RunInfo, adapter, describe, read_model

PROGRESS = {"state": "running", "step": 3, "steps": 10, "job_id": "7", "updated": 1.0}


def as_before(text: str, model) -> str:
    """What read_model gave before it tried pydantic's parser: the value (as its repr, where NaN equals NaN), or the
    DamagedFile's reason."""
    try:
        return repr(adapter(model).dump_python(adapter(model).validate_python(json.loads(text))))
    except ValueError as err:
        return describe(err)


@pytest.mark.parametrize(
    "text, model",
    [
        (json.dumps(PROGRESS), Progress),
        (json.dumps({**PROGRESS, "loss": float("nan")}), Progress),  # NaN: a diverged loss is still readable
        (json.dumps({**PROGRESS, "step": "3", "loss": "1e3", "extra": [1]}), Progress),
        (json.dumps(PROGRESS)[:-1] + ', "step": 5}', Progress),  # a repeated key: the last one
        (json.dumps(PROGRESS).replace('"7"', '"\\ud800"'), Progress),  # a lone surrogate pydantic's parser refuses
        (json.dumps({**PROGRESS, "step": -1}), Progress),
        (json.dumps(PROGRESS) + " x", Progress),
        ('{"state": "running", "step": 3,', Progress),
        ('{"run_id": "r", "created": NaN, "profile": "p", "recipe": "r", "steps": 1, "stop_before_end_s": 1}', RunInfo),
        ('[{"job_id": "-1", "executor": "local", "submitted": 0}]', list[JobRecord]),
        ("[]", Progress),
    ],
)
def test_a_run_file_reads_as_json_loads_and_validation_read_it(tmp_path: Path, text: str, model):
    path = tmp_path / "file.json"
    path.write_text(text)
    try:
        found = repr(adapter(model).dump_python(read_model(path, model)))
    except DamagedFile as damage:
        found = damage.why
    assert found == as_before(text, model)


def write_run(runs: Path, run_id: str, created: float, damaged: bool = False) -> None:
    folder = runs / run_id
    folder.mkdir(parents=True)
    info = {"run_id": run_id, "created": created, "profile": "local", "recipe": "tiny", "steps": 10}
    (folder / "run.json").write_text("{" if damaged else json.dumps({**info, "stop_before_end_s": 0}))
    (folder / "jobs.json").write_text(json.dumps([{"job_id": "123", "executor": "local", "submitted": 0}]))
    (folder / "progress.json").write_text(json.dumps({**PROGRESS, "state": "completed", "job_id": "123"}))


def test_the_listing_orders_runs_by_creation_with_damaged_ones_first(orch_home: Path):
    runs = orch_home / "runs"
    now = time.time()
    write_run(runs, "b", now + 1)
    write_run(runs, "a", now + 2)
    write_run(runs, "c", now, damaged=True)
    (runs / "not-a-run").mkdir()
    (runs / "a-file").write_text("")
    listed = listed_runs()
    assert [(run.id, info and info.run_id) for run, info in listed] == [("c", None), ("b", "b"), ("a", "a")]
    assert [run.id for run in all_runs()] == ["c", "b", "a"]


def test_status_reads_each_run_json_once(orch_home: Path, monkeypatch: pytest.MonkeyPatch):
    for number in range(3):
        write_run(orch_home / "runs", f"run-{number}", time.time() + number, damaged=number == 1)
    reads: list[str] = []

    def counted(path: Path, model, default=None):
        reads.append(path.name)
        return read_model(path, model, default)

    monkeypatch.setattr(rundir, "read_model", counted)
    summaries = [summary for _, summary in run_summaries()]
    assert [s["state"] for s in summaries] == ["damaged", "completed", "completed"]
    assert reads.count("run.json") == 4  # once for each run, and again for the damaged one to say why
    assert summaries == [Run(run.dir).summary() for run, _ in listed_runs()]


def counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The run files read from here on, as `run/file`."""
    reads: list[str] = []

    def counted(path: Path, model, default=None):
        reads.append(f"{path.parent.name}/{path.name}")
        return read_model(path, model, default)

    monkeypatch.setattr(rundir, "read_model", counted)
    return reads


def test_a_finished_runs_summary_is_reused_until_one_of_its_files_changes(
    orch_home: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(status_cache, "RACY_S", -1.0)  # the files written a moment ago count as settled
    for number in range(3):
        write_run(orch_home / "runs", f"run-{number}", time.time() + number, damaged=number == 1)
    first = run_summaries()
    reads = counting_reads(monkeypatch)
    assert [(run.id, s) for run, s in run_summaries()] == [(run.id, s) for run, s in first]
    assert reads == []
    progress = orch_home / "runs" / "run-2" / "progress.json"
    progress.write_text(json.dumps({**json.loads(progress.read_text()), "loss": 1.5}))
    third = run_summaries()
    assert {read.split("/")[0] for read in reads} == {"run-2"}
    assert [s["loss"] for _, s in third] == [None, None, 1.5]
    assert [s for _, s in third] == [Run(run.dir).summary() for run, _ in listed_runs()]


def test_a_cached_failed_run_is_read_again_when_its_job_is_alive_again(
    orch_home: Path, monkeypatch: pytest.MonkeyPatch
):
    """A job that Slurm requeued after its rank reported a failure is listed again before any file changes."""
    monkeypatch.setattr(status_cache, "RACY_S", -1.0)
    write_run(orch_home / "runs", "run-0", time.time())
    progress = orch_home / "runs" / "run-0" / "progress.json"
    progress.write_text(json.dumps({**PROGRESS, "job_id": "123", "updated": time.time()}))
    assert [s["state"] for _, s in run_summaries()] == ["failed"]  # the local job 123 is not alive
    real = app.ask_alive
    monkeypatch.setattr(app, "ask_alive", lambda jobs: ({job: True for job in jobs}, {}))
    assert [s["state"] for _, s in run_summaries()] == ["running"]
    monkeypatch.setattr(app, "ask_alive", real)
    assert [s["state"] for _, s in run_summaries()] == ["failed"]


def test_a_summary_made_just_after_a_change_is_not_kept(orch_home: Path, monkeypatch: pytest.MonkeyPatch):
    """Within the file system's timestamp granularity a rewritten file can look unchanged: such runs are read."""
    monkeypatch.setattr(status_cache, "RACY_S", 3600.0)  # "just after" whatever this machine's pace
    write_run(orch_home / "runs", "run-0", time.time())
    run_summaries()
    reads = counting_reads(monkeypatch)
    run_summaries()
    assert "run-0/run.json" in reads


def forged(cache: Path, change) -> str:
    """The cache as written, with `change` applied to run-0's entry."""
    data = json.loads(cache.read_text())
    change(data["runs"]["run-0"])
    return json.dumps(data)


@pytest.mark.parametrize(
    "damage",
    ["garbage", "fifo", "other version", "wrong shape", "a number as a string", "a missing field", "an extra field"],
)
def test_a_damaged_cache_is_ignored_and_made_again(orch_home: Path, monkeypatch: pytest.MonkeyPatch, damage: str):
    """Nothing in the cache can make `orch status` fail or show other than the run files say."""
    monkeypatch.setattr(status_cache, "RACY_S", -1.0)
    for number in range(2):
        write_run(orch_home / "runs", f"run-{number}", time.time() + number)
    expected = [s for _, s in run_summaries()]
    cache = orch_home / "runs" / status_cache.CACHE
    text = {
        "garbage": lambda: "\0{not json",
        "other version": lambda: json.dumps({"version": 0, "runs": {}}),
        "wrong shape": lambda: json.dumps({"version": status_cache.VERSION, "runs": {"run-0": [1], "run-1": {}}}),
        "a number as a string": lambda: forged(cache, lambda entry: entry["summary"].update(loss="2.5")),
        "a missing field": lambda: forged(cache, lambda entry: entry.pop("job")),
        "an extra field": lambda: forged(cache, lambda entry: entry["summary"].update(shown="planted")),
    }.get(damage, lambda: "")()
    cache.unlink()
    if damage == "fifo":
        os.mkfifo(cache)  # read without waiting for a writer
    else:
        cache.write_text(text)
    assert [s for _, s in run_summaries()] == expected
    assert cache.is_file() and set(json.loads(cache.read_text())["runs"]) == {"run-0", "run-1"}
