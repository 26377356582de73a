"""How `orch status` reads a store of many runs: each run file once, through pydantic's JSON parser where it can, with
the same values and the same words for damage as parsing with json.loads and validating the result."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orchestrator.cli.app import summarise
from orchestrator.core import rundir
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
    summaries = summarise(listed_runs())
    assert [s["state"] for s in summaries] == ["damaged", "completed", "completed"]
    assert reads.count("run.json") == 4  # once for each run, and again for the damaged one to say why
    assert summaries == [Run(run.dir).summary() for run, _ in listed_runs()]
