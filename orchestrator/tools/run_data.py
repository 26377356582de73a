"""A run's data, set up on the submitting machine before its job is queued (the job never tokenizes).

A folder made by `orch data prepare` is read where it is: `RUN_DIR/data/tokens.json` names it (for a mixture, each
source by name) and the block length, and `RUN_DIR/data/tokenizer` keeps a copy of the tokenizer. 'demo' (a
generated Czech-like corpus) goes through the same prepare into `RUN_DIR/data`, with a tokenizer trained there on it
unless the recipe names one.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

from jobs.shards import INDEX, POINTER, source_folders
from orchestrator.core.config import DataSpec
from orchestrator.core.corpus import SHARD_TOKENS
from orchestrator.core.files import read_json, write_atomic, write_json_atomic
from orchestrator.tools.prepare import Settings, copy_tokenizer, list_inputs, prepare, read_texts, train_tokenizer

log = logging.getLogger(__name__)

DEMO_DOCUMENTS = 4000
DEMO_VAL_FRACTION = 0.05  # documents of the demo corpus held out for validation


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


def is_prepared(folder: Path) -> bool:
    return (folder / "train" / INDEX).is_file()


def data_ready(data_dir: Path) -> bool:
    """Whether `data_dir` already names complete token shards (then `attach_data` has nothing to do)."""
    pointer = read_json(data_dir / POINTER)
    if pointer is None:
        return False
    return all(is_prepared(data_dir / folder) for folder in source_folders(pointer).values())


def write_demo_corpus(path: Path, seed: int) -> Path:
    write_atomic(path, "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in demo_corpus(seed)))
    return path


def attach_data(spec: DataSpec, vocab_size: int, seed: int, data_dir: Path) -> None:
    """Make `data_dir` name the token shards the recipe trains on: a prepared folder where it is, or the demo corpus
    prepared into `data_dir`. The submission's pre-flight checks (`orchestrator.core.preflight`) have passed."""
    if data_ready(data_dir):
        return
    if spec.sources is not None:
        copy_tokenizer(Path(spec.tokenizer), data_dir)
        folders = {name: str(Path(source.path).resolve()) for name, source in spec.sources.items()}
        write_json_atomic(data_dir / POINTER, {"sources": folders, "max_seq_len": spec.max_seq_len})
        return
    if spec.source == "demo":
        prepare_demo(spec, vocab_size, seed, data_dir)
        tokens = data_dir
    else:
        tokens = Path(spec.source)
        copy_tokenizer(Path(spec.tokenizer), data_dir)
    where = "." if tokens == data_dir else str(tokens.resolve())  # the run's own shards move with it
    write_json_atomic(data_dir / POINTER, {"tokens": where, "max_seq_len": spec.max_seq_len})


def prepare_demo(spec: DataSpec, vocab_size: int, seed: int, data_dir: Path) -> None:
    """The demo corpus as token shards in `data_dir`, with the recipe's tokenizer or one trained there on it."""
    inputs = [write_demo_corpus(data_dir / "demo.jsonl", seed)]
    tokenizer = data_dir / "tokenizer" if spec.tokenizer == "demo" else Path(spec.tokenizer)
    if spec.tokenizer == "demo" and not tokenizer.is_dir():
        train_tokenizer(read_texts(list_inputs(inputs)[0], Counter()), vocab_size, tokenizer)
    report = prepare(tokenizer, inputs, data_dir, Settings(DEMO_VAL_FRACTION, seed, "auto", SHARD_TOKENS))
    log.info("prepared %s: %s", spec.source, {s: (i.documents, i.tokens) for s, i in report.indexes.items()})
