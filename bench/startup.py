"""Where a job's start-up goes, part by part, measured on the local profile's ranks (2, CPU, gloo).

Usage: python -m bench.startup [--folder DIR]

Each part in fresh processes, as a new allocation meets it (the page cache is warm: the files were read before):
- imports: `python -c "import jobs.train"`, the interpreter included (torch, transformers, accelerate);
- process group: `jobs.distributed.start_process_group` on 2 ranks (accelerate's PartialState, gloo);
- model build: `jobs.train.Trainer` (data opened, model built and sharded, optimizer);
- checkpoint verify: rank 0's `checkpoints.damage` of the checkpoint it loads (every file's SHA-256 against the
  manifest), then checkpoint load: `Checkpointer.load` on every rank;
- compile: the first step compiled minus the second, with empty compile caches and again in new processes with the
  caches the first left (TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR under the folder, as a job sets them in its
  run's `cache/`).
For the tiny recipe and the 56M model of bench.checkpoint_stall; the planner's parts (orchestrator.core.plan.
startup_parts) take their measured figures from here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from bench.checkpoint_stall import LARGER_MODEL
from jobs.checkpoint import Checkpointer
from jobs.distributed import Ranks, free_port, launch, start_process_group
from jobs.train import Trainer
from orchestrator.core import checkpoints
from orchestrator.core.config import CheckpointSpec, Recipe
from orchestrator.core.estimate import parameter_count
from orchestrator.core.loading import load_profile, load_recipe, merge_all, validate
from orchestrator.core.plan import batching
from orchestrator.tools.run_data import attach_data

WORLD = 2


def imports_s() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import jobs.train"], check=True)
    return time.perf_counter() - started


def group_rank(rank: int, port: int, output: Path) -> None:
    """Only the rendezvous and the group's start; rank 0 writes how long they took."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))  # fmt: skip
    started = time.perf_counter()
    start_process_group("cpu", "gloo")
    if rank == 0:
        output.write_text(json.dumps(time.perf_counter() - started))


def process_group_s(folder: Path) -> float:
    output = folder / "group.json"
    mp.spawn(group_rank, args=(free_port(), output), nprocs=WORLD, join=True)
    return json.loads(output.read_text())


def parts_rank(ranks: Ranks, recipe: Recipe, data_dir: Path, root: Path, output: Path) -> None:
    """Build, two steps, and (where `root` holds no checkpoint yet) a save; else verify and load it."""
    times: dict[str, float] = {}
    started = time.perf_counter()
    trainer = Trainer(recipe, batching(recipe.train, ranks.world), data_dir, ranks)
    times["model_build_s"] = time.perf_counter() - started
    for step in range(2):
        started = time.perf_counter()
        trainer.step(step)
        times[f"step_{step}_s"] = time.perf_counter() - started
    checkpointer = Checkpointer(root, CheckpointSpec(every_steps=1, async_save=False))
    if not checkpoints.committed_steps(root):
        train_state = {"scheduler": trainer.scheduler.state_dict(), "world_size": ranks.world}
        checkpointer.save(2, trainer.model, trainer.optimizer, train_state)
    else:
        started = time.perf_counter()
        step, problems = checkpointer.choose()
        times["checkpoint_verify_s"] = time.perf_counter() - started
        assert step is not None, problems
        started = time.perf_counter()
        checkpointer.load(step, trainer.model, trainer.optimizer)
        times["checkpoint_load_s"] = time.perf_counter() - started
    checkpointer.close()
    if ranks.rank == 0:
        output.write_text(json.dumps(times))


def parts(recipe: Recipe, data_dir: Path, root: Path, output: Path) -> dict[str, float]:
    launch(WORLD, "cpu", "gloo", parts_rank, recipe, data_dir, root, output)
    return json.loads(output.read_text())


def measure(name: str, recipe: Recipe, data_dir: Path, folder: Path) -> dict[str, Any]:
    """Eager: a first start saves, a second verifies and loads. Compiled: cold caches, then warm ones."""
    work = folder / name
    work.mkdir()
    os.environ.update(TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"), TRITON_CACHE_DIR=str(work / "triton"))
    parts(recipe, data_dir, work / "checkpoints", work / "save.json")
    eager = parts(recipe, data_dir, work / "checkpoints", work / "eager.json")
    compiled = recipe.model_copy(update={"train": recipe.train.model_copy(update={"compile": True})})
    cold, warm = (parts(compiled, data_dir, work / f"none-{kind}", work / f"{kind}.json") for kind in ("cold", "warm"))
    return {
        "parameters": sum(parameter_count(recipe.model).values()),
        "checkpoint_bytes": sum(p.stat().st_size for p in (work / "checkpoints").rglob("*") if p.is_file()),
        "model_build_s": eager["model_build_s"],
        "checkpoint_verify_s": eager["checkpoint_verify_s"],
        "checkpoint_load_s": eager["checkpoint_load_s"],
        "eager_step_s": eager["step_1_s"],
        "compile_cold_s": cold["step_0_s"] - cold["step_1_s"],
        "compile_warm_s": warm["step_0_s"] - warm["step_1_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=None, help="where to write data, checkpoints and caches")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="startup-"))
    _, profile = load_profile("local")
    os.environ.update(profile.env_vars)
    path, tiny = load_recipe("tiny")
    larger = validate(path, Recipe, merge_all(tiny.model_dump(), [LARGER_MODEL]))
    data_dir = folder / "data"
    attach_data(tiny.data, tiny.model.vocab_size, tiny.train.seed, data_dir)
    print(f"imports: {imports_s():.2f} s; process group ({WORLD} ranks, gloo): {process_group_s(folder):.2f} s")
    for name, recipe in (("tiny", tiny), ("56M", larger)):
        result = measure(name, recipe, data_dir, folder)
        print(f"{name}: {json.dumps({k: round(v, 3) for k, v in result.items()})}")
        gigabytes = result["checkpoint_bytes"] / 1e9
        print(f"  verify {gigabytes / result['checkpoint_verify_s']:.2f} GB/s, load "
              f"{gigabytes / result['checkpoint_load_s']:.2f} GB/s (both ranks' shares)")  # fmt: skip


if __name__ == "__main__":
    main()
