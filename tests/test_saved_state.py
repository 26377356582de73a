"""What a checkpoint restores besides the shards (jobs/state.py, jobs.data.DataPosition): each object's state_dict
loads back into a fresh one, train_state.json keeps its layout, older layouts still load, and a data position that
cannot continue the run's order is refused."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.stateful import Stateful

from jobs.data import BlockLoader, DataPosition, GlobalOrder
from jobs.state import RngState, SavedState, TrainState
from orchestrator.core.errors import OrchError
from orchestrator.core.plan import Batching

ORDER = GlobalOrder(37, Batching.of(8, 2, 2), seed=3)


def saved_state(order: GlobalOrder = ORDER, mlflow_run_id: str | None = "run-a", recipe_hash: str = "h1") -> SavedState:
    """A job's state before any resume: step 0, its own world size and recipe, a scheduler of its own."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    loader = BlockLoader(None, order, rank=0, device=torch.device("cpu"))
    return SavedState(TrainState(0, 4, recipe_hash, mlflow_run_id), DataPosition(loader), scheduler)


def trained(state: SavedState, steps: int) -> SavedState:
    for _ in range(steps):
        state.scheduler.optimizer.step()
        state.scheduler.step()
        state.advance()
    return state


def test_every_object_a_checkpoint_restores_is_a_torch_stateful():
    state = saved_state()
    assert all(isinstance(s, Stateful) for s in (state, state.train, state.data, state.scheduler, RngState()))


def test_a_saved_state_loads_into_a_fresh_job_which_keeps_its_own_world_size_and_recipe(
    caplog: pytest.LogCaptureFixture,
):
    saved = json.loads(json.dumps(trained(saved_state(), 5).state_dict()))  # through train_state.json's JSON
    resumed = saved_state(mlflow_run_id=None, recipe_hash="h2")
    resumed.train.world_size = 2
    with caplog.at_level(logging.INFO, "jobs.state"):
        resumed.load_state_dict(saved)
    assert resumed.train == TrainState(5, 2, "h2", "run-a")
    assert resumed.data.state_dict() == {"samples_consumed": 40, "seed": 3, "samples_skipped": 0}
    assert resumed.scheduler.get_last_lr() == [0.25] and resumed.scheduler.last_epoch == 5
    assert "the recipe changed since the checkpoint at step 5" in caplog.text
    assert "saved by 4 ranks, now 2" in caplog.text
    assert resumed.state_dict() == saved | {"world_size": 2, "recipe_hash": "h2"}


def test_train_state_json_keeps_its_key_order_and_bytes():
    saved = trained(saved_state(replace(ORDER, skipped=((1, 3),))), 2).state_dict()
    scheduler = saved.pop("scheduler")
    assert json.dumps(saved) == (
        '{"step": 2, "samples_consumed": 16, "seed": 3, "world_size": 4, "recipe_hash": "h1", '
        '"mlflow_run_id": "run-a", "samples_skipped": 16}'
    )
    assert scheduler["last_epoch"] == 2


def test_a_checkpoint_of_the_older_layout_with_the_data_position_under_data_loads():
    older = {
        "step": 3,
        "data": {"samples_consumed": 24, "seed": 3},
        "world_size": 4,
        "recipe_hash": "h1",
        "mlflow_run_id": None,
        "scheduler": trained(saved_state(), 3).scheduler.state_dict(),
    }
    resumed = saved_state()
    resumed.load_state_dict(older)
    assert resumed.train.step == 3 and resumed.train.mlflow_run_id is None
    assert resumed.data.state_dict() == {"samples_consumed": 24, "seed": 3, "samples_skipped": 0}


@pytest.mark.parametrize(
    ("order", "says"),
    [
        (GlobalOrder(37, Batching.of(8, 2, 2), seed=4), "saved with seed 3 after 24 samples; this run has seed 4"),
        (GlobalOrder(37, Batching.of(16, 2, 2), seed=3), "this run has seed 3 and 16 samples per step"),
        (
            GlobalOrder(37, Batching.of(8, 2, 2), seed=3, skipped=((0, 1),)),
            "saved after skipping 0 samples of the data order",
        ),
    ],
)
def test_a_data_position_this_run_cannot_continue_is_refused_before_the_step_and_schedule_are_restored(
    order: GlobalOrder, says: str
):
    saved = trained(saved_state(), 3).state_dict()
    resumed = saved_state(order)
    with pytest.raises(OrchError, match=says):
        resumed.load_state_dict(saved)
    assert resumed.train.step == 0 and resumed.scheduler.last_epoch == 0


def test_the_rng_state_loads_back_the_draws_that_followed_it():
    rng = RngState()
    saved = rng.state_dict()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    rng.load_state_dict(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_a_fresh_train_state_hashes_the_recipe_file(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {}\n")
    fresh = TrainState.fresh(recipe, 4, None)
    assert (fresh.step, fresh.world_size, len(fresh.recipe_hash)) == (0, 4, 64)
