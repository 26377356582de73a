"""A damaged run directory never takes orch down: each run file in turn is truncated, garbled, emptied, given the
wrong type or replaced by a symbolic link, in one run of a store that holds a healthy one too.

The run files are those of the table in docs/run-directory.md ("Files"); a file the trained run has not written (no
rollback, failure, hang or evaluation happened in it) is first written valid, through its model.

Invariants checked for every case: no traceback (an OrchError is the one-paragraph message `orch` prints), the
healthy run is still listed as it was, the damaged one is listed (as damaged where the file says what the run is),
and no process outside the run ever gets a signal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import typer.main
import typer.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import to_jsonable_python
from typer.testing import CliRunner

from jobs.entry import check_frozen_code
from jobs.shards import check_fingerprint, source_data
from orchestrator.cli import submit
from orchestrator.cli.app import app
from orchestrator.core.deadline import DeadlineRecord
from orchestrator.core.errors import OrchError
from orchestrator.core.evals import CheckpointEval, EvalsSent, TaskScores
from orchestrator.core.runfiles import Failure, Hang, MixChange, RankBeat, Recovery, Skip
from orchestrator.core.stragglers import Stragglers
from tests.conftest import fill, needs_root, orch, small_disk, status_json, submitted_run_id

DOC = Path(__file__).parent.parent / "docs" / "run-directory.md"
PLACEHOLDER = re.compile(r"<(\w+)(?::(\w+))?>")  # <job>, <step:08>: what a name holds, and its format


def documented_run_files() -> list[str]:
    """The names in the first column of the table under "## Files" in docs/run-directory.md, as patterns
    (`errors/<job>.rank<rank>.json`)."""
    section = DOC.read_text().split("\n## Files\n", 1)[1].split("\n## ", 1)[0]
    cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [name for cell in cells for name in re.findall(r"`([^`]+)`", cell)]


RUN_FILES = documented_run_files()


def test_the_readme_lists_every_run_file_of_the_run_directory_page():
    """The README's "Where things live" table says who writes each file; it names every file (or its folder) of the
    table this module fuzzes, so that a new run file cannot be added to one and not the other."""
    readme = (DOC.parent.parent / "README.md").read_text()
    section = readme.split("\n## Where things live\n", 1)[1].split("\n## ", 1)[0]
    cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    listed = {name for cell in cells for name in re.findall(r"`([^`]+)`", cell)}
    missing = [name for name in RUN_FILES if name not in listed and name.split("/")[0] + "/" not in listed]
    assert not missing, f"in docs/run-directory.md but not in the README's table: {missing}"
DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbled": lambda data: bytes(b ^ 0x5A for b in data[:64]) + data[64:],
    "empty": lambda data: b"",
    "wrong type": lambda data: b'"a string where a mapping or list belongs"',
    "not UTF-8": lambda data: b"\xff\xfe\x00" + data,
}
IDENTIFYING = {"run.json", "jobs.json", "progress.json", "attempts.json", "mlflow.json"}  # what status reads


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run, trained to completion by the local profile (10 steps, checkpoints at 5 and 10)."""
    home = tmp_path_factory.mktemp("template") / "orch-home"
    env = {**os.environ, "ORCH_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", "--steps", "10", "--set", "signal_delay_s=5", "--wait"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=Path(__file__).parent.parent,
    )
    submitted_run_id(result)
    return home


def store_with_two_runs(template: Path, home: Path) -> tuple[str, str]:
    """A copy of the template's store holding the run twice: (damaged-to-be, healthy)."""
    [source] = (template / "runs").iterdir()
    shutil.copytree(template, home)
    healthy = home / "runs" / source.name
    damaged = healthy.with_name(f"damaged-{source.name}")
    shutil.copytree(healthy, damaged, symlinks=True)
    return damaged.name, healthy.name


def run_file(run_dir: Path, pattern: str) -> Path:
    """The file a pattern of the table names in the run: of its newest job, rank 0, the checkpoint at step 10."""
    if found := sorted(run_dir.glob(PLACEHOLDER.sub("*", pattern))):
        return found[0]
    job = json.loads((run_dir / "jobs.json").read_text())[-1]["job_id"]
    names = {"job": job, "rank": 0, "node": "node0", "step": 10, "time": 1796555980}
    return run_dir / PLACEHOLDER.sub(lambda m: format(names[m[1]], m[2] or ""), pattern)


