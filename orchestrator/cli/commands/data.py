"""`orch data` and `orch tokenizer`: documents become a tokenizer, and token shards that training reads.

The work happens in `orchestrator.tools.prepare` and `jobs.shards`, imported inside the commands so that the CLI
starts fast.
"""

import os
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.core.corpus import FORMATS_HELP, SHARD_TOKENS, VAL_FRACTION
from orchestrator.core.errors import OrchError

if TYPE_CHECKING:
    from orchestrator.core.config import Profile
    from orchestrator.tools.prepare import Report, Settings
    from orchestrator.tools.prepare_jobs import Estimate, Plan, Progress

Inputs = Annotated[
    list[Path],
    typer.Option(
        "--input",
        metavar="PATH",
        help=f"a folder (walked recursively) or file, of {FORMATS_HELP} Repeat --input for several.",
    ),
]


ProfileName = Annotated[
    Optional[str],
    typer.Option(help="run as a job on this cluster profile's CPU nodes (e.g. karolina-cpu); without it, here"),
]
Account = Annotated[Optional[str], typer.Option(help="Slurm account (project id) of the job, e.g. OPEN-29-12")]
Minutes = Annotated[Optional[int], typer.Option("--time", min=1, help="time limit of each task, in minutes")]
Wait = Annotated[bool, typer.Option(help="follow the job until it ends; exit 2 unless it completed")]


def job_profile(
    name: str, account: str | None, nodes: int | None, minutes: int | None, site: bool = True
) -> "tuple[Path, Profile]":
    """The profile with the command's overrides, checked as `orch submit` checks it; with `site`, as a real submission
    does, also against what Slurm says of its partition's CPUs."""
    from orchestrator.core.loading import load_profile
    from orchestrator.core.preflight import check_partition
    from orchestrator.tools.prepare_jobs import check_cpus

    overrides = [{"slurm": {"account": account}}] if account else []
    overrides += [{"nodes": nodes}] if nodes is not None else []
    overrides += [{"time_limit_min": minutes}] if minutes is not None else []
    path, profile = load_profile(name, overrides)
    check_partition(profile, path)
    note = check_cpus(profile, path) if site else None
    if note:
        notes.print(note, soft_wrap=True, highlight=False, markup=False)
    return path, profile


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
    profile: ProfileName = None,
    nodes: Annotated[Optional[int], typer.Option(min=1, help="with --profile: nodes working at once")] = None,
    tasks: Annotated[
        Optional[int], typer.Option(min=1, help="with --profile: array tasks (default: the profile's nodes)")
    ] = None,
    slice_mb: Annotated[
        float, typer.Option(min=0.001, help="with --profile: input per slice, the unit a rerun redoes")
    ] = 1024,
    account: Account = None,
    minutes: Minutes = None,
    dry_run: Annotated[bool, typer.Option(help="with --profile: print the plan and the sbatch script")] = False,
    wait: Wait = False,
) -> None:
    """Tokenize documents into fixed-width token shards: EOS after every document, a val split held out by document.
    With --profile, as a job array on the profile's CPU nodes; the result is the same bytes."""
    from orchestrator.tools.prepare import RichReporter, Settings
    from orchestrator.tools.prepare import prepare as run_prepare

    settings = Settings(val_fraction=val_fraction, seed=seed, dtype=dtype, shard_tokens=shard_tokens)
    if profile is not None:
        prepare_as_job(tokenizer, inputs, output, settings, profile, nodes, tasks, slice_mb, account, minutes,
                       dry_run, wait)  # fmt: skip
        return
    show_report(run_prepare(tokenizer, inputs, output, settings, workers, RichReporter()), output, val_fraction)


def prepare_as_job(
    tokenizer: Path,
    inputs: list[Path],
    output: Path,
    settings: "Settings",
    profile_name: str,
    nodes: int | None,
    tasks: int | None,
    slice_mb: int,
    account: str | None,
    minutes: int | None,
    dry_run: bool,
    wait: bool,
) -> None:
    """Plan the slices, then print the plan or queue the array (only the slices not yet committed)."""
    from orchestrator.tools import prepare_jobs

    _, resolved = job_profile(profile_name, account, nodes, minutes, site=not dry_run)
    # the tasks run elsewhere, maybe in another folder: every path absolute
    tokenizer, inputs, output = tokenizer.resolve(), [path.resolve() for path in inputs], output.resolve()
    plan, tokenizer_files = prepare_jobs.make_plan(tokenizer, inputs, output, settings, int(slice_mb * 2**20))
    count = tasks or resolved.nodes
    if dry_run:
        show_plan(plan, prepare_jobs.estimate(plan, tokenizer_files, resolved, count), resolved, count, output)
        return
    if prepare_jobs.finished(output):
        console.print(f"{output} is prepared already; nothing was queued.", soft_wrap=True, highlight=False)
        show_report(prepare_jobs.report(output), output, settings.val_fraction)
        return
    jobs = prepare_jobs.submit(resolved, output, tokenizer_files, plan, count)
    notes.print(
        f"Queued {len(jobs)} prepare task(s) on {resolved.executor} ({', '.join(j.job_id for j in jobs[:4])}"
        f"{' ...' if len(jobs) > 4 else ''}); follow with `orch data status {output} --wait`.",
        soft_wrap=True,
        highlight=False,
    )
    if wait:
        follow_prepare(output)


