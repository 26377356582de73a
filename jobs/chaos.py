"""Fault injection for tests: `ORCH_CHAOS` plants faults at given steps of a job.

`ORCH_CHAOS` is a comma-separated list of `action@step` (e.g. `spike@12`); each action is a small function of this
module, listed in ACTIONS with what its step means; the slowdowns take arguments after the step (`Slowdown`). A job
reads the variable from its environment (`orch submit` passes its own to a local job; under Slurm, sbatch exports it),
so a test plants a fault without any change to the run; `orch submit` refuses what it cannot parse. Unset, nothing
happens.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.errors import OrchError

VARIABLE = "ORCH_CHAOS"
SPIKE_FACTOR = 100.0


def spike(loss: float, data_step: int) -> float:
    """spike@N: the batch of data step N is poisoned: the step that trains it reports its loss × SPIKE_FACTOR (the
    weights train as usual). Once the spike guard skips that batch it is never trained again, so the spike comes once
    per run whatever interruptions and rollbacks happen; with no skips, data step N is training step N."""
    return loss * SPIKE_FACTOR if planted("spike", data_step) else loss


class PlantedFailure(RuntimeError):
    """The error `fail` and `fail-always` raise."""


def fail(step: int, rank: int, world: int, fired: Path) -> None:
    """The faults planted at training step N, on the job's last rank (so that a rank other than 0 fails first):
    fail@N raises once per run (a marker in `fired`, the run's chaos/ folder, remembers it), fail-always@N raises on
    every try, and sigkill@N kills the rank's process with SIGKILL once per run: a rank that dies without a word (the
    OOM killer, a segfault) while its peers go on into the step's first collective."""
    if rank != world - 1:
        return
    if planted("sigkill", step) and first_time(fired, f"sigkill@{step}"):
        os.kill(os.getpid(), signal.SIGKILL)
    if planted("fail", step) and first_time(fired, f"fail@{step}"):
        raise PlantedFailure(f"failure planted at step {step} ({VARIABLE})")
    if planted("fail-always", step):
        raise PlantedFailure(f"failure planted at step {step} on every try ({VARIABLE})")


def first_time(fired: Path, marker: str) -> bool:
    """Whether the fault `marker` fires for the first time in this run; from now on it has fired."""
    path = fired / marker
    if path.exists():
        return False
    fired.mkdir(parents=True, exist_ok=True)
    path.touch()
    return True


@dataclass(frozen=True)
class Slowdown:
    """slow@N:TARGET:SECONDS (from training step N on, for good) or hiccup@N:TARGET:SECONDS:STEPS (for STEPS steps
    from N): the ranks TARGET names (`host=NAME`: every rank on that host, `rank=K`: one rank) sleep SECONDS in every
    such step, inside their compute: a slow GPU, a throttled or degraded host (docs/stragglers.md)."""

    step: int
    host: str | None
    rank: int | None
    seconds: float
    steps: int | None  # None: for good

    def applies(self, step: int, rank: int, host: str) -> bool:
        targeted = host == self.host if self.host is not None else rank == self.rank
        return targeted and self.step <= step and (self.steps is None or step < self.step + self.steps)


MAX_DELAY_S = 3600.0
SLOWDOWN_ARGS = {"slow": 2, "hiccup": 3}  # how many arguments follow the step


def delay(step: int, rank: int, host: str) -> float:
    """The seconds the planted slowdowns make this rank sleep in training step `step`."""
    return sum(s.seconds for s in slowdowns() if s.applies(step, rank, host))


SLOW_SAVE_S = 4.0


def slow_saves(model: Any, step: Callable[[], int | None]) -> None:
    """slow-save@N: every save of training step N or later takes SLOW_SAVE_S longer on every rank, as it reads the
    model's state inside `Checkpointer.save` (a filesystem that slowed down). `step`: the step in training, None while
    the job loads its checkpoint (not slowed)."""
    first = min(planned().get("slow-save", ()), default=None)
    if first is None:
        return

    def sleep(*_: object) -> None:
        training = step()
        if training is not None and training + 1 >= first:  # the step in training is saved once it is done
            time.sleep(SLOW_SAVE_S)

    model.register_state_dict_pre_hook(sleep)


ACTIONS: dict[str, Callable[..., object]] = {
    "spike": spike, "fail": fail, "fail-always": fail, "sigkill": fail, "slow": delay, "hiccup": delay,
    "slow-save": slow_saves,
}  # fmt: skip


def items() -> list[tuple[str, int, list[str]]]:
    """ORCH_CHAOS as (action, step, arguments); a refusal names the item and what is allowed."""
    text = os.environ.get(VARIABLE, "")
    found = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        action, _, rest = item.partition("@")
        step, *args = rest.split(":")
        if action not in ACTIONS or not step.isdigit():
            raise OrchError(
                f"{VARIABLE}={text!r}: {item!r} is not action@step; actions: {', '.join(ACTIONS)}, step: a whole "
                "number (e.g. spike@12)."
            )
        if len(args) != SLOWDOWN_ARGS.get(action, 0):
            raise OrchError(
                f"{VARIABLE}={text!r}: {item!r} has {len(args)} argument(s) after the step; allowed: none for "
                f"{', '.join(a for a in ACTIONS if a not in SLOWDOWN_ARGS)}, slow@N:TARGET:SECONDS, "
                "hiccup@N:TARGET:SECONDS:STEPS (TARGET: host=NAME or rank=K)."
            )
        found.append((action, int(step), args))
    return found


def slowdown(text: str, step: int, args: list[str]) -> Slowdown:
    """One slowdown from its arguments, each in range, or one paragraph saying which is not."""
    target, seconds, *steps = args
    kind, _, name = target.partition("=")
    try:
        value = float(seconds)
        count = int(steps[0]) if steps else None
        rank = int(name) if kind == "rank" else None
    except ValueError:
        value, count, rank = float("nan"), None, None
    problems = [
        kind not in ("host", "rank") or not name or (kind == "rank" and (rank is None or rank < 0)),
        not 0 < value <= MAX_DELAY_S,
        bool(steps) and (count is None or count < 1),
    ]
    if any(problems):
        raise OrchError(
            f"{VARIABLE}={text!r}: {':'.join(args)!r} after step {step} is out of range; allowed: TARGET host=NAME "
            f"or rank=K (K a whole number from 0), SECONDS a number above 0 and at most {MAX_DELAY_S:.0f}, and for "
            "hiccup STEPS a whole number from 1 (e.g. slow@5:host=orch-n2:0.5, hiccup@5:rank=1:0.5:3)."
        )
    return Slowdown(step, name if kind == "host" else None, rank, value, count)


def slowdowns() -> list[Slowdown]:
    """The slowdowns ORCH_CHAOS plants."""
    text = os.environ.get(VARIABLE, "")
    return [slowdown(text, step, args) for action, step, args in items() if action in SLOWDOWN_ARGS]


def planned() -> dict[str, frozenset[int]]:
    """The steps at which ORCH_CHAOS plants each action (every argument checked)."""
    slowdowns()
    steps: dict[str, set[int]] = {}
    for action, step, _ in items():
        steps.setdefault(action, set()).add(step)
    return {action: frozenset(found) for action, found in steps.items()}


def planted(action: str, step: int) -> bool:
    """Whether ORCH_CHAOS plants `action` at `step`."""
    return step in planned().get(action, frozenset())
