"""The Concat dataset: documents joined with EOS, cut into fixed blocks, read in a world-size-free order.

Storage: a corpus is tokenized once into token shards (`jobs.prepare` writes them, `jobs.shards` reads them).
`prepare_data` points a run's `data/` folder at a prepared corpus, or prepares the demo corpus there the same way.

Packing: every document is followed by EOS and the stream is cut into blocks of `max_seq_len` tokens;
the labels are the inputs (the model shifts them), so a block trains `max_seq_len - 1` predictions.
The final partial block (fewer than `max_seq_len` tokens) is dropped and counted.

Order: global sample g is block `permutation(seed, epoch)[g % n_blocks]` with `epoch = g // n_blocks`,
and optimizer step s consumes global samples [s·B, (s+1)·B) for global batch B. Which rank computes
which of them depends on the world size; which samples a step sees does not.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jobs.prepare import Settings, copy_tokenizer, list_inputs, prepare, read_texts, train_tokenizer
from jobs.shards import INDEX, TokenBlocks, file_sha256, read_index
from orchestrator.commands.data import SHARD_TOKENS
from orchestrator.config import DataSpec
from orchestrator.errors import OrchError
from orchestrator.runs import read_json, write_json_atomic

log = logging.getLogger("orch.data")

DEMO_DOCUMENTS = 4000
JOB_VAL_FRACTION = 0.05  # documents held out when the job prepares its corpus itself
POINTER = "tokens.json"


def demo_corpus(seed: int = 0, documents: int = DEMO_DOCUMENTS) -> list[str]:
    """Short Czech-like stories with learnable structure (agreement, counting, repetition)."""
    rng = random.Random(seed)
    names = ["Petr", "Jana", "Tomáš", "Eva", "Karel", "Marie", "Pavel", "Lucie"]
    verbs = ["čte", "píše", "kreslí", "hledá", "kupuje", "opravuje"]
    objects = ["knihu", "dopis", "obraz", "mapu", "židli", "kolo"]
    places = ["v Praze", "v Brně", "v Ostravě", "doma", "ve škole", "v knihovně"]
    numbers = ["jedna", "dva", "tři", "čtyři", "pět", "šest", "sedm", "osm", "devět", "deset"]
    docs = []
    for _ in range(documents):
        who = rng.choice(names)
        sentences = []
        for _ in range(rng.randint(2, 6)):
            what, verb = rng.choice(objects), rng.choice(verbs)
            sentences.append(f"{who} {verb} {what} {rng.choice(places)}.")
            if rng.random() < 0.3:
                start = rng.randrange(5)
                sentences.append(" ".join(numbers[start : start + rng.randint(3, 5)]) + ".")
        docs.append(" ".join(sentences))
    return docs


def pack(documents: Iterable[list[int]], eos_id: int, block_len: int) -> tuple[np.ndarray, int]:
    """Concatenate documents, each followed by EOS, into rows of `block_len`; returns (blocks, tokens dropped).

    The in-memory definition of packing: `TokenBlocks` serves the same rows from prepared shards."""
    stream = np.fromiter((t for doc in documents for t in (*doc, eos_id)), dtype=np.int64)
    n_blocks = len(stream) // block_len
    return stream[: n_blocks * block_len].reshape(n_blocks, block_len), len(stream) - n_blocks * block_len


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, n_blocks: int) -> np.ndarray:
    """Drawn once per epoch, not per sample: at corpus scale a permutation takes a noticeable fraction of a second."""
    permutation = np.random.default_rng([seed, epoch]).permutation(n_blocks)
    permutation.flags.writeable = False
    return permutation


@dataclass(frozen=True)
class GlobalOrder:
    """Maps (step, micro step, rank) to block indices; the samples of a step do not depend on the world size."""

    n_blocks: int
    global_batch: int
    micro_batch: int
    world_size: int
    seed: int

    def permutation(self, epoch: int) -> np.ndarray:
        return epoch_permutation(self.seed, epoch, self.n_blocks)

    def global_samples(self, step: int) -> range:
        return range(step * self.global_batch, (step + 1) * self.global_batch)

    def block_indices(self, step: int, micro_step: int, rank: int) -> np.ndarray:
        first = step * self.global_batch + (micro_step * self.world_size + rank) * self.micro_batch
        samples = np.arange(first, first + self.micro_batch)
        epochs = samples // self.n_blocks
        return np.array([self.permutation(e)[s % self.n_blocks] for e, s in zip(epochs, samples, strict=True)])


class BlockLoader:
    """Serves one rank's micro-batches as token tensors, reading the next one in the background.

    The order of requests is known (micro steps, then steps), so while the model computes on one micro-batch
    a thread gathers the next from the memory-mapped shards and, on a GPU, copies it from pinned memory."""

    def __init__(self, blocks: TokenBlocks, order: GlobalOrder, rank: int, device: torch.device) -> None:
        self.blocks, self.order, self.rank, self.device = blocks, order, rank, device
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data")
        self.ahead: tuple[tuple[int, int], Future] | None = None

    def read(self, step: int, micro_step: int) -> torch.Tensor:
        rows = torch.from_numpy(self.blocks[self.order.block_indices(step, micro_step, self.rank)].astype(np.int64))
        if self.device.type == "cuda":
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows

    def micro_batch(self, step: int, micro_step: int) -> torch.Tensor:
        if self.ahead is not None and self.ahead[0] == (step, micro_step):
            tokens = self.ahead[1].result()
        else:
            tokens = self.read(step, micro_step)
        following = (step, micro_step + 1) if micro_step + 1 < self.accumulation else (step + 1, 0)
        self.ahead = (following, self.reader.submit(self.read, *following))
        return tokens

    @property
    def accumulation(self) -> int:
        return self.order.global_batch // (self.order.micro_batch * self.order.world_size)


def is_prepared(folder: Path) -> bool:
    return (folder / "train" / INDEX).is_file()


def data_ready(data_dir: Path) -> bool:
    """Whether `data_dir` already names complete token shards (then `prepare_data` has nothing to do)."""
    pointer = read_json(data_dir / POINTER)
    return pointer is not None and is_prepared(Path(pointer["tokens"]))


def write_demo_corpus(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in demo_corpus(seed)))
    return path


def prepare_data(spec: DataSpec, vocab_size: int, seed: int, data_dir: Path) -> None:
    """Make `data_dir` name the token shards the recipe trains on (rank 0 only; the others wait).

    A folder made by `orch data prepare` is read where it is. 'demo' (a generated corpus) or a folder of documents
    goes through the same prepare into `data_dir`. Either way `data_dir/tokens.json` names the folder and the block
    length, and `data_dir/tokenizer` holds the tokenizer the shards were made with.
    """
    if data_ready(data_dir):
        return
    tokens = Path(spec.source)
    if is_prepared(tokens):
        adopt_tokenizer(spec, read_index(tokens / "train"), data_dir)
    else:
        prepare_documents(spec, vocab_size, seed, data_dir)
        tokens = data_dir
    index = read_index(tokens / "train")
    if index["vocab_size"] > vocab_size:
        raise OrchError(
            f"{tokens}: tokenized with {index['vocab_size']} token ids, but the recipe's model.vocab_size is "
            f"{vocab_size}. Allowed: a model.vocab_size of at least {index['vocab_size']}."
        )
    if index["tokens"] < spec.max_seq_len:
        raise OrchError(
            f"{tokens}: the train split has {index['tokens']} tokens, fewer than one block of data.max_seq_len "
            f"{spec.max_seq_len}. Allowed: a corpus of at least one block."
        )
    write_json_atomic(data_dir / POINTER, {"tokens": str(tokens.resolve()), "max_seq_len": spec.max_seq_len})


def adopt_tokenizer(spec: DataSpec, index: dict, data_dir: Path) -> None:
    """The recipe's tokenizer must be the one the prepared shards were made with; the run keeps a copy of it."""
    path = Path(spec.tokenizer) / "tokenizer.json"
    if not path.is_file() or file_sha256(path) != index["tokenizer"]["sha256"]:
        raise OrchError(
            f"data.tokenizer {spec.tokenizer!r} is not the tokenizer data.source {spec.source} was prepared with "
            f"({index['tokenizer']['path']}, tokenizer.json sha256 {index['tokenizer']['sha256']}). "
            f"Allowed: that tokenizer, e.g. the copy in {Path(spec.source) / 'tokenizer'}."
        )
    copy_tokenizer(Path(spec.tokenizer), data_dir)