def valid(pattern: str, job: str) -> bytes:
    """Content its owner would write, for a documented file the trained run has not written."""
    now = 1796555980.0
    beat = RankBeat(
        job_id=job, rank=0, host="node0", pid=4242, step=10, phase="training", since=now, deadline=now + 60, updated=now
    )
    examples = {
        "rolled_back.jsonl": {"step": 9, "time_ms": 1, "metrics": {"loss": 2.0}},
        "skips.json": [Skip(steps=(3, 5), data_steps=(3, 5), by="hand", reason="a spike", time=now)],
        "mixture.json": [MixChange(from_step=5, weights={"": 1.0}, time=now)],
        "checkpoints/protected.json": {"10": "the last good checkpoint"},
        "errors/<job>.rank<rank>.json": Failure(
            job_id=job, rank=0, host="node0", step=10, type="RuntimeError", message="boom", time=now
        ),
        "errors/<job>.attempt1.recovery.json": Recovery(
            job_id=job,
            attempt=1,
            rank=0,
            host="node0",
            step=10,
            error="RuntimeError: boom",
            retried=False,
            reason="a second crash at the same step",
            time=now,
        ),
        "stragglers.json": Stragglers(job_id=job, step=10, window=20, scores=[]),
        "deadline.json": [
            DeadlineRecord(
                job_id=job, chosen=now, end=now + 600, source="limit", stop_at=now + 580, lead_s=20, step_s=5,
                save_s=5, save_measured=True, margin_s=10, why="p95 step 5 s + save 5 s + 10 s", stopped_step=10,
                committed=now + 590,
            )
        ],
        "hangs/<job>.<time>.json": Hang(job_id=job, detected_by=0, time=now, bound_s=60, stuck=[0], ranks=[beat]),
        "evals/step_<step>.json": CheckpointEval(
            step=10,
            tasks={
                "czech_cloze": TaskScores(
                    metrics={"acc": 0.5}, samples=2, limit=2, finished=now, device="cpu", lm_eval_version="0.4"
                )
            },
        ),
        "evals/sent/step_<step>.json": EvalsSent(mlflow_run_id="0" * 32, finished={"czech_cloze": now}),
    }
    if pattern not in examples:
        raise AssertionError(f"{pattern} is in the table of {DOC} but neither in the trained run nor made valid here")
    return (json.dumps(to_jsonable_python(examples[pattern])) + "\n").encode()


def damaged_file(home: Path, run_id: str, pattern: str) -> tuple[Path, bytes]:
    """The run's file a pattern names, and its valid content (written first where the run has none)."""
    run_dir = home / "runs" / run_id
    path = run_file(run_dir, pattern)
    if not path.is_file() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(valid(pattern, json.loads((run_dir / "jobs.json").read_text())[-1]["job_id"]))
    return path, path.read_bytes() if path.is_file() else b""


COMMAND = typer.main.get_command(app)  # typer builds it for each invoke, most of what a command takes here


def invoke(*args: str) -> tuple[int, str]:
    """The CLI in this process (fast enough for hundreds of cases): an OrchError is what `orch` prints as its one
    paragraph and exit code 2; any other exception is a crash."""
    with mock.patch.object(typer.testing, "_get_command", return_value=COMMAND):
        result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit | OrchError):
        raise AssertionError(f"orch {' '.join(args)} crashed") from result.exception
    if isinstance(result.exception, OrchError):
        return 2, result.output + str(result.exception)
    return result.exit_code, result.output


def check_store(damaged: str, healthy: str, file: str) -> None:
    code, out = invoke("status", "--json")
    assert code == 0, out
    listed = {s["run_id"]: s for s in json.loads(out)}
    assert listed[healthy]["state"] == "completed" and listed[healthy]["step"] == 10
    assert damaged in listed
    if file in IDENTIFYING:
        assert listed[damaged]["state"] in ("damaged", "completed", "failed")
        if listed[damaged]["state"] == "damaged":
            assert listed[damaged]["error"].startswith(f"damaged: {Path(file).name}:")
    code, out = invoke("ls")
    assert code == 0 and healthy in out and damaged in out, out
    for command in (("status", damaged), ("logs", damaged, "--lines", "5"), ("resume", damaged, "--steps", "12")):
        with pytest.MonkeyPatch.context() as patch:  # what a resume would queue is not at stake, only its checks
            patch.setattr(submit, "launch", lambda run, profile, plan, *_: "not-started")
            code, out = invoke(*command)
        assert code in (0, 2), out


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("file", RUN_FILES)
def test_a_damaged_run_file_marks_its_run_and_leaves_the_others(template, tmp_path, monkeypatch, file, kind):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, healthy = store_with_two_runs(template, tmp_path / "home")
    path, data = damaged_file(tmp_path / "home", damaged, file)
    path.write_bytes(DAMAGE[kind](data))
    check_store(damaged, healthy, file)


