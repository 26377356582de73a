"""`--wait`: follow a run's heartbeat with a rich progress display until its job ends."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from orchestrator.core.rundir import TERMINAL_STATES, Run
from orchestrator.core.scheduler import job_alive


def follow(run: Run, console: Console, poll_s: float = 0.5) -> str:
    """Returns the run's final state."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tokens_per_s]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(run.id, total=run.info.steps, loss="-", tokens_per_s="-")
        while True:
            state, beat = run.state(), run.progress
            stall = run.stall(beat) if state == "stalled" and beat else None  # not an end: the watchdog acts on it
            progress.update(
                task,
                completed=beat.step if beat else 0,
                description=f"{run.id} [{state}]" + (f" no step for {stall[0]:.0f} s" if stall else ""),
                loss=f"{beat.loss:.4f}" if beat and beat.loss is not None else "-",
                tokens_per_s=f"{beat.tokens_per_s:,.0f}" if beat and beat.tokens_per_s else "-",
            )
            if state in TERMINAL_STATES:
                wait_for_exit(run, poll_s)
                return state
            time.sleep(poll_s)


def wait_for_exit(run: Run, poll_s: float, timeout_s: float = 120) -> None:
    """A job reports its end before its processes are gone; the run is free for the next job only then."""
    deadline = time.time() + timeout_s
    while run.jobs and job_alive(run.jobs[-1]) and time.time() < deadline:
        time.sleep(poll_s)
