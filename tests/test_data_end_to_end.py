"""A real multi-format folder → `orch tokenizer train` → `orch data prepare` → a run that trains from the shards."""

import gzip
import json
from collections import Counter
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.core.corpus import VAL_FRACTION
from orchestrator.tools.prepare import Settings, list_inputs, prepare, read_texts, train_tokenizer
from orchestrator.tools.run_data import demo_corpus
from tests.conftest import ROOT, orch, status_json, submitted_run_id

pytestmark = pytest.mark.slow


def corpus_folder(folder: Path) -> Path:
    docs = demo_corpus(seed=5, documents=1200)
    folder.mkdir()
    (folder / "stories.txt").write_text("\n\n".join(docs[:300]))
    (folder / "more.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[300:600]))
    with gzip.open(folder / "packed.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[600:900])
    pq.write_table(pa.table({"text": docs[900:]}), folder / "table.parquet")
    return folder


def test_prepared_multi_format_corpus_trains_the_tiny_recipe_and_passes_the_seed_recipes_checks(tmp_path, orch_home):
    corpus = corpus_folder(tmp_path / "corpus")
    tokenizer, shards = tmp_path / "tokenizer", tmp_path / "shards"
    result = orch("tokenizer", "train", "--input", str(corpus), "--vocab-size", "512", "--output", str(tokenizer))
    assert result.returncode == 0, result.stderr
    result = orch(
        "data",
        "prepare",
        "--tokenizer",
        str(tokenizer),
        "--input",
        str(corpus),
        "--output",
        str(shards),
        "--val-fraction",
        "0.1",
        "--workers",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((shards / "train" / "index.json").read_text())["documents"] > 900

    for name in ("tiny", "cstinyllama-1.2b"):
        text = (ROOT / f"recipes/{name}.yaml").read_text()
        text = text.replace("source: demo", f"source: {shards}").replace("tokenizer: demo", f"tokenizer: {tokenizer}")
        (tmp_path / f"{name}.yaml").write_text(text)
    result = orch("submit", "--recipe", str(tmp_path / "tiny.yaml"), "--steps", "10", "--wait")
    run = status_json(submitted_run_id(result))
    assert (run["state"], run["step"]) == ("completed", 10)
    metrics = [
        json.loads(line)["metrics"] for line in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    assert "val_perplexity" in metrics[-1] and metrics[-1]["loss"] < metrics[0]["loss"]

    result = orch(
        "submit",
        "--profile",
        "karolina",
        "--recipe",
        str(tmp_path / "cstinyllama-1.2b.yaml"),
        "--account",
        "OPEN-1-1",
        "--nodes",
        "2",
        "--steps",
        "200000",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr


def test_a_one_sentence_per_line_corpus_trains_and_says_once_in_its_log_and_in_mlflow_that_it_cannot_validate(
    tmp_path: Path, orch_home: Path
):
    """A .txt file of one sentence per line, no blank line: one document, so the val split is empty. The plan warns,
    the job trains, its log says once why it never validates, and its MLflow run carries the reason."""
    corpus = tmp_path / "cs.txt"
    corpus.write_text("\n".join(demo_corpus(seed=7, documents=300)) + "\n")
    tokenizer, shards = tmp_path / "tokenizer", tmp_path / "shards"
    train_tokenizer(read_texts(list_inputs([corpus])[0], Counter()), 512, tokenizer)
    report = prepare(tokenizer, [corpus], shards, Settings(VAL_FRACTION, seed=0, dtype="auto", shard_tokens=10**6))
    assert report.indexes["val"].tokens == 0 and report.single_document_note()
    recipe = tmp_path / "one-document.yaml"
    recipe.write_text(f"extends: tiny\ndata:\n  source: {shards}\n  tokenizer: {tokenizer}\n")

    result = orch("submit", "--recipe", str(recipe), "--steps", "2", "--wait")
    assert "Warning: cannot validate: the val split holds 0 tokens (0 whole blocks of 64)" in result.stdout
    run = status_json(submitted_run_id(result))
    assert (run["state"], run["step"]) == ("completed", 2), result.stdout + result.stderr
    logs = "".join(path.read_text() for path in (Path(run["run_dir"]) / "submitit").rglob("*_log.err"))
    assert logs.count("cannot validate: the val split holds 0 tokens") == 1, logs
    assert "val_loss" not in (Path(run["run_dir"]) / "metrics.jsonl").read_text()
    tags = mlflow.MlflowClient(f"sqlite:///{orch_home / 'mlflow.db'}").get_run(run["mlflow_run_id"]).data.tags
    assert tags["orch.val_skipped"].startswith("cannot validate: the val split holds 0 tokens (0 whole blocks of 64)")
