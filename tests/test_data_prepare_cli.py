"""`orch tokenizer train`, `orch data prepare` and `orch data verify` as a user runs them."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from jobs.shards import TokenBlocks
from orchestrator.cli.commands.data import data_app, tokenizer_app
from orchestrator.core.errors import OrchError
from orchestrator.core.shard_index import ShardIndex
from orchestrator.tools.prepare import FileTally, InputFile, Report
from tests.conftest import ROOT, needs_root, orch, read_only

runner = CliRunner()
DATA_APP = "from orchestrator.cli.commands.data import data_app; data_app()"


def invoke(app, *args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "400"})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "corpus"
    folder.mkdir()
    lines = [json.dumps({"text": f"Dokument {i}: Petr čte knihu v Praze a Jana píše dopis."}) for i in range(150)]
    (folder / "a.jsonl").write_text("\n".join([*lines[:70], '{"text": oops', *lines[70:]]) + "\n")
    (folder / "b.txt").write_text("\n\n".join(f"Odstavec {i}.\nDruhý řádek téhož dokumentu." for i in range(50)))
    (folder / "README.md").write_text("about the corpus")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, str]:
    output = tmp_path_factory.mktemp("tokenizer") / "tok"
    result = invoke(tokenizer_app, "train", "--input", str(corpus), "--vocab-size", "320", "--output", str(output))
    assert result.exit_code == 0, result.output
    return output, result.output


def test_tokenizer_train_saves_what_autotokenizer_loads_and_reports_what_it_skipped(trained, corpus: Path):
    folder, output = trained
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token) == ("</s>", "<s>", "<unk>")
    assert len(tokenizer) <= 320
    assert "on 200 documents" in output
    assert "Documents read: 201; skipped: 1 (malformed JSON: 1)" in output
    assert f"Files ignored (not a supported format): 1: {corpus / 'README.md'}" in output


def test_tokenizer_train_refuses_to_overwrite_a_folder(trained, corpus: Path):
    result = invoke(tokenizer_app, "train", "--input", str(corpus), "--output", str(trained[0]))
    assert isinstance(result.exception, OrchError)
    assert str(result.exception) == f"--output {trained[0]}: already exists. Allowed: a folder that does not exist yet."


def test_prepare_in_worker_processes_writes_both_splits_and_reports_every_count(tmp_path: Path, trained, corpus):
    output = tmp_path / "prepared"
    args = ["--tokenizer", str(trained[0]), "--input", str(corpus), "--output", str(output), "--val-fraction", "0.2"]
    result = subprocess.run(
        [sys.executable, "-c", DATA_APP, "prepare", *args, "--workers", "2", "--shard-tokens", "300"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    train, val = TokenBlocks(output / "train", 8), TokenBlocks(output / "val", 8)
    assert train.index.documents + val.index.documents == 200 and len(val) > 0
    assert len(train.shards) > 3 and train.index.dtype == "uint16"
    assert "Documents read: 201; skipped: 1 (malformed JSON: 1)." in result.stdout
    assert f"{train.index.documents:,}" in result.stdout and f"{train.tokens:,}" in result.stdout
    assert "README.md" in result.stdout
    assert "prepare" in result.stderr and "100%" in result.stderr  # the progress display

    verified = invoke(data_app, "verify", str(output))
    assert verified.exit_code == 0 and "sizes and checksums match" in verified.output

    (output / "val" / val.shards[0].file).write_bytes(b"\0" * 2 * val.shards[0].tokens)
    damaged = invoke(data_app, "verify", str(output))
    assert isinstance(damaged.exception, OrchError) and "shard_00000.bin: sha256 differs" in str(damaged.exception)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dtype", "uint8"], "--dtype 'uint8' is not a token width. Allowed: auto, uint16, uint32."),
        (["--val-fraction", "1.5"], "--val-fraction 1.5: not a fraction of documents. Allowed: 0 <= f < 1."),
    ],
)
def test_bad_options_are_refused_naming_option_and_allowed_values(tmp_path: Path, trained, corpus, extra, message):
    args = ["--tokenizer", str(trained[0]), "--input", str(corpus), "--output", str(tmp_path / "out"), *extra]
    result = invoke(data_app, "prepare", *args)
    assert isinstance(result.exception, OrchError) and str(result.exception) == message
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_folder_without_tokenizer_json_is_refused(tmp_path: Path, corpus: Path):
    result = invoke(data_app, "prepare", "--tokenizer", str(tmp_path), "--input", str(corpus), "--output", "x")
    assert isinstance(result.exception, OrchError)
    assert f"--tokenizer {tmp_path}: {tmp_path / 'tokenizer.json'} does not exist" in str(result.exception)


def test_prepare_help_says_how_each_format_is_split_into_documents():
    result = invoke(data_app, "prepare", "--help")
    assert "one document per block of non-blank lines; blank lines separate documents" in result.output
    assert "one document per line, its 'text' field" in result.output


def test_the_data_commands_import_nothing_heavy_at_startup():
    heavy = ("torch", "transformers", "accelerate", "mlflow", "tokenizers", "numpy", "pyarrow")
    code = f"import sys, orchestrator.cli.commands.data; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# --- what prepare says of its input ---------------------------------------------------------------------------------


def test_prepare_names_the_files_it_read_and_skipped_and_why_one_sentence_per_line_cannot_validate(
    tmp_path: Path, trained
):
    """The Czech team's corpus: one sentence per line and no blank line is one document, so nothing is held out;
    a LICENSE.txt beside it is read as documents. Run again, the finished prepare says the same."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "cs.txt").write_text("".join(f"Věta {i}: Petr čte knihu v Praze.\n" for i in range(300)))
    (corpus / "LICENSE.txt").write_text("MIT License\n\nCopyright (c) 2024\n\nPermission is hereby granted.\n")
    (corpus / "empty.txt").write_text("\n\n")
    (corpus / "README.md").write_text("about the corpus")
    args = ["--tokenizer", str(trained[0]), "--input", str(corpus), "--output", str(tmp_path / "out"), "--workers", "1"]
    result = invoke(data_app, "prepare", *args)
    assert result.exit_code == 0, result.output
    files = f"{corpus / 'LICENSE.txt'} (3 records), {corpus / 'cs.txt'} (1 record), {corpus / 'empty.txt'} (empty file)"
    assert f"Files read: 3: {files}\n" in result.stdout
    assert f"Files ignored (not a supported format): 1: {corpus / 'README.md'}\n" in result.stdout
    note = (
        f"Note: 1 .txt file is one document, with no blank line between its lines: {corpus / 'cs.txt'} (300 lines). "
        "Blank lines separate the documents of a .txt file; where every line is a document, put a blank line after "
        'each (`sed G IN.txt > OUT.txt`), or write JSON Lines (one {"text": ...} per line).\n'
    )
    warning = (
        "Warning: the val split is empty: none of the 4 documents fell into it at --val-fraction 0.001, so a run on "
        "this data cannot validate: it logs no val_loss or val_perplexity; one evaluation pass needs ranks × "
        "train.micro_batch_size blocks of data.max_seq_len tokens, 8 × 8 × 2,048 = 131,072 for the seed recipe on "
        "one Karolina node. Fix: more documents (see the note on .txt files above), or a larger --val-fraction.\n"
    )
    assert result.stderr.endswith(note + warning) and "Note:" not in result.stdout

    again = invoke(data_app, "prepare", *args)
    assert again.exit_code == 0 and f"Files read: 3: {files}\n" in again.stdout
    assert again.stderr.endswith(note + warning)


