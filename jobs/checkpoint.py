"""Sharded checkpoints with torch.distributed.checkpoint: each rank writes its own shard.

A checkpoint is written into a hidden `.step_N.partial` folder and only renamed to `step_N` once every
rank has written and rank 0 has added `train_state.json`; `latest` then names it. A folder without that
rename never counts, so a job killed mid-save leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from orchestrator.runs import write_json_atomic


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save(
    root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
) -> None:
    """Collective: every rank calls it at the same step."""
    final, partial = step_dir(root, step), root / f".step_{step:08d}.partial"
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=partial)
    dist.barrier()
    if dist.get_rank() == 0:
        (partial / "train_state.json").write_text(json.dumps({"step": step, **extra}))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        write_json_atomic(root / "latest.json", {"step": step, "dir": final.name})
    dist.barrier()


def latest_step(root: Path) -> int | None:
    pointer = root / "latest.json"
    return json.loads(pointer.read_text())["step"] if pointer.is_file() else None


def load(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer shards in place (any world size); returns the train state saved with them."""
    path = step_dir(root, step)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return json.loads((path / "train_state.json").read_text())
