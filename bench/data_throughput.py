"""Data pipeline throughput: prepare against the tokenizers library's own encode_batch, and the training loader.

Usage: python bench/data_throughput.py [--sample DIR] [--megabytes 32] [--workdir DIR] [--only prepare|loader]
                                       [--shards 1250] [--shard-tokens 131072]

The corpus is the sample's sentences, grouped into documents of 8 sentences and repeated (with the repetition
number mixed in, so words vary) up to --megabytes of JSON Lines in a temporary folder. Figures:
- baseline: `Tokenizer.encode_batch_fast` over all documents already in memory, with the library's own thread pool
  on every core (the ceiling: no reading, no JSON, no writing);
- prepare: `orchestrator.tools.prepare.prepare` end to end (read, parse, tokenize, split, write and checksum shards),
  once with
  one worker process per core and once in one process using the library's thread pool;
- loader: one process reading random blocks of 2048 tokens through TokenBlocks + GlobalOrder + BlockLoader, as the
  training loop does, micro batch 8.
- loader at the corpus's shape (`--shards N`, alone with `--only loader`): a split of N shards written by the
  project's ShardWriter (random tokens; 1,250 is the seed's 168 B tokens at the default shard size, here with
  --shard-tokens each so that it fits a small disk), read as above with at most 64 shards mapped (what the loader kept
  before), with what a hard open-file limit of 1,024 leaves, and with all that this process's limit allows: file
  opens per 1,000 samples and samples/s of one rank, against what one GPU of the karolina profile consumes by the
  planner's estimate.
Each line gives wall-clock and CPU seconds (this process and its worker processes): on a shared machine the CPU
ratio is the steadier measure of what prepare costs per token beyond the tokenizer itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from jobs.data import BlockLoader, GlobalOrder
from jobs.shards import FREE_DESCRIPTORS, ShardWriter, TokenBlocks
from orchestrator.cli.commands.data import available_cpus
from orchestrator.core.corpus import SHARD_TOKENS, VAL_FRACTION
from orchestrator.core.loading import load_profile, load_recipe
from orchestrator.core.plan import Batching, make_plan
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
BLOCK, MICRO, GLOBAL = 2048, 8, 512  # the cstinyllama-1.2b recipe's block length, micro batch and global batch
BEFORE = 64  # shards the loader kept mapped per split before it kept all that the open-file limit allows


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


def serve(blocks: TokenBlocks, samples: int) -> tuple[float, float]:
    """(wall, CPU) seconds one rank's BlockLoader takes to serve `samples` samples from step 0, as the training loop
    asks; CPU seconds (of this process, the reading thread included) are the steadier figure on a shared machine."""
    order = GlobalOrder(len(blocks), Batching.of(GLOBAL, MICRO, 1), seed=0)
    loader = BlockLoader(blocks, order, rank=0, device=torch.device("cpu"))
    started, cpu = time.perf_counter(), time.process_time()
    for n in range(samples // MICRO):
        loader.micro_batch(*divmod(n, GLOBAL // MICRO))
    return time.perf_counter() - started, time.process_time() - cpu


def synthetic_split(folder: Path, shards: int, shard_tokens: int) -> Path:
    """A train split of `shards` full shards of random tokens (one document a shard), written by ShardWriter."""
    if not (folder / "index.json").is_file():
        writer, rng = ShardWriter(folder, "uint16", shard_tokens, []), np.random.default_rng(0)
        for _ in range(shards):
            writer.add(rng.integers(3, 64000, shard_tokens, dtype=np.uint16), np.array([shard_tokens]))
        writer.finish({"vocab_size": 64000, "eos_id": 2})
    return folder


def karolina_demand() -> float:
    """Samples/s one rank consumes on the karolina profile: the planner's tokens/s per GPU over the block length."""
    _, profile = load_profile("karolina", [{"slurm": {"account": "OPEN-00-00"}}])
    _, recipe = load_recipe("cstinyllama-1.2b")
    plan = make_plan(profile, recipe, recipe.schedule.total_steps)
    return plan.tokens_per_s / plan.world_size / recipe.data.max_seq_len


def loader_at_corpus_shape(work: Path, shards: int, shard_tokens: int, samples: int) -> None:
    split = synthetic_split(work / f"synthetic-{shards}x{shard_tokens}" / "train", shards, shard_tokens)
    demand = karolina_demand()
    print(f"loader at the corpus's shape: {shards:,} shards of {shard_tokens:,} tokens, {samples:,} samples of {BLOCK}")
    print(f"  demand of one karolina GPU (planner): {demand:.1f} samples/s")
    at_1024 = 1024 - FREE_DESCRIPTORS - len(os.listdir("/proc/self/fd"))  # what a hard limit of 1,024 would grant
    budgets = (
        (f"at most {BEFORE} mapped", BEFORE),
        ("under a hard limit of 1,024", at_1024),
        ("as this limit allows", None),
    )
    for label, mapped in budgets:
        blocks = TokenBlocks(split, BLOCK, mapped)
        wall, cpu = serve(blocks, samples)
        print(
            f"  {label:<30} {blocks.mappable:>6,} mapped  {blocks.opened() / samples * 1000:6.1f} opens per 1,000 "
            f"samples  {samples / wall:6.0f} samples/s ({samples / wall / demand:,.0f} × demand)  "
            f"{samples / cpu:6.0f} samples per CPU second"
        )
        del blocks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    parser.add_argument("--megabytes", type=float, default=32)
    parser.add_argument("--vocab-size", type=int, default=64000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", choices=("prepare", "loader"), default=None)
    parser.add_argument("--shards", type=int, default=1250)
    parser.add_argument("--shard-tokens", type=int, default=131072)
    parser.add_argument("--samples", type=int, default=20480)
    args = parser.parse_args()
    cores = available_cpus()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="orch-bench-"))
    if args.only != "prepare":
        loader_at_corpus_shape(work, args.shards, args.shard_tokens, args.samples)
    if args.only == "loader":
        return
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
        written = sum(index.tokens for index in report.indexes.values())
        rates = timed(label, time.perf_counter() - started, cpu_seconds() - cpu, written)
        print(f"  ratio to baseline: {rates[0] / baseline[0]:.2f} wall, {rates[1] / baseline[1]:.2f} CPU")

    blocks = TokenBlocks(work / f"prepared-{cores}" / "train", 2048)
    order = GlobalOrder(len(blocks), Batching.of(512, 8, 1), seed=0)
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
