"""The Concat dataset: documents joined with EOS, cut into fixed blocks, read in a world-size-free order.

Packing: every document is followed by EOS and the stream is cut into blocks of `max_seq_len` tokens;
the labels are the inputs (the model shifts them), so a block trains `max_seq_len - 1` predictions.
The final partial block (fewer than `max_seq_len` tokens) is dropped and counted.

Order: global sample g is block `permutation(seed, epoch)[g % n_blocks]` with `epoch = g // n_blocks`,
and optimizer step s consumes global samples [s·B, (s+1)·B) for global batch B. Which rank computes
which of them depends on the world size; which samples a step sees does not.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from orchestrator.config import DataSpec

DEMO_DOCUMENTS = 4000


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


def train_demo_tokenizer(corpus: list[str], vocab_size: int, output: Path) -> None:
    """A byte-level BPE trained on the corpus, saved so `AutoTokenizer.from_pretrained` loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(output)


def pack(documents: Iterable[list[int]], eos_id: int, block_len: int) -> tuple[np.ndarray, int]:
    """Concatenate documents, each followed by EOS, into rows of `block_len`; returns (blocks, tokens dropped)."""
    stream = np.fromiter((t for doc in documents for t in (*doc, eos_id)), dtype=np.int64)
    n_blocks = len(stream) // block_len
    return stream[: n_blocks * block_len].reshape(n_blocks, block_len), len(stream) - n_blocks * block_len


@dataclass(frozen=True)
class GlobalOrder:
    """Maps (step, micro step, rank) to block indices; the samples of a step do not depend on the world size."""

    n_blocks: int
    global_batch: int
    micro_batch: int
    world_size: int
    seed: int

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)

    def global_samples(self, step: int) -> range:
        return range(step * self.global_batch, (step + 1) * self.global_batch)

    def block_indices(self, step: int, micro_step: int, rank: int) -> np.ndarray:
        first = step * self.global_batch + (micro_step * self.world_size + rank) * self.micro_batch
        samples = np.arange(first, first + self.micro_batch)
        epochs = samples // self.n_blocks
        return np.array([self.permutation(e)[s % self.n_blocks] for e, s in zip(epochs, samples, strict=True)])


class BlockLoader:
    """Serves one rank's micro-batches as token tensors."""

    def __init__(self, blocks: np.ndarray, order: GlobalOrder, rank: int, device: torch.device) -> None:
        self.blocks, self.order, self.rank, self.device = blocks, order, rank, device

    def micro_batch(self, step: int, micro_step: int) -> torch.Tensor:
        rows = self.blocks[self.order.block_indices(step, micro_step, self.rank)]
        return torch.from_numpy(rows.astype(np.int64)).to(self.device)


def read_documents(source: str, seed: int) -> list[str]:
    """'demo' generates the demo corpus; otherwise every `*.txt` file below the folder is one document."""
    if source == "demo":
        return demo_corpus(seed)
    return [path.read_text(encoding="utf-8") for path in sorted(Path(source).rglob("*.txt"))]


def prepare_data(spec: DataSpec, vocab_size: int, seed: int, data_dir: Path) -> None:
    """Tokenize and pack the recipe's documents into `data_dir` (rank 0 only; the others wait)."""
    from transformers import AutoTokenizer

    documents = read_documents(spec.source, seed)
    tokenizer_dir = data_dir / "tokenizer" if spec.tokenizer == "demo" else Path(spec.tokenizer)
    if spec.tokenizer == "demo":
        train_demo_tokenizer(documents, vocab_size, tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens, model.vocab_size is {vocab_size}")
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    blocks, _ = pack(ids, tokenizer.eos_token_id, spec.max_seq_len)
    np.save(data_dir / "blocks.tmp.npy", blocks.astype(np.uint32))
    (data_dir / "blocks.tmp.npy").rename(data_dir / "blocks.npy")
    tokenizer.save_pretrained(data_dir / "tokenizer")


def load_blocks(data_dir: Path) -> np.ndarray:
    return np.load(data_dir / "blocks.npy", mmap_mode="r")
