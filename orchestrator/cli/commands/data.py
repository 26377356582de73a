"""`orch data` and `orch tokenizer`: documents become a tokenizer, and token shards that training reads.

The work happens in `orchestrator.tools.prepare` and `jobs.shards`, imported inside the commands so that the CLI
starts fast.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.core.corpus import FORMATS_HELP, SHARD_TOKENS, VAL_FRACTION
from orchestrator.core.errors import OrchError

Inputs = Annotated[
    list[Path],
    typer.Option(
        "--input",
        metavar="PATH",
        help=f"a folder (walked recursively) or file, of {FORMATS_HELP} Repeat --input for several.",
    ),
]


def available_cpus() -> int:
    """The CPUs this process may run on (a Slurm job's allocation), where the system can tell."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


data_app = typer.Typer(
    help="Corpora: documents become token shards (train and val splits) that training reads.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
tokenizer_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
notes = Console(stderr=True)  # notes and warnings; stdout carries the report


@tokenizer_app.callback()
def tokenizer_group() -> None:
    """Tokenizers: a byte-fallback BPE like Llama's, trained on your documents."""


@data_app.command()
def prepare(
    tokenizer: Annotated[Path, typer.Option(help="a Hugging Face fast tokenizer folder (with tokenizer.json)")],
    inputs: Inputs,
    output: Annotated[
        Path,
        typer.Option(
            help="folder for train/, val/, tokenizer/ and manifest.json; run again to finish an interrupted one"
        ),
    ],
    val_fraction: Annotated[
        float, typer.Option(help="share of documents held out as the val split, chosen by a hash of their position")
    ] = VAL_FRACTION,
    workers: Annotated[
        int, typer.Option(min=1, help="tokenizer processes; 1 tokenizes here with the tokenizers library's threads")
    ] = available_cpus(),
    seed: Annotated[int, typer.Option(help="decides which documents are held out")] = 0,
    dtype: Annotated[
        str, typer.Option(help="token width: auto (uint16 when the vocabulary fits), uint16, uint32")
    ] = "auto",
    shard_tokens: Annotated[int, typer.Option(min=1, help="tokens per shard file")] = SHARD_TOKENS,
) -> None:
    """Tokenize documents into fixed-width token shards: EOS after every document, a val split held out by document."""
    from orchestrator.tools.prepare import RichReporter, Settings
    from orchestrator.tools.prepare import prepare as run_prepare

    settings = Settings(val_fraction=val_fraction, seed=seed, dtype=dtype, shard_tokens=shard_tokens)
    report = run_prepare(tokenizer, inputs, output, settings, workers, RichReporter())
    table = Table("split", "documents", "tokens", "shards", "skipped")
    for split, index in report.indexes.items():
        skipped = sum(index["skipped"].values())
        table.add_row(
            split, f"{index['documents']:,}", f"{index['tokens']:,}", str(len(index["shards"])), f"{skipped:,}"
        )
    console.print(table)
    console.print(report.files_read(), soft_wrap=True, highlight=False, markup=False)
    show_skipped(report.documents_read(), report.skipped(), report.ignored)
    console.print(
        f"Prepared {output} ({report.indexes['train']['dtype']} tokens). To train on it, set the recipe's "
        f"data.source: {output} and data.tokenizer: {output / 'tokenizer'}"
    )
    for message in filter(None, (report.single_document_note(), report.val_warning(val_fraction))):
        notes.print(message, soft_wrap=True, highlight=False, markup=False)


@data_app.command()
def verify(folder: Annotated[Path, typer.Argument(help="a folder made by `orch data prepare`")]) -> None:
    """Check every shard of a prepared folder against its index: sizes and sha256 checksums."""
    from jobs.shards import TokenBlocks

    for split in ("train", "val"):
        blocks = TokenBlocks(folder / split, block_len=1)
        blocks.verify_checksums()
        console.print(f"{split}: {len(blocks.shards)} shards, {blocks.tokens:,} tokens: sizes and checksums match")


@tokenizer_app.command()
def train(
    inputs: Inputs,
    output: Annotated[Path, typer.Option(help="new folder to save the tokenizer in (AutoTokenizer loads it)")],
    vocab_size: Annotated[int, typer.Option(help="tokens in the vocabulary, special and byte tokens included")] = 64000,
) -> None:
    """Train a byte-fallback BPE like Llama's: <unk> <s> </s>, 256 byte tokens, Metaspace (▁) pieces."""
    from orchestrator.tools.prepare import NO_DOCUMENT, list_inputs, read_texts, reading_counts, train_tokenizer

    if output.exists():
        raise OrchError(f"--output {output}: already exists. Allowed: a folder that does not exist yet.")
    files, ignored = list_inputs(inputs)
    skipped: Counter[str] = Counter()
    used = [0]

    def texts() -> Iterator[str]:
        for text in read_texts(files, skipped):
            used[0] += 1
            yield text

    documents = texts()
    first = next(documents, None)  # all the input is read when it holds no document: then nothing is trained
    if first is None:
        raise OrchError(
            f"--input {', '.join(map(str, inputs))}: nothing to train a tokenizer on, no document holds text. "
            f"{reading_counts(len(files), len(ignored), 0, skipped)}. --output {output} was not created. {NO_DOCUMENT}"
        )
    size = train_tokenizer(chain([first], documents), vocab_size, output, show_progress=True)
    console.print(f"Trained a tokenizer of {size:,} tokens on {used[0]:,} documents into {output}")
    show_skipped(used[0] + skipped.total(), skipped, ignored)


def show_skipped(read: int, skipped: Counter[str], ignored: list[Path]) -> None:
    """Everything that was read and not used, by reason: nothing is dropped silently."""
    reasons = ", ".join(f"{reason}: {count:,}" for reason, count in skipped.most_common()) or "none"
    console.print(f"Documents read: {read:,}; skipped: {skipped.total():,} ({reasons}).")
    if ignored:
        from orchestrator.tools.prepare import listed

        shown = listed([str(path) for path in ignored])
        console.print(f"Files ignored (not a supported format): {len(ignored)}: {shown}", soft_wrap=True, markup=False)
