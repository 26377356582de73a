"""`orch data prepare --profile P`: the input cut into slices that array tasks tokenize and commit on their own, merged
into the bytes a prepare without a profile writes; bad input; and the same on the two-node Slurm cluster."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.core.errors import OrchError
from orchestrator.tools.prepare import Settings, prepare, train_tokenizer
from orchestrator.tools.prepare_jobs import make_plan, progress, run_slices
from orchestrator.tools.prepare_slices import SLICES, record_failure, slice_states, start
from tests.conftest import orch
from tests.test_data_pipeline import documents, tree, write_jsonl

TWO_NODES = {"SLURM_CONF": "/etc/slurm-two-node/slurm.conf"}
SETTINGS = Settings(val_fraction=0.2, seed=3, dtype="auto", shard_tokens=97)
LONG = Settings(val_fraction=0.2, seed=3, dtype="auto", shard_tokens=8192)  # few shards: each is written durably


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(documents(300, seed=99, lines=3), 400, folder / "tokenizer")
    return folder / "tokenizer"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every kind of slice: plain files large enough to be cut into byte ranges (text blocks with blank lines, JSON
    Lines with a bad line), a compressed file, a table, an empty file."""
    folder = tmp_path_factory.mktemp("corpus") / "corpus"
    folder.mkdir()
    docs = documents(900, seed=5, lines=3)
    (folder / "a.txt").write_text("\n\n\n".join(docs[:300]) + "\n")
    write_jsonl(folder / "b.jsonl", docs[300:600])
    with open(folder / "b.jsonl", "ab") as f:
        f.write(b"not json\n\n")
    write_jsonl(folder / "c.jsonl.gz", docs[600:700], gzip.open)
    pq.write_table(pa.table({"text": docs[700:800]}), folder / "d.parquet", row_group_size=9)
    (folder / "e.txt").write_text("")
    write_jsonl(folder / "f.jsonl", docs[800:900])
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, corpus: Path) -> Path:
    """The corpus prepared without a profile, in one process."""
    output = tmp_path_factory.mktemp("ref") / "out"
    prepare(tokenizer_dir, [corpus], output, SETTINGS)
    return output


def splits(folder: Path) -> dict[str, bytes]:
    """What a prepare's result is: the shards, the indexes and the tokenizer's copy."""
    return {name: data for name, data in tree(folder).items() if name.split("/")[0] in ("train", "val", "tokenizer")}


def sliced(tokenizer_dir: Path, corpus: Path, output: Path, slice_bytes: int) -> None:
    plan, tokenizer = make_plan(tokenizer_dir, [corpus], output, SETTINGS, slice_bytes)
    start(output, plan, tokenizer)
    return plan


@pytest.mark.parametrize("slice_bytes,tasks", [(4_000, 3), (1 << 30, 1)])
def test_slices_merge_into_the_bytes_of_a_prepare_without_a_profile(
    tmp_path: Path, tokenizer_dir: Path, corpus: Path, reference: Path, slice_bytes: int, tasks: int
):
    output = tmp_path / "out"
    plan = sliced(tokenizer_dir, corpus, output, slice_bytes)
    numbers = list(range(len(plan.slices)))
    for task in reversed(range(tasks)):  # tasks finish in any order; the last one merges
        run_slices(str(output), str(tokenizer_dir), numbers[task::tasks])
    assert (len(plan.slices) > 10) == (slice_bytes == 4_000)
    assert any(not s.whole for s in plan.slices) == (slice_bytes == 4_000)
    assert splits(output) == splits(reference)
    assert not list((output / SLICES).glob("*/tokens.bin"))  # the shards hold the tokens now


def test_a_rerun_redoes_only_the_slices_not_committed(tmp_path: Path, tokenizer_dir: Path, corpus: Path, reference):
    output = tmp_path / "out"
    plan = sliced(tokenizer_dir, corpus, output, 4_000)
    run_slices(str(output), str(tokenizer_dir), [0, 1, 2])
    committed = {n: (output / SLICES / f"{n:05d}/slice.json").stat().st_mtime_ns for n in (0, 1, 2)}
    state = progress(output)
    assert state.states["done"] == [0, 1, 2] and not state.complete and state.tokens > 0
    run_slices(str(output), str(tokenizer_dir), list(range(len(plan.slices))))
    assert {n: (output / SLICES / f"{n:05d}/slice.json").stat().st_mtime_ns for n in (0, 1, 2)} == committed
    assert splits(output) == splits(reference)


def test_an_unreadable_file_is_skipped_with_its_slice_and_named_in_the_index(tmp_path, tokenizer_dir, corpus):
    broken = tmp_path / "corpus"
    broken.mkdir()
    for name in ("a.txt", "f.jsonl"):
        (broken / name).write_bytes((corpus / name).read_bytes())
    (broken / "c.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 not gzip at all")
    output = tmp_path / "out"
    plan, tokenizer = make_plan(tokenizer_dir, [broken], output, SETTINGS, 1 << 30)
    start(output, plan, tokenizer)
    run_slices(str(output), str(tokenizer_dir), list(range(len(plan.slices))))
    index = json.loads((output / "train/index.json").read_text())
    [skipped] = index["skipped_files"]
    assert skipped["file"] == "corpus/c.jsonl.gz" and skipped["slice"] == 1 and "cannot be read" in skipped["reason"]
    assert index["documents"] > 0 and "c.jsonl.gz" in progress(output).problems[0]


def test_a_slice_that_fails_the_same_way_twice_stops_with_its_reason(tmp_path, tokenizer_dir, corpus):
    output = tmp_path / "out"
    plan = sliced(tokenizer_dir, corpus, output, 1 << 30)
    assert record_failure(output, 0, "MemoryError: out of memory")
    assert slice_states(output, plan)["interrupted"] == [0]
    assert not record_failure(output, 0, "MemoryError: out of memory")
    state = progress(output)
    assert state.states["failed"] == [0] and "failed: MemoryError: out of memory; then MemoryError" in state.problems[0]


