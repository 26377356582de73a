"""`orch data prepare --profile P` on 1 and on 2 nodes: wall time, tokens/s, per-slice rate and peak memory per task.

Usage: SLURM_CONF=/etc/slurm-two-node/slurm.conf python bench/prepare_scaling.py [--megabytes 8] [--workdir DIR]

The corpus is `bench/data_throughput.py`'s (the Czech sample's sentences as JSON Lines), cut into slices of
--slice-mb; each run prepares it into a new folder with the `local-slurm-2node` profile, first with one node (one
task), then with two (two tasks), and the outputs are compared byte for byte.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.data_throughput import SAMPLE, make_corpus
from orchestrator.tools.prepare import list_inputs, read_texts, train_tokenizer


def run(tokenizer: Path, corpus: Path, output: Path, nodes: int, slice_mb: float) -> dict:
    command = [sys.executable, "-m", "orchestrator", "data", "prepare", "--tokenizer", str(tokenizer), "--input",
               str(corpus), "--output", str(output), "--profile", "local-slurm-2node", "--nodes", str(nodes),
               "--tasks", str(nodes), "--slice-mb", str(slice_mb), "--wait"]  # fmt: skip
    started = time.time()
    subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.time() - started
    slices = [json.loads(p.read_text()) for p in sorted((output / "slices").glob("*/slice.json"))]
    tokens = sum(s["tokens"] for s in slices)
    return {
        "nodes": nodes,
        "wall_s": round(wall, 1),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall),
        "slice_tokens_per_core_s": round(tokens / sum(s["seconds"] * s["cores"] for s in slices)),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in slices),
        "hosts": sorted({s["host"] for s in slices}),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=float, default=8)
    parser.add_argument("--slice-mb", type=float, default=0.5)
    parser.add_argument("--vocab-size", type=int, default=64000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="prepare-scaling-"))
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    make_corpus(SAMPLE, args.megabytes, corpus)
    tokenizer = work / "tokenizer"
    if not tokenizer.is_dir():
        train_tokenizer(read_texts(list_inputs([corpus])[0], __import__("collections").Counter()), args.vocab_size,
                        tokenizer)  # fmt: skip
    results = [run(tokenizer, corpus, work / f"out-{nodes}", nodes, args.slice_mb) for nodes in (1, 2)]
    same = all(
        (work / "out-1" / split / name).read_bytes() == (work / "out-2" / split / name).read_bytes()
        for split in ("train", "val")
        for name in [p.name for p in (work / "out-1" / split).iterdir()]
    )
    for result in results:
        print(json.dumps(result))
    print(json.dumps({"speedup": round(results[0]["wall_s"] / results[1]["wall_s"], 2), "identical": same}))


if __name__ == "__main__":
    main()
