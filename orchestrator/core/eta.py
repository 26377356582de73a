"""The time a run has left: one estimate, which `orch status`, the progress display (`orch follow`, `--wait`) and
the job log all show, so that they never disagree on it."""

from __future__ import annotations


def eta_s(step: int, steps: int, step_time_s: float | None) -> float | None:
    """Seconds of training left: the steps still to train at `step_time_s` each; None before a step was timed.
    Only steps count: validations, saves, queueing and restarts come on top."""
    if step_time_s is None:
        return None
    return max(0, steps - step) * step_time_s


def clock(seconds: float | None) -> str:
    """H:MM:SS (hours go past 24: a run's ETA is read in hours), or "-" when unknown."""
    if seconds is None:
        return "-"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
