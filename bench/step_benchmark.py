"""Training steps without a run around them: what `orch bench` times, and the reference loop of the other benchmarks.

`Trainer` builds one rank's model, optimizer, schedule and data from jobs/ as jobs/train.py does, and its `step` is
the job's own `train_step` without tracking, heartbeat, stop flag, evaluation or checkpoints around it. `launch` runs
a function on every rank of a fresh process group: in this process for one rank, else in spawned processes.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.data import BlockLoader, GlobalOrder, load_blocks, prepare_data
from jobs.model import attention_implementation, build_sharded_model
from jobs.optim import build_optimizer, build_scheduler
from jobs.train import train_step
from orchestrator.config import Profile, Recipe
from orchestrator.errors import OrchError
from orchestrator.estimate import peak_memory_gb
from orchestrator.plan import gradient_accumulation


@dataclass(frozen=True)
class Ranks:
    """Where the ranks run."""

    world: int
    device: str  # "cpu" or "cuda"
    backend: str  # "gloo" or "nccl"


def available_ranks(profile: Profile, requested: int | None = None) -> Ranks:
    """One rank per GPU (NCCL) where GPUs are present, else the profile's ranks on CPU with its backend."""
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if requested and requested > gpus:
            raise OrchError(f"--ranks {requested}: this machine has {gpus} GPUs. Allowed: 1 to {gpus}.")
        return Ranks(requested or gpus, "cuda", "nccl")
    if profile.launch.device == "cuda":
        raise OrchError(
            f"The profile runs on GPUs ({profile.node.gpu_model}) and this machine has none. "
            "Allowed here: a CPU profile such as 'local'."
        )
    return Ranks(requested or profile.world_size, "cpu", profile.launch.backend)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: Ranks, fn: Callable[..., None], *args: Any) -> None:
    """Call fn(rank, world, device, *args) on every rank inside an initialised process group.

    The rendezvous variables are gone afterwards: a job started from this process later (submitit) sets its own."""
    saved = {name: os.environ.get(name) for name in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        if ranks.world == 1:
            rank_main(0, ranks, fn, args)
        else:
            mp.spawn(rank_main, args=(ranks, fn, args), nprocs=ranks.world, join=True)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def rank_main(rank: int, ranks: Ranks, fn: Callable[..., None], args: tuple) -> None:
    device = torch.device(ranks.device, rank) if ranks.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" in os.environ:  # a rank in this process started torch before the profile's setting
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dist.init_process_group(
        ranks.backend, rank=rank, world_size=ranks.world, device_id=device if device.type == "cuda" else None
    )
    try:
        fn(rank, ranks.world, device, *args)
    finally:
        dist.destroy_process_group()


def prepare(recipe: Recipe, data_dir: Path) -> dict[str, Any]:
    """The recipe's data in `data_dir` (prepared once, as a job's rank 0 does); returns the train split's index."""
    prepare_data(recipe.data, recipe.model.vocab_size, recipe.train.seed, data_dir)
    return load_blocks(data_dir).index


class Trainer:
    """One rank's training state as jobs/train.py builds it, and its step without any run machinery."""

    def __init__(self, recipe: Recipe, data_dir: Path, rank: int, world: int, device: torch.device) -> None:
        train = recipe.train
        self.recipe, self.device = recipe, device
        self.grad_accum = gradient_accumulation(train.global_batch_size, train.micro_batch_size, world)
        torch.manual_seed(train.seed)
        blocks = load_blocks(data_dir)
        order = GlobalOrder(len(blocks), train.global_batch_size, train.micro_batch_size, world, train.seed)
        self.loader = BlockLoader(blocks, order, rank, device)
        self.attention = attention_implementation(train.attention, device)
        self.model = build_sharded_model(
            recipe.model,
            self.attention,
            train.fsdp,
            train.precision,
            device,
            recompute=train.activation_checkpointing,
            compile=train.compile,
        )
        self.optimizer = build_optimizer(self.model.parameters(), recipe.optimizer)
        self.scheduler = build_scheduler(self.optimizer, recipe.schedule)

    def step(self, step: int) -> tuple[float, float]:
        """jobs.train.train_step: returns the loss averaged over ranks and the seconds spent waiting for data."""
        loss, _, _, data_wait = train_step(
            self.model, self.optimizer, self.scheduler, self.loader, step, self.grad_accum, self.recipe.train.grad_clip
        )
        return loss, data_wait


def measure(recipe: Recipe, data_dir: Path, rank: int, world: int, device: torch.device, steps: int, warmup: int):
    """Median step time, data-wait fraction and peak memory of `steps` steps after `warmup` untimed ones."""
    trainer = Trainer(recipe, data_dir, rank, world, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, waits, loss = [], [], float("nan")
    for step in range(warmup + steps):
        started = time.perf_counter()
        loss, data_wait = trainer.step(step)  # its loss.item() waits for the device
        if step >= warmup:
            times.append(time.perf_counter() - started)
            waits.append(data_wait)
    tokens_per_rank = recipe.train.global_batch_size * recipe.data.max_seq_len / world
    return {
        "attention": trainer.attention,
        "micro_batch": recipe.train.micro_batch_size,
        "grad_accum": trainer.grad_accum,
        "step_s": statistics.median(times),
        "tokens_per_s_per_rank": tokens_per_rank / statistics.median(times),
        "data_wait_fraction": sum(waits) / sum(times),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None,
        "loss": loss,
    }


def describe(result: dict[str, Any]) -> str:
    if "error" in result:
        return result["error"]
    return f"{result['step_s']:.3f} s per step, {result['tokens_per_s_per_rank']:,.0f} tokens/s per rank"


def benchmark_rank(
    rank: int,
    world: int,
    device: torch.device,
    variants: list[tuple[str, Recipe]],
    data_dir: Path,
    steps: int,
    warmup: int,
    output: Path,
) -> None:
    """Every variant in turn on this rank; rank 0 prints a line per variant and writes the results to `output`."""
    results = []
    for name, recipe in variants:
        try:
            result = measure(recipe, data_dir, rank, world, device, steps, warmup)
        except Exception as err:  # on one rank nobody waits for this one: note it and go on with the next variant
            if world > 1:
                raise
            traceback.print_exc()
            result = {"error": "out of memory" if isinstance(err, torch.OutOfMemoryError) else type(err).__name__}
        result.update(variant=name, estimate_gb=peak_memory_gb(recipe, world))
        results.append(result)
        gc.collect()
        torch.compiler.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            print(f"{name}: {describe(result)}", flush=True)
    if rank == 0:
        output.write_text(json.dumps(results))


def run_benchmark(
    variants: list[tuple[str, Recipe]], ranks: Ranks, steps: int, warmup: int, data_dir: Path | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Prepare the data once (in `data_dir`, else a temporary folder), time every variant; returns (index, results)."""
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as scratch:
        data_dir = data_dir or Path(scratch) / "data"
        index = prepare(variants[0][1], data_dir)
        output = Path(scratch) / "results.json"
        launch(ranks, benchmark_rank, variants, data_dir, steps, warmup, output)
        return index, json.loads(output.read_text())