@pytest.mark.parametrize("file", ["run.json", "jobs.json", "progress.json", "checkpoints/latest.json"])
def test_a_symbolic_link_in_place_of_a_run_file_is_damage_not_a_path_to_follow(template, tmp_path, monkeypatch, file):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, healthy = store_with_two_runs(template, tmp_path / "home")
    path = tmp_path / "home" / "runs" / damaged / file
    path.unlink()
    path.symlink_to(tmp_path / "nowhere")
    check_store(damaged, healthy, file)


def fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def link_to_dev_zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def link_outside_the_run(path: Path) -> None:
    """The run's own file moved out of the run and linked back: valid content, but not a file of the run."""
    outside = path.parent.parent / f"outside-{path.name}"
    if path.exists():
        path.rename(outside)
    else:
        outside.touch()
    path.symlink_to(outside)


@contextmanager
def answers_within(seconds: int) -> Iterator[None]:
    """Fail instead of hanging the suite where a command waits forever (a FIFO opened for reading)."""

    def hung(*_: object) -> None:
        raise AssertionError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("special", [fifo, link_to_dev_zero, link_outside_the_run])
@pytest.mark.parametrize("file", [*RUN_FILES, ".orch.lock"])
def test_a_special_file_in_place_of_a_run_file_is_damage_never_read_or_waited_on(
    template, tmp_path, monkeypatch, file, special
):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, healthy = store_with_two_runs(template, tmp_path / "home")
    path, _ = damaged_file(tmp_path / "home", damaged, file)
    special(path)
    with answers_within(60):
        check_store(damaged, healthy, file)
        for command in (("cancel", damaged), ("repair", damaged, "--check")):
            code, out = invoke(*command)
            assert code in (0, 1, 2), out


def test_a_metrics_line_with_a_string_for_a_number_is_left_out_and_found_by_repair(template, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, healthy = store_with_two_runs(template, tmp_path / "home")
    spool = tmp_path / "home" / "runs" / damaged / "metrics.jsonl"
    with spool.open("a") as f:
        f.write(json.dumps({"step": 11, "time_ms": 1, "metrics": {"loss": "high"}}) + "\n")
    check_store(damaged, healthy, "metrics.jsonl")
    code, out = invoke("repair", damaged, "--check")
    assert code == 2 and "1 unreadable lines" in out, out


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from([[], {}]),
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3) | st.dictionaries(st.text(max_size=8), inner, min_size=1, max_size=3)
    ),
    max_leaves=6,
)


def one_value_changed(data: bytes, draw: st.DrawFn) -> bytes:
    """The file's JSON (a spool's first line) with one value, at any depth, replaced by any JSON value: valid but for
    one field, the damage that gets past the parser to what reads the fields."""
    text = data.decode(errors="replace").splitlines()[0] if data.strip() else "null"
    try:
        document = json.loads(text)
    except ValueError:
        return data
    holders, todo = [], [document]
    while todo:
        holder = todo.pop()
        keys = list(holder) if isinstance(holder, dict) else range(len(holder)) if isinstance(holder, list) else []
        holders += [(holder, key) for key in keys]
        todo += [holder[key] for key in keys]
    if not holders:
        return json.dumps(draw(JSON_VALUES)).encode()
    holder, key = draw(st.sampled_from(holders))
    holder[key] = draw(JSON_VALUES)
    return json.dumps(document).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    file=st.sampled_from(RUN_FILES),
    payload=st.binary(max_size=300) | st.none() | st.just("one value changed"),
    failed=st.booleans(),
    data=st.data(),
)
def test_any_bytes_in_any_run_file_never_crash_orch(template, tmp_path_factory, file, payload, failed, data):
    """In a completed run, or in one whose job failed (where orch reads why: errors/, hangs/, ranks/)."""
    home = tmp_path_factory.mktemp("fuzz") / "home"
    os.environ["ORCH_HOME"] = str(home)
    try:
        damaged, healthy = store_with_two_runs(template, home)
        if failed:
            progress = home / "runs" / damaged / "progress.json"
            progress.write_text(json.dumps({**json.loads(progress.read_text()), "state": "failed", "error": "boom"}))
        path, valid_bytes = damaged_file(home, damaged, file)
        if payload is None:
            path.unlink()
        elif isinstance(payload, str):
            path.write_bytes(one_value_changed(valid_bytes, data.draw))
        else:
            path.write_bytes(payload)
        check_store(damaged, healthy, file)
    finally:
        del os.environ["ORCH_HOME"]


