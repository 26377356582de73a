"""The progress display of `orch follow` and `--wait`: a run's heartbeat, followed until its job ends."""

from __future__ import annotations

import time
from contextlib import suppress
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.core.eta import clock
from orchestrator.core.rundir import TERMINAL_STATES, Run
from orchestrator.core.runfiles import DamagedFile
from orchestrator.core.schedulers import job_alive


def follow(run: Run, console: Console, poll_s: float = 0.5) -> str:
    """Returns the run's final state."""
    columns = (
        TextColumn("[bold]{task.description}"),
        TextColumn("{task.fields[phase]}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}{task.fields[val]}", markup=False),
        TextColumn("{task.fields[tokens_per_s]} tok/s", markup=False),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}", markup=False),
    )
    summary = run.summary()
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(run.id, total=run.info.steps, completed=summary["step"] or 0, **shown(run, summary))
        while summary["state"] not in TERMINAL_STATES:
            time.sleep(poll_s)
            summary = run.summary()
            progress.update(task, completed=summary["step"] or 0, **shown(run, summary))
    wait_for_exit(run, poll_s)
    return summary["state"]


def shown(run: Run, summary: dict[str, Any]) -> dict[str, str]:
    """The display's fields from the run's summary (the ETA is `orch status`'s) and what its job is doing."""
    val = summary["val_loss"]
    return {
        "phase": phase(run, summary["state"]),
        "loss": "-" if summary["loss"] is None else f"{summary['loss']:.4f}",
        "val": "" if val is None else f", val {val:.4f} at step {summary['val_step']}",
        "tokens_per_s": f"{summary['tokens_per_s']:,.0f}" if summary["tokens_per_s"] else "-",
        "eta": clock(summary["eta_s"]),
    }


def phase(run: Run, state: str) -> str:
    """The run's phase; for a stalled run, for how long no step finished (not an end: the watchdog acts on it)."""
    if state == "stalled":
        with suppress(DamagedFile):
            if (beat := run.progress) and (stall := run.stall(beat)):
                return f"stalled: no step for {stall[0]:.0f} s"
        return state
    try:
        return run.phase(state)
    except DamagedFile:
        return state  # the next summary says which file, as a damaged run's state


def wait_for_exit(run: Run, poll_s: float, timeout_s: float = 120) -> None:
    """A job reports its end before its processes are gone; the run is free for the next job only then."""
    deadline = time.time() + timeout_s
    while run.jobs and job_alive(run.job(run.jobs[-1])) and time.time() < deadline:
        time.sleep(poll_s)
