"""How long training stalls per checkpoint, async against sync saves, and how fast checkpoints reach the disk.

Usage: python -m bench.checkpoint_stall [--saves 4] [--steps-between 3] [--folder DIR]

On the local profile's ranks (2, gloo, OMP_NUM_THREADS=1) and two models: the tiny recipe, and the tiny recipe with a
larger model (hidden 512, 8 layers, vocabulary 32000: 56M parameters, 450 MB of fp32 weights and Lion state) where
the write takes long enough to matter. Each model trains with one `jobs.checkpoint.Checkpointer` of each kind and
saves alternately (async, sync, async, ...), a few training steps apart, with the set-up's objects out of the garbage
collector's way as in a job (`jobs.train.frozen_heap`). Per save, on rank 0:
- stall: from calling `save()` until it returns (the previous save is finished first; that wait is reported apart,
  as the part of an async write the steps in between did not hide);
- commit: from calling `save()` until the checkpoint is committed (renamed, with its manifest);
- write rate: the committed checkpoint's bytes / commit time, against the disk's own sequential rate from
  `dd if=/dev/zero of=FOLDER/ddtest bs=1M count=N oflag=direct` in the same folder, N MiB being the checkpoint's size
  (the median of 3, right after the model's saves: dd's rate moves with what else the disk does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.checkpoint import Checkpointer
from jobs.distributed import Ranks, launch
from jobs.train import Trainer, frozen_heap
from orchestrator.core.checkpoints import step_dir
from orchestrator.core.config import CheckpointSpec, Recipe
from orchestrator.core.estimate import parameter_count
from orchestrator.core.loading import load_profile, load_recipe, merge_all, validate
from orchestrator.core.plan import batching
from orchestrator.tools.run_data import attach_data

LARGER_MODEL = {
    "model": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 4,
        "vocab_size": 32000,
    },
    "train": {"global_batch_size": 2, "micro_batch_size": 1},
}


def disk_rate(folder: Path, size: int) -> float:
    """Bytes per second of sequential writes of `size` bytes (to the MiB) that reach the disk (direct I/O, else
    flushed at the end): the median of 3."""
    return statistics.median(dd_rate(folder, max(1, round(size / 2**20))) for _ in range(3))


def dd_rate(folder: Path, megabytes: int) -> float:
    target = folder / "ddtest"
    for flag in ("oflag=direct", "conv=fdatasync"):
        started = time.perf_counter()
        done = subprocess.run(
            ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={megabytes}", flag], capture_output=True
        )
        elapsed = time.perf_counter() - started
        target.unlink(missing_ok=True)
        if done.returncode == 0:
            return megabytes * 2**20 / elapsed
    raise RuntimeError(f"dd could not write to {folder}: {done.stderr.decode()}")


def stall_rank(
    ranks: Ranks,
    recipe: Recipe,
    data_dir: Path,
    folder: Path,
    saves: int,
    steps_between: int,
    output: Path,
) -> None:
    """Train, saving with each kind in turn; rank 0 writes each save's wait, stall and commit times."""
    trainer = Trainer(recipe, batching(recipe.train, ranks.world), data_dir, ranks)
    specs = {kind: CheckpointSpec(every_steps=steps_between, async_save=kind == "async") for kind in ("async", "sync")}
    checkpointers = {kind: Checkpointer(folder / kind, spec) for kind, spec in specs.items()}
    with frozen_heap():
        records = save_alternately(trainer, checkpointers, saves, steps_between)
    for checkpointer in checkpointers.values():
        checkpointer.close()
    if ranks.rank == 0:
        sizes = {kind: folder_bytes(step_dir(folder / kind, c.committed)) for kind, c in checkpointers.items()}
        output.write_text(json.dumps({"records": records, "bytes": sizes}))


def save_alternately(
    trainer: Trainer, checkpointers: dict[str, Checkpointer], saves: int, steps_between: int
) -> dict[str, list[dict[str, float]]]:
    """Each checkpointer saves in turn, `steps_between` training steps apart; per save its wait, stall and commit."""
    records: dict[str, list[dict[str, float]]] = {kind: [] for kind in checkpointers}
    step = 0
    for _ in range(saves):
        for kind, checkpointer in checkpointers.items():
            for _ in range(steps_between):
                trainer.step(step)
                step += 1
            started = time.perf_counter()
            for each in checkpointers.values():
                each.wait()
            called = time.perf_counter()
            train_state = {"scheduler": trainer.scheduler.state_dict(), "world_size": trainer.ranks.world}
            checkpointer.save(step, trainer.model, trainer.optimizer, train_state)
            record = {"wait_s": called - started, "stall_s": time.perf_counter() - called, "called": called}
            if checkpointer.pending is None:
                record["commit_s"] = record["stall_s"]
            else:
                checkpointer.pending.add_done_callback(
                    lambda _, record=record: record.update(commit_s=time.perf_counter() - record["called"])
                )
            records[kind].append(record)
    return records


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def measure(recipe: Recipe, data_dir: Path, folder: Path, saves: int, steps_between: int) -> dict[str, Any]:
    _, profile = load_profile("local")
    os.environ.update(profile.env_vars)
    output = folder / "stall.json"
    launch(
        profile.world_size,
        profile.launch.device,
        profile.launch.backend,
        stall_rank,
        recipe,
        data_dir,
        folder,
        saves,
        steps_between,
        output,
    )
    return json.loads(output.read_text())


def report(name: str, parameters: int, result: dict[str, Any], disk: float) -> None:
    print(f"\n{name}: {parameters / 1e6:.1f}M parameters; dd of the checkpoint's size: {disk / 1e6:.0f} MB/s")
    header = ("saves", "stall ms", "max ms", "wait ms", "commit s", "MB", "MB/s", "of dd")
    print("save  " + "".join(f"{title:>9}" for title in header))
    for kind, records in result["records"].items():
        stalls = [r["stall_s"] * 1e3 for r in records]
        commit = statistics.mean(r["commit_s"] for r in records)
        size = result["bytes"][kind]
        print(
            f"{kind:<6}{len(records):>9}{statistics.mean(stalls):>9.1f}{max(stalls):>9.1f}"
            f"{statistics.mean(r['wait_s'] for r in records) * 1e3:>9.1f}{commit:>9.2f}{size / 1e6:>9.1f}"
            f"{size / commit / 1e6:>9.1f}{size / commit / disk:>9.0%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=4, help="saves of each kind per model")
    parser.add_argument("--steps-between", type=int, default=3, help="training steps before each save")
    parser.add_argument("--folder", type=Path, default=None, help="where checkpoints (and dd's file) are written")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="orch-ckpt-"))
    folder.mkdir(parents=True, exist_ok=True)
    path, tiny = load_recipe("tiny")
    data_dir = folder / "data"
    attach_data(tiny.data, tiny.model.vocab_size, tiny.train.seed, data_dir)
    larger = validate(path, Recipe, merge_all(tiny.model_dump(), [LARGER_MODEL]))
    print(f"checkpoints and dd's file in {folder}")
    for name, recipe in (("tiny", tiny), ("larger", larger)):
        work = folder / name
        result = measure(recipe, data_dir, work, args.saves, args.steps_between)
        disk = disk_rate(folder, max(result["bytes"].values()))
        report(name, sum(parameter_count(recipe.model).values()), result, disk)
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