def prepare_documents(spec: DataSpec, vocab_size: int, seed: int, data_dir: Path) -> None:
    """Prepare 'demo' or a folder of documents into `data_dir`, with the recipe's tokenizer or, for 'demo', one
    trained there on these documents."""
    inputs = [write_demo_corpus(data_dir / "demo.jsonl", seed)] if spec.source == "demo" else [Path(spec.source)]
    tokenizer = data_dir / "tokenizer" if spec.tokenizer == "demo" else Path(spec.tokenizer)
    if spec.tokenizer == "demo" and not tokenizer.is_dir():
        train_tokenizer(read_texts(list_inputs(inputs)[0], Counter()), vocab_size, tokenizer)
    report = prepare(tokenizer, inputs, data_dir, Settings(JOB_VAL_FRACTION, seed, "auto", SHARD_TOKENS))
    log.info("prepared %s: %s", spec.source, {s: (i["documents"], i["tokens"]) for s, i in report.indexes.items()})


def load_split(data_dir: Path, split: str) -> TokenBlocks:
    pointer = read_json(data_dir / POINTER)
    return TokenBlocks(Path(pointer["tokens"]) / split, pointer["max_seq_len"])


def load_blocks(data_dir: Path) -> TokenBlocks:
    """The training blocks of the corpus `prepare_data` set up in `data_dir`."""
    return load_split(data_dir, "train")


def load_val_blocks(data_dir: Path) -> TokenBlocks:
    """The held-out blocks (the val split) of the corpus `prepare_data` set up in `data_dir`."""
    return load_split(data_dir, "val")
