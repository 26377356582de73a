"""Fault injection for tests: `ORCH_CHAOS` plants faults at given steps of a job.

`ORCH_CHAOS` is a comma-separated list of `action@step` (e.g. `spike@12`); each action is a small function of this
module, listed in ACTIONS with what its step means. A job reads the variable from its environment (`orch submit`
passes its own to a local job; under Slurm, sbatch exports it), so a test plants a fault without any change to the
run. Unset, nothing happens.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

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


ACTIONS: dict[str, Callable[..., object]] = {"spike": spike, "fail": fail, "fail-always": fail, "sigkill": fail}


def planned() -> dict[str, frozenset[int]]:
    """The steps at which ORCH_CHAOS plants each action."""
    text = os.environ.get(VARIABLE, "")
    steps: dict[str, set[int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        action, _, step = item.partition("@")
        if action not in ACTIONS or not step.isdigit():
            raise OrchError(
                f"{VARIABLE}={text!r}: {item!r} is not action@step; actions: {', '.join(ACTIONS)}, step: a whole "
                "number (e.g. spike@12)."
            )
        steps.setdefault(action, set()).add(int(step))
    return {action: frozenset(found) for action, found in steps.items()}


def planted(action: str, step: int) -> bool:
    """Whether ORCH_CHAOS plants `action` at `step`."""
    return step in planned().get(action, frozenset())