def report_of(files: int, val_tokens: int, empty: tuple[int, ...] = ()) -> Report:
    inputs = [InputFile(Path(f"corpus/part{n:02}.jsonl.gz"), f"part{n:02}", "jsonl", ".gz", 1) for n in range(files)]
    tallies = {n: FileTally(records=0 if n in empty else 10) for n in range(files)}
    indexes = {"train": ShardIndex(documents=10 * files, tokens=10**6), "val": ShardIndex(tokens=val_tokens)}
    return Report(indexes, inputs, tallies, [])


def test_many_files_read_are_counted_by_format_and_the_empty_ones_named():
    assert report_of(10, 1).files_read().startswith("Files read: 10: corpus/part00.jsonl.gz (10 records), ")
    many = report_of(25, 1, empty=tuple(range(3, 15)))
    empty = ", ".join(f"corpus/part{n:02}.jsonl.gz" for n in range(3, 13))
    assert many.files_read() == f"Files read: 25 (25 jsonl.gz); empty: 12: {empty} and 2 more"


def test_a_val_split_below_one_pass_of_the_seed_recipe_gets_a_note_and_a_larger_one_none():
    assert report_of(2, 8 * 8 * 2048).val_warning(0.01) is None
    note = report_of(2, 5_000).val_warning(0.01)
    assert note.startswith("Note: the val split holds 5,000 tokens; one evaluation pass needs ranks × ")
    assert note.endswith("`orch submit --dry-run` says whether yours does); a larger --val-fraction holds out more.")


# --- input without documents ----------------------------------------------------------------------------------------