def show_plan(plan: "Plan", estimate: "Estimate", profile: "Profile", tasks: int, output: Path) -> None:
    from orchestrator.tools.prepare_jobs import sbatch_text

    hours = estimate.wall_s / 3600
    rows = [
        ("input", f"{estimate.input_bytes:,} bytes in {len(plan.files):,} files"),
        ("slices", f"{len(plan.slices):,} (a whole file, or a byte range of a large plain one)"),
        ("tasks", f"{tasks:,}, {min(tasks, profile.nodes)} at a time, one node of {profile.node.cores} cores each"),
        ("rate measured here", f"{estimate.tokens_per_core_s:,.0f} tokens/s per core"),
        ("estimated tokens", f"{estimate.tokens:,}"),
        ("estimated wall time", f"{hours:,.2f} h (with the merge)"),
        ("node-hours", f"{estimate.node_hours:,.1f} on partition {profile.slurm.partition if profile.slurm else '-'}"),
        ("output size", f"{estimate.output_bytes / 1e9:,.2f} GB of shards ({plan.settings['dtype']})"),
    ]
    table = Table("plan", "")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    script = sbatch_text(profile, output)
    if script:
        console.print(f"sbatch script of each array task (--array=0-{tasks - 1}%{profile.nodes}):", highlight=False)
        console.print(script, highlight=False, markup=False, soft_wrap=True)


def follow_prepare(output: Path) -> None:
    """Print the progress until the job ends; the report when it completed, else exit 2 with what stopped it."""
    from orchestrator.tools.prepare_jobs import Plan, follow, report

    last = None
    for last in follow(output):
        print_progress(last)
    if last is not None and last.complete:
        show_report(report(output), output, Plan.load(output / "slices").settings["val_fraction"])
        if last.problems:
            raise OrchError(stopped_text(output, last, complete=True))
        return
    raise OrchError(stopped_text(output, last, complete=False))


def stopped_text(output: Path, state: "Progress", complete: bool) -> str:
    problems = "; ".join(state.problems) or "its tasks ended before every slice was committed (killed or cancelled)"
    if complete:
        return (
            f"--output {output}: prepared, but some input was skipped: {problems}. Each split's index.json lists "
            "the skipped files under skipped_files. Allowed: readable files; fix them and prepare into a new folder."
        )
    return (
        f"--output {output}: the prepare job stopped: {problems}. The committed slices are kept and no split index "
        "was written; fix the cause and run the same command again: it redoes only the slices not committed."
    )


def print_progress(state: "Progress") -> None:
    counts = ", ".join(f"{len(numbers)} {name}" for name, numbers in state.states.items() if numbers)
    eta = f", ETA {state.eta_s / 60:,.1f} min" if state.eta_s is not None else ""
    console.print(
        f"slices {len(state.states['done'])}/{state.slices} ({counts}); {state.tokens:,} tokens, "
        f"{state.rate:,.0f} tokens/s{eta}" + ("; merged" if state.complete else ""),
        highlight=False,
    )


@data_app.command()
def status(
    folder: Annotated[Path, typer.Argument(help="the --output of `orch data prepare --profile P`")],
    wait: Annotated[bool, typer.Option(help="follow it until its job ends")] = False,
) -> None:
    """A prepare job's progress: slices done, running, failed; tokens so far, rate, ETA. Exit 2 when it stopped."""
    from orchestrator.tools.prepare_jobs import progress

    if wait:
        follow_prepare(folder)
        return
    state = progress(folder)
    print_progress(state)
    if state.peak_rss_mb:
        console.print(f"peak memory of a task: {state.peak_rss_mb:,.0f} MB", highlight=False)
    if state.complete and state.problems or not state.complete and not state.alive:
        raise OrchError(stopped_text(folder, state, state.complete))


