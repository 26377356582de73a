"""Validation loss and perplexity on held-out blocks (the seed's "Test Perplexity")."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from jobs.data import load_val_blocks
from jobs.loss import causal_lm_loss
from orchestrator.core.config import EvalSpec
from orchestrator.core.corpus import cannot_validate

log = logging.getLogger(__name__)


def evaluate(model: torch.nn.Module, blocks, max_blocks: int, micro_batch: int, device: torch.device) -> dict:
    """Mean next-token loss over the first validation blocks, split across ranks by index.

    The count is rounded down to a multiple of ranks × micro batch: every rank runs the same number of
    forward passes, as the sharded model's collectives require."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_pass = world * micro_batch
    count = min(max_blocks, len(blocks)) // per_pass * per_pass
    if count == 0:
        return {}
    total = torch.zeros((), device=device, dtype=torch.float64)
    with torch.no_grad():
        for first in range(rank * micro_batch, count, per_pass):
            rows = blocks[np.arange(first, first + micro_batch)]
            tokens = torch.from_numpy(rows.astype(np.int64)).to(device)
            total += causal_lm_loss(model, tokens).double() * micro_batch
    dist.all_reduce(total)
    loss = (total / count).item()
    return loss_metrics(loss)


def loss_metrics(loss: float) -> dict[str, float]:
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


class Evaluator:
    """Validation at the recipe's cadence (every `eval.every_steps` and at the last step); nothing without `eval`.

    A mixture's sources are validated each on its own held-out blocks (`val_loss/NAME`: forgetting shows in the
    replayed source's), and `val_loss` is their mean weighted by the recipe's weights."""

    def __init__(
        self, spec: EvalSpec | None, data_dir: Path, micro_batch: int, device: torch.device, weights: dict[str, float]
    ) -> None:
        self.spec, self.micro_batch, self.device, self.weights = spec, micro_batch, device, weights
        self.sources = load_val_blocks(data_dir) if spec else {}
        if spec and dist.get_rank() == 0:
            tokens = {name: blocks.tokens for name, blocks in self.sources.items()}
            max_seq_len = next(iter(self.sources.values())).block_len
            problem = cannot_validate(tokens, spec.blocks, dist.get_world_size(), micro_batch, max_seq_len)
            if problem:
                log.warning(problem)  # once per job: the evaluations that then find no whole pass stay silent

    def maybe_evaluate(self, step: int, last_step: int, model: torch.nn.Module) -> dict:
        if self.spec is None or not (self.spec.due(step) or step == last_step):
            return {}
        if "" in self.sources:
            return evaluate(model, self.sources[""], self.spec.blocks, self.micro_batch, self.device)
        scores = {
            name: evaluate(model, val, self.spec.blocks, self.micro_batch, self.device)
            for name, val in self.sources.items()
        }
        metrics = {f"{key}/{name}": value for name, found in scores.items() for key, value in found.items()}
        losses = {name: found["val_loss"] for name, found in scores.items() if found}
        weights = {name: self.weights[name] for name in losses}
        if losses:
            weights = weights if sum(weights.values()) else dict.fromkeys(losses, 1.0)
            loss = sum(weights[name] * value for name, value in losses.items()) / sum(weights.values())
            metrics.update(loss_metrics(loss))
        return metrics