def sacrificial_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


@pytest.mark.parametrize("job_id", ["-1", "0", "1", "--user=root", "12; rm -rf /", "99999999999", "own pid"])
def test_job_ids_from_a_run_directory_never_signal_a_process_outside_the_run(template, tmp_path, monkeypatch, job_id):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    # what a resume would start is not at stake here, only what it signals first: its jobs would train on in the
    # background through the tests that follow
    launched: list[str] = []
    monkeypatch.setattr(submit, "launch", lambda run, profile, plan, *_: launched.append(run.id) or "not-started")
    damaged, _ = store_with_two_runs(template, tmp_path / "home")
    bystander = sacrificial_process()
    try:
        for executor, ids in (("local", [job_id, str(bystander.pid)]), ("slurm", [job_id])):
            ids = [str(os.getpid()) if i == "own pid" else i for i in ids]
            for each in ids:
                jobs = [{"job_id": each, "executor": executor, "submitted": time.time() - 3600}]
                (tmp_path / "home" / "runs" / damaged / "jobs.json").write_text(json.dumps(jobs))
                for command in (("cancel", damaged), ("resume", damaged, "--force"), ("status", damaged)):
                    invoke(*command)
        time.sleep(0.3)
        assert bystander.poll() is None, "a process outside the run was signalled"
        assert launched, "no resume got past stopping the recorded job"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
