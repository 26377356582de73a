"""What a checkpoint restores besides the model and optimizer shards, as torch.distributed.checkpoint `Stateful`
objects (`state_dict()` / `load_state_dict()`, as torchtitan keeps its TrainState): the train state here, the data
position (`jobs.data.DataPosition`), the learning-rate schedule (torch's schedulers are Stateful already) and each
rank's RNG (`RngState`). A save asks each object for its state and a load hands each its own back, in one place
(`SavedState`), so that nothing a checkpoint holds is gathered or restored on the side.

`train_state.json` (rank 0 writes it, every rank reads it) keeps the layout checkpoints have always had: the train
state's and the data position's keys side by side at the top level, in `LAYOUT` order, and the schedule's state under
"scheduler". Older checkpoints kept the data position under "data"; they are read alike.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

if TYPE_CHECKING:
    from jobs.data import DataPosition

log = logging.getLogger(__name__)

LAYOUT = ("step", "samples_consumed", "seed", "world_size", "recipe_hash", "mlflow_run_id", "samples_skipped")


@dataclass
class TrainState(Stateful):
    """Where training stands: the steps done, the MLflow run it reports to, and the recipe's hash and world size of
    the job (a checkpoint records those that saved it; a resumed job keeps its own)."""

    step: int
    world_size: int
    recipe_hash: str
    mlflow_run_id: str | None

    @classmethod
    def fresh(cls, recipe_file: Path, world_size: int, mlflow_run_id: str | None) -> TrainState:
        return cls(0, world_size, hashlib.sha256(recipe_file.read_bytes()).hexdigest(), mlflow_run_id)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from the saved step and MLflow run; a changed recipe or MLflow run is reported."""
        step, saved_run = state_dict["step"], state_dict.get("mlflow_run_id")
        if state_dict["recipe_hash"] != self.recipe_hash:
            log.warning("the recipe changed since the checkpoint at step %d was saved", step)
        if self.mlflow_run_id and saved_run and saved_run != self.mlflow_run_id:
            log.warning(
                "the checkpoint at step %d reported to MLflow run %s, the run directory names %s",
                step, saved_run, self.mlflow_run_id,
            )  # fmt: skip
        log.info(
            "resumed from the checkpoint at step %d (saved by %d ranks, now %d)",
            step, state_dict["world_size"], self.world_size,
        )  # fmt: skip
        self.step, self.mlflow_run_id = step, saved_run


class RngState(Stateful):
    """This rank's random number generators: torch's (and CUDA's where there is one), numpy's and Python's."""

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        np.random.set_state(state_dict["numpy"])
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


@dataclass
class SavedState(Stateful):
    """What `train_state.json` holds, by the objects that hold it: saved together, restored together."""

    train: TrainState
    data: DataPosition
    scheduler: Stateful

    def state_dict(self) -> dict[str, Any]:
        flat = {**self.train.state_dict(), **self.data.state_dict()}
        return {key: flat[key] for key in LAYOUT} | {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The data position is checked first: a checkpoint whose data order this run cannot continue restores
        nothing."""
        flat = {**state_dict.get("data", {}), **state_dict}  # older checkpoints kept the data position under "data"
        self.data.load_state_dict({key: flat[key] for key in self.data.state_dict() if key in flat})
        self.data.check(state_dict["step"])
        self.train.load_state_dict({key: state_dict.get(key) for key in self.train.state_dict()})
        self.scheduler.load_state_dict(state_dict["scheduler"])

    def advance(self) -> None:
        """One more training step is done."""
        self.train.step += 1
        self.data.advance(self.train.step)
