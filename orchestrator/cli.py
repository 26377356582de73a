"""The `orch` command line."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.errors import OrchError

app = typer.Typer(
    help="orch: pretraining jobs on Slurm clusters, and on this machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)


@app.command()
def submit(
    profile: Annotated[str, typer.Option(help="cluster profile: a name in cluster_profiles/ or a YAML path")] = "local",
    recipe: Annotated[str, typer.Option(help="training recipe: a name in recipes/ or a YAML path")] = "tiny",
    steps: Annotated[int, typer.Option(help="optimizer steps to train (the schedule's length is the recipe's)")] = 200,
    wait: Annotated[bool, typer.Option(help="follow the job to its end; the exit code tells success")] = False,
) -> None:
    """Validate, create a run and submit its training job."""
    from orchestrator.submit import submit as submit_run

    run = submit_run(profile, recipe, steps)
    console.print(f"Submitted run [bold]{run.id}[/] (job {run.jobs[-1]['job_id']}), run directory {run.dir}")
    if wait:
        finish(run)
    else:
        console.print(f"Follow it with: orch status {run.id}")


def finish(run) -> None:
    from orchestrator.follow import follow

    state = follow(run, console)
    summary = run.summary()
    if state != "completed":
        logs = run.submitit_dir
        raise OrchError(
            f"Run {run.id} {state} at step {summary['step']}: {summary['error'] or 'the job ended early'}. "
            f"Job logs: {logs}"
        )
    console.print(
        f"Run {run.id} completed {summary['step']} steps; last checkpoint at step "
        f"{summary['last_checkpoint_step']}; MLflow run {summary['mlflow_run_id']}."
    )


@app.command()
def status(
    run_id: Annotated[Optional[str], typer.Argument(help="one run; all runs when left out")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Runs and their state, read from the run directories."""
    from orchestrator.runs import all_runs, get_run

    summaries = [get_run(run_id).summary()] if run_id else [run.summary() for run in all_runs()]
    if as_json:
        print(json.dumps(summaries[0] if run_id else summaries, indent=2))
        return
    table = Table("run", "state", "step", "loss", "tok/s", "checkpoint", "profile", "recipe")
    for s in summaries:
        table.add_row(
            s["run_id"],
            s["state"],
            f"{s['step']}/{s['steps']}",
            f"{s['loss']:.4f}" if s["loss"] is not None else "-",
            f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] else "-",
            str(s["last_checkpoint_step"] or "-"),
            s["profile"],
            s["recipe"],
        )
    console.print(table)


def main() -> None:
    try:
        app()
    except OrchError as err:
        errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