def refusal(*args: str) -> str:
    """The one-paragraph error of a data command that must refuse its input (exit code 2, no traceback)."""
    result = orch(*args, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "error: " in result.stderr
    return " ".join(result.stderr[result.stderr.index("error: ") :].split())


def refusals(trained, corpus: Path, tmp_path: Path) -> tuple[str, str]:
    """What `orch data prepare` and `orch tokenizer train` say of `corpus`; neither leaves its output behind."""
    prepared, tokenizer = tmp_path / "out" / "prepared", tmp_path / "tok"
    prepare = refusal(
        "data", "prepare", "--tokenizer", str(trained[0]), "--input", str(corpus), "--output", str(prepared)
    )
    train = refusal("tokenizer", "train", "--input", str(corpus), "--output", str(tokenizer))
    assert not (tmp_path / "out").exists() and not tokenizer.exists()
    return prepare, train


@needs_root
def test_a_prepare_into_a_read_only_folder_says_where_in_one_paragraph(tmp_path: Path, trained, corpus: Path):
    (tmp_path / "scratch").mkdir()
    with read_only(tmp_path / "scratch") as scratch:
        output = scratch / "prepared"
        tokenizer = str(trained[0])
        message = refusal("data", "prepare", "--tokenizer", tokenizer, "--input", str(corpus), "--output", str(output))
        assert message.startswith(f"error: Cannot write {output}: Read-only file system"), message
        assert "(the filesystem is mounted read-only)" in message and "run the same command again" in message


def test_an_empty_input_folder_is_refused_with_exit_code_2_and_the_counts(tmp_path: Path, trained):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "README.md").write_text("nothing here yet")
    for message in refusals(trained, corpus, tmp_path):
        assert message.startswith(f"error: --input {corpus}: no input files found. ")
        assert "Read 0 input files (1 other file ignored: not a supported format) and 0 records" in message
        assert "usable documents: 0" in message


def test_a_jsonl_file_of_only_bad_lines_is_refused_with_exit_code_2_and_the_counts_by_reason(tmp_path: Path, trained):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [b'{"text": oops', b"not json at all", b'{"body": "no text field"}', b'{"text": 7}', b'{"text": "\xff"}']
    (corpus / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    prepare, train = refusals(trained, corpus, tmp_path)
    counts = (
        "Read 1 input file and 5 records; skipped 5 (malformed JSON: 2, missing 'text' field: 1, "
        "text is not a string: 1, invalid UTF-8: 1); usable documents: 0"
    )
    assert prepare.startswith(
        f"error: --input {corpus}: nothing to prepare, no document holds text. {counts}; tokens: 0."
    )
    assert f"--output {tmp_path / 'out' / 'prepared'} was not created." in prepare
    assert train.startswith(
        f"error: --input {corpus}: nothing to train a tokenizer on, no document holds text. {counts}."
    )
    assert f"--output {tmp_path / 'tok'} was not created." in train


def test_a_corpus_whose_every_document_is_empty_is_refused_with_exit_code_2_and_the_counts(tmp_path: Path, trained):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": " \n\t "}) + "\n")
    (corpus / "b.txt").write_text("\n   \n\n")
    (corpus / "c.txt").write_bytes(b"")
    prepare, train = refusals(trained, corpus, tmp_path)
    counts = "Read 3 input files and 4 records; skipped 4 (empty text: 2, empty file: 2); usable documents: 0"
    assert f"nothing to prepare, no document holds text. {counts}; tokens: 0." in prepare
    assert f"nothing to train a tokenizer on, no document holds text. {counts}." in train


# --- long documents -------------------------------------------------------------------------------------------------

PEAK_RSS = """
import resource, subprocess, sys
result = subprocess.run([sys.executable, "-m", "orchestrator", *sys.argv[1:]], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(result.returncode, peak // (1 << 20) if sys.platform == "darwin" else peak // 1024)
sys.stderr.write(result.stderr)
"""


def test_a_20_mb_single_line_document_is_prepared_in_under_600_mb_of_memory(tmp_path: Path, trained):
    """Peak RSS of the prepare process, measured on a 2-core machine: 297 MB for this document (13.4 M tokens;
    a prepare of a few kilobytes takes about 95 MB), and 2,571 MB before long documents were tokenized in slices."""
    words = "Dokument Petr čte knihu v Praze a Jana píše dopis. Odstavec Druhý řádek téhož dokumentu.".split()
    rng = random.Random(0)
    block = " ".join(rng.choice(words) for _ in range(200_000))  # about 1.3 MB
    text = " ".join([block] * (20_000_000 // len(block.encode()) + 1))
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    del text, block
    size = (tmp_path / "long.jsonl").stat().st_size
    assert size > 20_000_000
    args = ["--tokenizer", str(trained[0]), "--input", str(tmp_path / "long.jsonl"), "--output", str(tmp_path / "out")]
    measured = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, "data", "prepare", *args, "--val-fraction", "0", "--workers", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    returncode, peak_mb = map(int, measured.stdout.split())
    assert returncode == 0, measured.stderr
    assert TokenBlocks(tmp_path / "out" / "train", 8).index.documents == 1
    assert peak_mb < 600, f"peak RSS {peak_mb} MB for a {size / 1e6:.0f} MB document"