def test_an_output_folder_of_another_tokenizer_is_refused(tmp_path: Path, tokenizer_dir: Path, corpus, reference):
    other = tmp_path / "other"
    train_tokenizer(documents(200, seed=7, lines=2), 350, other)
    with pytest.raises(OrchError, match=r"was prepared with another tokenizer .* Allowed: the tokenizer"):
        make_plan(other, [corpus], reference, SETTINGS, 1 << 30)


def test_bad_job_options_are_refused_in_one_paragraph_before_anything_is_written(tmp_path, tokenizer_dir, corpus):
    common = ["data", "prepare", "--tokenizer", str(tokenizer_dir), "--input", str(corpus)]
    account = orch(*common, "--output", str(tmp_path / "a"), "--profile", "karolina-cpu", "--dry-run")
    assert account.returncode == 2 and "needs an account" in account.stderr and not (tmp_path / "a").exists()
    broken = tmp_path / "cpu.yaml"
    broken.write_text("extends: local-slurm-2node\nslurm:\n  partition: nosuch\n")
    no_cpus = orch(*common, "--output", str(tmp_path / "b"), "--profile", str(broken), **TWO_NODES)
    assert no_cpus.returncode == 2 and "'nosuch'" in no_cpus.stderr and "Traceback" not in no_cpus.stderr
    assert not (tmp_path / "b").exists()


def test_a_dry_run_prints_the_plan_and_the_sbatch_script(tmp_path: Path, tokenizer_dir: Path, corpus: Path):
    result = orch("data", "prepare", "--tokenizer", str(tokenizer_dir), "--input", str(corpus), "--output",
                  str(tmp_path / "out"), "--profile", "karolina-cpu", "--account", "OPEN-1-2", "--dry-run")  # fmt: skip
    assert result.returncode == 0, result.stderr
    for words in ("estimated tokens", "node-hours", "qcpu", "#SBATCH --cpus-per-task=128", "tokens/s per core"):
        assert words in result.stdout
    assert not (tmp_path / "out").exists()


# --- on the two-node cluster ----------------------------------------------------------------------------------------


def two_nodes_available() -> bool:
    try:
        shown = subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10, env={**os.environ, **TWO_NODES})
        return shown.returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


needs_two_nodes = pytest.mark.skipif(not two_nodes_available(), reason="the two-node Slurm cluster is not running")


def prepare_on_two_nodes(
    tokenizer_dir: Path,
    corpus: Path,
    output: Path,
    *extra: str,
    slice_mb: str = "0.004",
    tasks: str = "3",
    settings: Settings = SETTINGS,
) -> subprocess.CompletedProcess[str]:
    command = ["data", "prepare", "--tokenizer", str(tokenizer_dir), "--input", str(corpus), "--output", str(output),
               "--profile", "local-slurm-2node", "--slice-mb", slice_mb, "--tasks", tasks, "--val-fraction",
               str(settings.val_fraction), "--seed", str(settings.seed), "--shard-tokens", str(settings.shard_tokens),
               *extra]  # fmt: skip
    return orch(*command, timeout=120, **TWO_NODES)


@pytest.mark.slow
@needs_two_nodes
def test_a_job_array_on_two_nodes_writes_the_bytes_of_a_prepare_here(tmp_path, tokenizer_dir, corpus, reference):
    result = prepare_on_two_nodes(tokenizer_dir, corpus, tmp_path / "out", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert splits(tmp_path / "out") == splits(reference)
    assert len(json.loads((tmp_path / "out" / SLICES / "jobs.json").read_text())) == 3  # three array tasks
    again = prepare_on_two_nodes(tokenizer_dir, corpus, tmp_path / "out")
    assert again.returncode == 0 and "prepared already" in again.stdout


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Slices that take seconds each: long enough to kill a task in one."""
    folder = tmp_path_factory.mktemp("long") / "corpus"
    folder.mkdir()
    write_jsonl(folder / "long.jsonl", documents(12_000, seed=8, lines=3))
    return folder


@pytest.mark.slow
@needs_two_nodes
def test_a_task_killed_mid_slice_is_redone_alone_by_the_rerun(tmp_path, tokenizer_dir, long_corpus):
    reference, output = tmp_path / "ref", tmp_path / "out"
    prepare(tokenizer_dir, [long_corpus], reference, LONG)
    result = prepare_on_two_nodes(tokenizer_dir, long_corpus, output, slice_mb="0.3", tasks="1", settings=LONG)
    assert result.returncode == 0, result.stderr
    deadline = time.time() + 60
    while not list((output / SLICES).glob("*.running")) or not list((output / SLICES).glob("*/slice.json")):
        assert time.time() < deadline, "no slice started"
        time.sleep(0.05)
    [running] = list((output / SLICES).glob("*.running"))
    pid = json.loads(running.read_text())["pid"]
    committed = {p.parent.name: p.stat().st_mtime_ns for p in (output / SLICES).glob("*/slice.json")}
    os.kill(pid, signal.SIGKILL)
    status = orch("data", "status", str(output), "--wait", timeout=60, **TWO_NODES)
    assert status.returncode == 2 and "run the same command again" in " ".join(status.stderr.split())
    rerun = prepare_on_two_nodes(tokenizer_dir, long_corpus, output, "--wait", slice_mb="0.3", settings=LONG)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    kept = {p.parent.name: p.stat().st_mtime_ns for p in (output / SLICES).glob("*/slice.json")}
    assert {name: kept[name] for name in committed} == committed
    assert splits(output) == splits(reference)