def test_orch_repair_rebuilds_what_other_files_allow_and_the_run_resumes(template, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, _ = store_with_two_runs(template, tmp_path / "home")
    run_dir = tmp_path / "home" / "runs" / damaged
    (run_dir / "jobs.json").write_text("{torn")
    (run_dir / "checkpoints/latest.json").write_text('{"step": 999, "dir": "step_00000999"}')
    with (run_dir / "metrics.jsonl").open("a") as spool:
        spool.write("garbage that is not json}\n")
    (run_dir / "progress.json").write_text("")
    assert status_json(damaged)["state"] == "damaged"

    check = orch("repair", damaged, "--check")
    assert check.returncode == 2 and "jobs.json" in check.stdout and "damaged" in check.stdout, check.stdout
    assert "{torn" in (run_dir / "jobs.json").read_text()  # --check changes nothing
    repaired = orch("repair", damaged)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert json.loads((run_dir / "checkpoints/latest.json").read_text())["step"] == 10
    assert "garbage" not in (run_dir / "metrics.jsonl").read_text()
    assert status_json(damaged)["state"] in ("failed", "queued", "completed")

    resumed = orch("resume", damaged, "--steps", "12", "--wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert status_json(damaged)["step"] == 12


@pytest.mark.slow
def test_orch_repair_sets_aside_a_checkpoint_whose_commit_marker_is_damaged(template, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, _ = store_with_two_runs(template, tmp_path / "home")
    checkpoints = tmp_path / "home" / "runs" / damaged / "checkpoints"
    (checkpoints / "step_00000010/COMMITTED.json").write_text('"a string where a mapping belongs"')

    check = orch("repair", damaged, "--check")
    assert check.returncode == 2 and "step_00000010" in check.stdout, check.stdout
    repaired = orch("repair", damaged)
    assert (checkpoints / "damaged_step_00000010").is_dir(), repaired.stdout
    # the template keeps one checkpoint: none is left, and latest.json keeps naming it so no job trains from step 0
    assert repaired.returncode == 2 and "--from-scratch" in repaired.stdout, repaired.stdout
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 10


def test_a_spool_planted_as_a_link_is_never_appended_through(tmp_path):
    from jobs.tracking import MetricSpool
    from orchestrator.core.files import NotAPlainFile

    run_dir, outside = tmp_path / "run", tmp_path / "outside.jsonl"
    run_dir.mkdir()
    outside.write_text("kept\n")
    spool = MetricSpool(run_dir)
    for step in (1, 2, 3):
        spool.append(step, {"loss": 1.0 / step})
    spool.rolled_back.symlink_to(outside)
    with pytest.raises(NotAPlainFile):
        spool.rollback(1)
    spool.path.unlink()
    spool.path.symlink_to(outside)
    with pytest.raises(NotAPlainFile):
        spool.append(4, {"loss": 0.25})
    assert outside.read_text() == "kept\n"


def test_a_diverged_loss_of_nan_is_shown_not_taken_for_damage(template, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    diverged, healthy = store_with_two_runs(template, tmp_path / "home")
    path = tmp_path / "home" / "runs" / diverged / "progress.json"
    path.write_text(path.read_text().replace('"loss": ', '"loss": NaN, "was": '))
    code, out = invoke("status", "--json")
    assert code == 0, out
    assert {s["run_id"]: s["state"] for s in json.loads(out)}[diverged] == "completed"


def launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The runs `orch resume` would queue a job for, recorded instead of queued (their jobs are not at stake)."""
    launched: list[str] = []
    monkeypatch.setattr(submit, "launch", lambda run, profile, plan, *_: launched.append(run.id) or "not-started")
    return launched


def test_a_file_missing_from_the_frozen_code_stops_the_job_before_it_trains(template, tmp_path, monkeypatch):
    """Python would take the missing module from the checkout (its editable install) without a word."""
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    launched = launches(monkeypatch)
    damaged, healthy = store_with_two_runs(template, tmp_path / "home")
    run_dir = tmp_path / "home" / "runs" / damaged
    (run_dir / "code/jobs/train.py").unlink()

    code, out = invoke("repair", damaged, "--check")
    assert code == 2 and "code/jobs/train.py is missing" in out, out
    code, out = invoke("resume", damaged, "--steps", "12")
    assert code == 2 and "code/jobs/train.py is missing" in out and "--update-code" in out and not launched, out
    job = {"EXECUTOR": "local", "LOCAL_JOB_ID": "4242", "LOCAL_GLOBALID": "0", "LOCAL_LOCALID": "0"}
    for name, value in job.items():  # a job queued anyway checks first thing, before importing from code/
        monkeypatch.setenv(f"SUBMITIT_{name}", value)
    with pytest.raises(OrchError, match="code/jobs/train.py is missing"):
        check_frozen_code(run_dir)
    assert "code/jobs/train.py is missing" in json.loads((run_dir / "errors/4242.rank0.json").read_text())["message"]
    assert invoke("resume", healthy, "--steps", "12")[0] == 0 and launched == [healthy]


def test_another_corpus_in_the_prepared_folder_is_refused_naming_both_fingerprints(template, tmp_path, monkeypatch):
    """The same tokenizer, another content, a consistent index: only the fingerprint recorded at submission tells."""
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    launched = launches(monkeypatch)
    damaged, healthy = store_with_two_runs(template, tmp_path / "home")
    data = tmp_path / "home" / "runs" / damaged / "data"
    recorded = json.loads((data / "fingerprint.json").read_text())["sources"][""]["fingerprint"]
    index = json.loads((data / "train/index.json").read_text())
    shard = data / "train" / index["shards"][0]["file"]
    other = shard.read_bytes()[::-1]  # the same tokens in another order: another corpus of this tokenizer
    shard.write_bytes(other)
    index["shards"][0]["sha256"] = hashlib.sha256(other).hexdigest()
    (data / "train/index.json").write_text(json.dumps(index))  # written after the shard, as prepare does
    changed = source_data(data, ".").fingerprint

    code, out = invoke("resume", damaged, "--steps", "12")
    assert code == 2 and "training data changed" in out and not launched, out
    assert recorded[:16] in out and changed[:16] in out and "fingerprint.json" in out, out
    with pytest.raises(OrchError, match="training data changed"):
        check_fingerprint(data)  # what the job checks at its start
    assert invoke("resume", healthy, "--steps", "12")[0] == 0 and launched == [healthy]  # same content, moved


def test_the_export_of_a_killed_evaluation_is_removed_and_one_in_use_is_kept(template, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, _ = store_with_two_runs(template, tmp_path / "home")
    evals = tmp_path / "home" / "runs" / damaged / "evals"
    evals.mkdir()
    evaluation = (
        "import sys, time\nfrom pathlib import Path\nfrom orchestrator.core.files import temporary_folder\n"
        "with temporary_folder(Path(sys.argv[1]), '.step_10.model-') as folder:\n"
        "    print(folder, flush=True)\n    time.sleep(300)\n"
    )
    killed, live = (
        subprocess.Popen([sys.executable, "-c", evaluation, str(evals)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    )
    try:
        left, in_use = (Path(process.stdout.readline().strip()) for process in (killed, live))
        killed.kill()
        killed.wait()
        code, out = invoke("repair", damaged, "--check")
        assert code == 0 and left.name in out and "left over" in out and in_use.name not in out, out
        code, out = invoke("repair", damaged)
        assert code == 0 and "removed" in out, out
        assert not left.exists() and in_use.is_dir()
        assert sorted(p.name for p in evals.iterdir()) == sorted([in_use.name, f"{in_use.name}.owner"])
    finally:
        live.kill()
        live.wait()


@needs_root
@pytest.mark.slow
def test_a_full_disk_fails_the_final_save_with_its_reason_and_an_eval_with_one_paragraph(template, tmp_path):
    """The save that fills the disk is taken away once the job knows why it failed, to record it; the run keeps its
    last checkpoint. An evaluation on the full disk says where and what, and leaves no export behind."""
    with small_disk(tmp_path / "disk", "16m") as disk:
        home = disk / "home"
        shutil.copytree(template, home)
        [run_dir] = (home / "runs").iterdir()
        checkpoint = sum(f.stat().st_size for f in (run_dir / "checkpoints/step_00000010").iterdir())
        fill(disk, leave=checkpoint // 2)  # room for ten steps' records, not for the final save of step 20
        resumed = orch("resume", run_dir.name, "--steps", "20", "--wait", ORCH_HOME=str(home))
        assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stdout + resumed.stderr
        assert "No space left on device (the filesystem is full)" in resumed.stderr, resumed.stderr
        [failure] = [json.loads(p.read_text()) for p in (run_dir / "errors").glob("*.rank0.json")]
        assert "the filesystem is full" in failure["message"] and f"orch resume {run_dir.name}" in failure["message"]
        assert len(json.loads((run_dir / "attempts.json").read_text())) == 2  # the resume's job: no retry
        assert json.loads((run_dir / "checkpoints/latest.json").read_text())["step"] == 10
        assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000010"]
        assert not list((run_dir / "checkpoints").glob(".probe-*"))

        fill(disk, leave=0)
        evaluated = orch("eval", run_dir.name, "--tasks", "czech_cloze", "--limit", "2", ORCH_HOME=str(home))
        assert evaluated.returncode == 2 and "Traceback" not in evaluated.stderr, evaluated.stderr
        assert f"Cannot write {run_dir / 'evals'}" in evaluated.stderr, evaluated.stderr
        assert not list((run_dir / "evals").glob(".step_*"))


def test_a_scheduler_that_does_not_answer_leaves_its_runs_unknown_and_the_others_listed(
    template, tmp_path, monkeypatch
):
    from tests.test_settings import fake_squeue

    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    on_slurm, healthy = store_with_two_runs(template, tmp_path / "home")
    run_dir = tmp_path / "home" / "runs" / on_slurm
    (run_dir / "jobs.json").write_text(json.dumps([{"job_id": "7", "executor": "slurm", "submitted": time.time()}]))
    progress = json.loads((run_dir / "progress.json").read_text())
    (run_dir / "progress.json").write_text(json.dumps({**progress, "state": "running", "job_id": "7"}))
    fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Unable to contact slurm controller", rc=1)
    code, out = invoke("status", "--json")
    assert code == 0, out
    listed = {s["run_id"]: s for s in json.loads(out)}
    assert listed[healthy]["state"] == "completed"
    assert listed[on_slurm]["state"] == "unknown" and "Unable to contact slurm controller" in listed[on_slurm]["error"]


def test_a_profile_its_schema_refuses_stops_no_sync_of_the_other_runs(template, tmp_path, monkeypatch):
    from orchestrator.tools.sync import spooling_runs

    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    damaged, healthy = store_with_two_runs(template, tmp_path / "home")
    for name, tracking in ((healthy, "spool"), (damaged, "sometimes")):  # the second, its schema refuses
        with (tmp_path / "home" / "runs" / name / "profile.yaml").open("a") as profile:
            profile.write(f"job_tracking: {tracking}\n")
    assert [run.id for run in spooling_runs()] == [healthy]
