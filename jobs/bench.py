"""`orch bench`'s work: the job's `Trainer` with a timer around its steps, on ranks started here.

Nothing else of a run is around it (tracking, heartbeat, stop flag, evaluation, checkpoints), so what it measures
is the training step a submitted run takes.
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jobs.distributed import Ranks, launch
from jobs.train import Trainer
from orchestrator.core.config import Profile, Recipe
from orchestrator.core.errors import OrchError
from orchestrator.core.estimate import peak_memory_gb
from orchestrator.core.plan import batching


@dataclass(frozen=True)
class Placement:
    """Where the benchmark's ranks run."""

    world: int
    device: str  # "cpu" or "cuda"
    backend: str  # "gloo" or "nccl"


def available_ranks(profile: Profile, requested: int | None = None) -> Placement:
    """One rank per GPU (NCCL) where GPUs are present, else the profile's ranks on CPU with its backend."""
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if requested and requested > gpus:
            raise OrchError(f"--ranks {requested}: this machine has {gpus} GPUs. Allowed: 1 to {gpus}.")
        return Placement(requested or gpus, "cuda", "nccl")
    if profile.launch.device == "cuda":
        raise OrchError(
            f"The profile runs on GPUs ({profile.node.gpu_model}) and this machine has none. "
            "Allowed here: a CPU profile such as 'local'."
        )
    return Placement(requested or profile.world_size, "cpu", profile.launch.backend)


def measure(recipe: Recipe, data_dir: Path, ranks: Ranks, steps: int, warmup: int) -> dict[str, Any]:
    """Median step time, data-wait fraction and peak memory of `steps` steps after `warmup` untimed ones."""
    trainer = Trainer(recipe, batching(recipe.train, ranks.world), data_dir, ranks)
    if ranks.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ranks.device)
    times, waits, losses = [], [], []
    for step in range(warmup + steps):
        started = time.perf_counter()
        result = trainer.step(step)  # its loss.item() waits for the device
        if step >= warmup:
            times.append(time.perf_counter() - started)
            waits.append(result.data_wait)
        losses.append(result.loss)
    tokens_per_rank = recipe.train.global_batch_size * recipe.data.max_seq_len / ranks.world
    cuda = ranks.device.type == "cuda"
    return {
        "attention": trainer.attention,
        "micro_batch": recipe.train.micro_batch_size,
        "grad_accum": trainer.grad_accum,
        "step_s": statistics.median(times),
        "tokens_per_s_per_rank": tokens_per_rank / statistics.median(times),
        "data_wait_fraction": sum(waits) / sum(times),
        "peak_memory_gb": torch.cuda.max_memory_allocated(ranks.device) / 1e9 if cuda else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved(ranks.device) / 1e9 if cuda else None,
        "loss": losses[-1],
        "losses": losses,  # every step's, warm-up included: the losses a run on this data trains through
    }


def describe(result: dict[str, Any]) -> str:
    if "error" in result:
        return result["error"]
    return f"{result['step_s']:.3f} s per step, {result['tokens_per_s_per_rank']:,.0f} tokens/s per rank"


def benchmark_rank(
    ranks: Ranks, variants: list[tuple[str, Recipe]], data_dir: Path, steps: int, warmup: int, output: Path
) -> None:
    """Every variant in turn on this rank; rank 0 prints a line per variant and writes the results to `output`."""
    results = []
    for name, recipe in variants:
        try:
            result = measure(recipe, data_dir, ranks, steps, warmup)
        except Exception as err:  # on one rank nobody waits for this one: note it and go on with the next variant
            if ranks.world > 1:
                raise
            traceback.print_exc()
            result = {"error": "out of memory" if isinstance(err, torch.OutOfMemoryError) else type(err).__name__}
        result.update(variant=name, estimate_gb=peak_memory_gb(recipe, ranks.world))
        results.append(result)
        gc.collect()
        torch.compiler.reset()
        if ranks.device.type == "cuda":
            torch.cuda.empty_cache()
        if ranks.rank == 0:
            print(f"{name}: {describe(result)}", flush=True)
    if ranks.rank == 0:
        output.write_text(json.dumps(results))


def run_benchmark(
    variants: list[tuple[str, Recipe]], where: Placement, steps: int, warmup: int, data_dir: Path
) -> list[dict[str, Any]]:
    """Time every variant on the data a run's `data/` folder would hold (`data_dir`); returns one result each."""
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as scratch:
        output = Path(scratch) / "results.json"
        launch(where.world, where.device, where.backend, benchmark_rank, variants, data_dir, steps, warmup, output)
        return json.loads(output.read_text())
