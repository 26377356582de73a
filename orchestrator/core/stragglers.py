"""Slow hosts: the robust score that names them, the cost test that decides whether to leave them, and the run file
that records both (`stragglers.json`, owned here; docs/stragglers.md).

A synchronous job runs at the pace of its slowest rank: its peers wait for it in the collectives. A rank's *compute*
time (forward+backward and optimizer, not data wait and not the wait in the step's sync) is what tells the slow one
apart; a host's figure for a step is its slowest rank's. Over a window of steps, each host's median compute time is
compared with the median of the other hosts' medians:

- slowdown = host median / others' median - 1 (0.5: the host computes 50 % longer);
- z = (host median - others' median) / (1.4826 × the others' MAD), the MAD floored at 1 % of their median: how far
  outside the healthy hosts' own step-to-step noise it lies;
- persistent: the window is full, slowdown and z are at least the profile's thresholds, and the host was slower than
  the others' median × (1 + threshold) in every step of the window: a slowdown shorter than the window is transient.

The cost test compares the expected loss of keeping a persistent straggler (the time it adds per step × the steps
left in this allocation or the run, whichever ends first) with the cost of leaving it (a save, the queue wait of the
requeue, a new start-up). Stdlib only: the job imports it, and `orch status` reads the file.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel

from orchestrator.core.files import write_json_atomic
from orchestrator.core.runfiles import Attempt, read_model

FILE = "stragglers.json"
MAD_TO_SIGMA = 1.4826  # the MAD of normal noise times this is its standard deviation
MAD_FLOOR = 0.01  # of the others' median: identical step times must not make any difference infinitely significant
Z_THRESHOLD = 3.0


class HostScore(BaseModel):
    """One host's figures over the window."""

    host: str
    compute_s: float  # median compute time of the host's slowest rank per step
    others_s: float  # median of the other hosts' medians
    slowdown: float  # compute_s / others_s - 1
    z: float
    slow_steps: int  # steps of the window in which the host was slower than others_s × (1 + threshold)
    persistent: bool


class Decision(BaseModel):
    """What the cost test found for a persistent straggler, with its figures (seconds)."""

    job_id: str
    step: int
    host: str
    slowdown: float
    excess_s: float  # time the host adds to every step
    steps_ahead: int  # steps this allocation (or the run) still has at the current pace
    keep_loss_s: float  # excess_s × steps_ahead
    save_s: float
    queue_wait_s: float
    startup_s: float
    leave_cost_s: float  # save + queue wait + start-up
    action: str  # "requeue without HOST", or why the job keeps it
    leave: bool
    time: float


class Stragglers(BaseModel):
    """stragglers.json: the newest job's per-host scores, and every decision of the run's jobs."""

    job_id: str
    step: int
    window: int
    scores: list[HostScore]
    decisions: list[Decision] = []


def score_hosts(
    window: Sequence[Mapping[str, float]], size: int, threshold: float, z_threshold: float = Z_THRESHOLD
) -> list[HostScore]:
    """Each host's score over `window` (per step: host -> compute seconds), slowest first. Needs two hosts."""
    hosts = sorted({host for step in window for host in step})
    if len(hosts) < 2 or not window:
        return []
    series = {h: [step[h] for step in window if h in step] for h in hosts}
    medians = {h: statistics.median(values) for h, values in series.items()}
    scores = []
    for host in hosts:
        others = [g for g in hosts if g != host]
        ref = statistics.median(medians[g] for g in others)
        pooled = [v for g in others for v in series[g]]
        mad = statistics.median(abs(v - statistics.median(pooled)) for v in pooled)
        noise = max(MAD_TO_SIGMA * mad, MAD_FLOOR * ref, 1e-9)
        slowdown = medians[host] / ref - 1 if ref > 0 else 0.0
        z = (medians[host] - ref) / noise
        slow_steps = sum(1 for step in window if slower(step, host, threshold))
        persistent = len(window) >= size and slowdown >= threshold and z >= z_threshold and slow_steps == len(window)
        scores.append(HostScore(host=host, compute_s=medians[host], others_s=ref, slowdown=slowdown, z=z,
                                slow_steps=slow_steps, persistent=persistent))  # fmt: skip
    return sorted(scores, key=lambda s: s.slowdown, reverse=True)


def slower(step: Mapping[str, float], host: str, threshold: float) -> bool:
    """Whether `host` computed longer than the other hosts' median × (1 + threshold) in this step."""
    others = [seconds for name, seconds in step.items() if name != host]
    return host in step and bool(others) and step[host] > statistics.median(others) * (1 + threshold)


def cost_test(
    score: HostScore,
    *,
    job_id: str,
    step: int,
    step_s: float,
    steps_left: int,
    allocation_left_s: float,
    save_s: float,
    queue_wait_s: float,
    startup_s: float,
    now: float,
) -> Decision:
    """Leave the host only where keeping it costs more than leaving: excess per step × the steps ahead (of this
    allocation at the current pace, at most the run's) against a save, the requeue's queue wait and a new start."""
    excess = max(0.0, (score.compute_s - score.others_s))
    steps_ahead = max(0, min(steps_left, int(allocation_left_s / step_s) if step_s > 0 else steps_left))
    keep_loss = excess * steps_ahead
    leave_cost = save_s + queue_wait_s + startup_s
    leave = keep_loss > leave_cost
    action = f"requeue without {score.host}" if leave else f"keep {score.host}: leaving costs more than it saves"
    return Decision(
        job_id=job_id, step=step, host=score.host, slowdown=score.slowdown, excess_s=excess, steps_ahead=steps_ahead,
        keep_loss_s=keep_loss, save_s=save_s, queue_wait_s=queue_wait_s, startup_s=startup_s,
        leave_cost_s=leave_cost, action=action, leave=leave, time=now,
    )  # fmt: skip


def read(run_dir: Path) -> Stragglers | None:
    """The run's stragglers.json; None before a job scored its hosts (DamagedFile where it cannot be read)."""
    return read_model(run_dir / FILE, Stragglers)


def left_hosts(run_dir: Path) -> dict[str, Decision]:
    """The hosts the run's jobs left for slowness, each with its newest decision to leave it: a new job of the run
    keeps off them too (`orch resume`), unless the user takes them back."""
    figures = read(run_dir)
    return {d.host: d for d in figures.decisions if d.leave} if figures else {}


def left_note(decision: Decision) -> str:
    """How `orch resume` names a host left for slowness."""
    return f"{decision.host}, left for slowness at step {decision.step} ({100 * decision.slowdown:+.0f} %)"


def write(run_dir: Path, figures: Stragglers, durable: bool = False) -> None:
    write_json_atomic(run_dir / FILE, figures.model_dump(), durable)


def restart_gaps(attempts: Sequence[Attempt]) -> list[float]:
    """Seconds between an attempt's stop and the next one's launch: the queue waits this run saw."""
    return [
        after.launched - before.stopped
        for before, after in zip(attempts, attempts[1:], strict=False)
        if before.stopped is not None and after.launched is not None and after.launched > before.stopped
    ]
