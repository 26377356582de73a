"""`orch swap` and `orch export`: model directories in and out of orch. Both run without a GPU or a job."""

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.core.errors import OrchError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()


def check_dir(path: Path, option: str, needs: str | None = None) -> None:
    """An input folder must exist (and hold `needs`, when given)."""
    if not path.is_dir():
        raise OrchError(f"Option {option} names {str(path)!r}, which is not a folder. Allowed: an existing folder.")
    if needs and not (path / needs).is_file():
        raise OrchError(
            f"Option {option} names {str(path)!r}, which has no {needs}. Allowed: a Hugging Face model directory."
        )


def check_file(path: Path | None, option: str) -> None:
    if path is not None and not path.is_file():
        raise OrchError(f"Option {option} names {str(path)!r}, which is not a file. Allowed: an existing file.")


def check_output(path: Path) -> None:
    """Nothing is ever overwritten: the output folder must be new or empty."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OrchError(
            f"Option --output names {str(path)!r}, which already exists and is not an empty folder. "
            "Allowed: a new or empty folder (orch never overwrites a model directory)."
        )


@app.command()
def swap(
    source_model: Annotated[Path, typer.Option(help="the trained model: a Hugging Face Llama directory")],
    source_tokenizer: Annotated[Path, typer.Option(help="the tokenizer the source model was trained with")],
    target_tokenizer: Annotated[Path, typer.Option(help="the new tokenizer")],
    output: Annotated[Path, typer.Option(help="a new folder for the target model")],
    dictionary: Annotated[
        Optional[Path], typer.Option(help="pairs 'target<TAB>source' (tokens) or 'target source' (words), one a line")
    ] = None,
    sample: Annotated[Optional[Path], typer.Option(help="a text whose coverage by aligned tokens is reported")] = None,
) -> None:
    """Give a trained model a new tokenizer: aligned tokens keep their rows, others start from their pieces."""
    check_dir(source_model, "--source-model", needs="config.json")
    check_dir(source_tokenizer, "--source-tokenizer")
    check_dir(target_tokenizer, "--target-tokenizer")
    check_file(dictionary, "--dictionary")
    check_file(sample, "--sample")
    check_output(output)
    from orchestrator.tools import swap as swap_job

    report = swap_job.swap(source_model, source_tokenizer, target_tokenizer, output, dictionary, sample)
    print_swap_report(report)
    console.print(f"Target model written to {output}; report in {output / swap_job.REPORT_FILE}.")


def print_swap_report(report: dict[str, Any]) -> None:
    total = report["target_vocab_size"]
    table = Table("rule", "tokens", "share", title=f"{total} target tokens, {report['source_vocab_size']} source")
    for rule, count in report["rules"].items():
        table.add_row(rule, str(count), f"{count / total:.1%}")
    table.add_row("[bold]aligned (rows copied)", f"[bold]{report['aligned']}", f"[bold]{report['aligned'] / total:.1%}")
    console.print(table)
    if report["unmatched_dictionary_lines"]:
        lines = ", ".join(map(str, report["unmatched_dictionary_lines"]))
        console.print(f"Dictionary lines naming no token of both vocabularies: {lines}")
    if "sample" in report:
        sample = report["sample"]
        console.print(
            f"Sample {sample['file']}: {sample['copied']} of {sample['tokens']} tokens aligned "
            f"(coverage {sample['coverage']:.1%})."
        )


@app.command()
def export(
    run_id: Annotated[str, typer.Argument(help="the run to export")],
    output: Annotated[Path, typer.Option(help="a new folder for the Hugging Face model")],
    step: Annotated[Optional[int], typer.Option(help="the checkpoint's step; the latest when left out")] = None,
) -> None:
    """Write a run's checkpoint as a Hugging Face model directory (weights, config, tokenizer)."""
    check_output(output)
    from orchestrator.tools import export as export_job

    exported = export_job.export(run_id, step, output)
    console.print(f"Exported run {run_id} at step {exported} to {output}.")
