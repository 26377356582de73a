"""Data pipeline throughput: prepare against the tokenizers library's own encode_batch, and the training loader.

Usage: python bench/data_throughput.py [--sample DIR] [--megabytes 32] [--workdir DIR]

The corpus is the sample's sentences, grouped into documents of 8 sentences and repeated (with the repetition
number mixed in, so words vary) up to --megabytes of JSON Lines in a temporary folder. Figures:
- baseline: `Tokenizer.encode_batch_fast` over all documents already in memory, with the library's own thread pool
  on every core (the ceiling: no reading, no JSON, no writing);
- prepare: `orchestrator.tools.prepare.prepare` end to end (read, parse, tokenize, split, write and checksum shards),
  once with
  one worker process per core and once in one process using the library's thread pool;
- loader: one process reading random blocks of 2048 tokens through TokenBlocks + GlobalOrder + BlockLoader, as the
  training loop does, micro batch 8.
Each line gives wall-clock and CPU seconds (this process and its worker processes): on a shared machine the CPU
ratio is the steadier measure of what prepare costs per token beyond the tokenizer itself.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from jobs.data import BlockLoader, GlobalOrder
from jobs.shards import TokenBlocks
from orchestrator.cli.commands.data import available_cpus
from orchestrator.core.corpus import SHARD_TOKENS, VAL_FRACTION
from orchestrator.tools.prepare import (
    RichReporter,
    Settings,
    list_inputs,
    prepare,
    read_texts,
    read_tokenizer_files,
    train_tokenizer,
)

SAMPLE = Path("/work/shared/data/czech-cac-sample")


def make_corpus(sample: Path, megabytes: float, folder: Path) -> list[str]:
    sentences = [line for path in sorted(sample.glob("*.txt")) for line in path.read_text().splitlines() if line]
    documents, size, copy = [], 0, 0
    while size < megabytes * 1e6:
        for start in range(0, len(sentences), 8):
            doc = " ".join(sentences[start : start + 8]).replace("#", str(copy))
            documents.append(doc)
            size += len(doc.encode())
        copy += 1
    folder.mkdir(parents=True, exist_ok=True)
    per_file = len(documents) // 4 + 1
    for i in range(4):
        lines = (
            json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents[i * per_file : (i + 1) * per_file]
        )
        (folder / f"part-{i}.jsonl").write_text("".join(lines))
    return documents


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(label: str, wall: float, cpu: float, tokens: int) -> tuple[float, float]:
    """Prints and returns (tokens per wall second, tokens per CPU second)."""
    rate = f"{tokens / wall / 1e6:7.2f} M tokens/s"
    print(f"{label:<40} {rate}  {wall:6.2f} s wall  {cpu:6.2f} s CPU ({cpu / wall:.1f} cores busy)")
    return tokens / wall, tokens / cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    parser.add_argument("--megabytes", type=float, default=32)
    parser.add_argument("--vocab-size", type=int, default=64000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    cores = available_cpus()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="orch-bench-"))
    documents = make_corpus(args.sample, args.megabytes, work / "corpus")
    megabytes = sum(len(d.encode()) for d in documents) / 1e6
    print(f"{cores} cores, {len(documents):,} documents, {megabytes:.1f} MB of text in {work}")
    if not (work / "tokenizer").is_dir():
        files, _ = list_inputs([work / "corpus"])
        size = train_tokenizer(read_texts(files, Counter()), args.vocab_size, work / "tokenizer")
        print(f"tokenizer: {size} tokens")

    tokenizer = read_tokenizer_files(work / "tokenizer")
    from tokenizers import Tokenizer

    library = Tokenizer.from_str(tokenizer.json)
    started, cpu = time.perf_counter(), cpu_seconds()
    tokens = sum(len(e.ids) + 1 for e in library.encode_batch_fast(documents, add_special_tokens=False))
    baseline = timed(
        "baseline: encode_batch_fast, in memory", time.perf_counter() - started, cpu_seconds() - cpu, tokens
    )

    for label, workers in ((f"prepare: {cores} worker processes", cores), ("prepare: 1 process, library threads", 1)):
        output = work / f"prepared-{workers}"
        shutil.rmtree(output, ignore_errors=True)
        started, cpu = time.perf_counter(), cpu_seconds()
        settings = Settings(VAL_FRACTION, seed=0, dtype="auto", shard_tokens=SHARD_TOKENS)
        report = prepare(work / "tokenizer", [work / "corpus"], output, settings, workers, RichReporter())
        written = sum(index["tokens"] for index in report.indexes.values())
        rates = timed(label, time.perf_counter() - started, cpu_seconds() - cpu, written)
        print(f"  ratio to baseline: {rates[0] / baseline[0]:.2f} wall, {rates[1] / baseline[1]:.2f} CPU")

    blocks = TokenBlocks(work / f"prepared-{cores}" / "train", 2048)
    order = GlobalOrder(len(blocks), global_batch=512, micro_batch=8, world_size=1, seed=0)
    loader = BlockLoader(blocks, order, rank=0, device=torch.device("cpu"))
    served, started, cpu, step = 0, time.perf_counter(), cpu_seconds(), 0
    while time.perf_counter() - started < 5:
        for micro_step in range(512 // 8):
            served += loader.micro_batch(step, micro_step).numel()
        step += 1
    label = f"loader: {len(blocks)} blocks of 2048, micro batch 8"
    timed(label, time.perf_counter() - started, cpu_seconds() - cpu, served)


if __name__ == "__main__":
    main()