def show_report(report: "Report", output: Path, val_fraction: float) -> None:
    table = Table("split", "documents", "tokens", "shards", "skipped")
    for split, index in report.indexes.items():
        skipped = sum(index.skipped.values())
        table.add_row(split, f"{index.documents:,}", f"{index.tokens:,}", str(len(index.shards)), f"{skipped:,}")
    console.print(table)
    console.print(report.files_read(), soft_wrap=True, highlight=False, markup=False)
    show_skipped(report.documents_read(), report.skipped(), report.ignored)
    console.print(
        f"Prepared {output} ({report.indexes['train'].dtype} tokens). To train on it, set the recipe's "
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
    sample_mb: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="train on this much of the input, the start of each file by its share (recorded in "
            "orch-sample.json); default: all of it here, 2048 as a job",
        ),  # fmt: skip
    ] = None,
    profile: ProfileName = None,
    account: Account = None,
    minutes: Minutes = None,
    wait: Wait = False,
) -> None:
    """Train a byte-fallback BPE like Llama's: <unk> <s> </s>, 256 byte tokens, Metaspace (▁) pieces."""
    from orchestrator.tools.prepare import NO_DOCUMENT, SampledTexts, list_inputs, reading_counts, train_tokenizer

    if output.exists():
        raise OrchError(f"--output {output}: already exists. Allowed: a folder that does not exist yet.")
    files, ignored = list_inputs(inputs)
    if profile is not None:
        train_as_job(inputs, output, vocab_size, (sample_mb or JOB_SAMPLE_MB) << 20, profile, account, minutes, wait)
        return
    sample_bytes = sample_mb << 20 if sample_mb else None
    texts = SampledTexts(files, sample_bytes)
    documents = iter(texts)
    first = next(documents, None)  # all the input is read when it holds no document: then nothing is trained
    if first is None:
        raise OrchError(
            f"--input {', '.join(map(str, inputs))}: nothing to train a tokenizer on, no document holds text. "
            f"{reading_counts(len(files), len(ignored), 0, texts.skipped)}. --output {output} was not created. "
            f"{NO_DOCUMENT}"
        )
    record = {"sample_bytes": sample_bytes, "input_bytes": sum(f.size for f in files)} if sample_bytes else None
    size = train_tokenizer(chain([first], documents), vocab_size, output, show_progress=True, record=record)
    console.print(f"Trained a tokenizer of {size:,} tokens on {texts.used:,} documents into {output}")
    show_skipped(texts.used + texts.skipped.total(), texts.skipped, ignored)


JOB_SAMPLE_MB = 2048  # a tokenizer job's sample where --sample-mb is not given


def train_as_job(
    inputs: list[Path],
    output: Path,
    vocab_size: int,
    sample_bytes: int,
    profile_name: str,
    account: str | None,
    minutes: int | None,
    wait: bool,
) -> None:
    """Queue the training on one node of the profile; with --wait, follow it to its end."""
    from orchestrator.core.schedulers import job_alive
    from orchestrator.tools.prepare_jobs import submit_tokenizer

    _, resolved = job_profile(profile_name, account, 1, minutes)
    job = submit_tokenizer(resolved, inputs, vocab_size, output, sample_bytes)
    notes.print(
        f"Queued tokenizer job {job.job_id} ({resolved.executor}) on a sample of {sample_bytes >> 20:,} MB; it saves "
        f"{output}. Its log: {job.folder / job.job_id}",
        soft_wrap=True,
        highlight=False,
    )
    if not wait:
        return
    import time

    with notes.status(f"Waiting for job {job.job_id} ..."):
        while job_alive(job) and not output.is_dir():
            time.sleep(2)
    if not output.is_dir():
        raise OrchError(
            f"The tokenizer job {job.job_id} ended without saving --output {output}. Its log is in "
            f"{job.folder / job.job_id}; fix the cause and run the same command again."
        )
    console.print(f"Trained a tokenizer into {output}", highlight=False)


def show_skipped(read: int, skipped: Counter[str], ignored: list[Path]) -> None:
    """Everything that was read and not used, by reason: nothing is dropped silently."""
    reasons = ", ".join(f"{reason}: {count:,}" for reason, count in skipped.most_common()) or "none"
    console.print(f"Documents read: {read:,}; skipped: {skipped.total():,} ({reasons}).")
    if ignored:
        from orchestrator.tools.prepare import listed

        shown = listed([str(path) for path in ignored])
        console.print(f"Files ignored (not a supported format): {len(ignored)}: {shown}", soft_wrap=True, markup=False)
