"""A real multi-format folder → `orch tokenizer train` → `orch data prepare` → a run that trains from the shards."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
