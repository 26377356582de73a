"""What orch's run machinery costs per step: its real job against a minimal loop training the same steps.

Usage: python -m bench.overhead [--steps 60] [--warmup 5] [--rounds 3] [--candidate CHECKOUT] [--set FIELD=VALUE]
                                [--workdir DIR]

All train the tiny recipe (changed by --set) with the local profile's launch (2 ranks, gloo, OMP_NUM_THREADS=1) on
one prepared copy of the demo data:
- orch: `python -m orchestrator submit --profile local --recipe RECIPE --steps N --wait` in a fresh ORCH_HOME, the
  real job with its run directory, MLflow, heartbeat, stop flag, evaluation and checkpoints (every 10 steps);
- candidate (with --candidate): the same, from another checkout of orch (e.g. with a change to jobs/train.py);
- minimal: `jobs.bench.Trainer` on 2 spawned ranks: the same model, FSDP2 sharding, LionW, loss, gradient
  accumulation and blocks in the same order, and nothing else.
They alternate (orch, [candidate,] minimal, orch, ...) so that load from elsewhere falls on all alike. Over the steps
after the warm-up each gives: the median step time (orch's `step_time_s` from metrics.jsonl, which ends before the
step's logging, heartbeat, stop flag and checkpoint), the median time from one step's end to the next one's over
steps without an evaluation or checkpoint (all per-step work), the wall time of the steps (evaluations and
checkpoints included), the CPU time per step of the ranks' main threads and of their other threads (sampled through
psutil: steadier than wall time on a shared machine), and the whole process's wall time (start-up included).
Ratios are to the minimal loop, over all rounds.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil

from jobs.distributed import Ranks, launch
from jobs.train import Trainer
from orchestrator.cli.submit import dump
from orchestrator.core.compat import SUBMITIT_TASK_MODULE
from orchestrator.core.config import PROJECT_ROOT, Recipe
from orchestrator.core.loading import load_profile, load_recipe, merge_all, parse_assignment, validate
from orchestrator.core.plan import batching
from orchestrator.core.schedulers.local import children
from orchestrator.tools.run_data import attach_data

RANK_COMMANDS = (SUBMITIT_TASK_MODULE, "multiprocessing.spawn")  # how orch's and the minimal loop's ranks start


def thread_cpu(process: psutil.Process) -> tuple[float, float]:
    """CPU seconds of a process's main thread and of its other threads."""
    main = other = 0.0
    for thread in process.threads():
        seconds = thread.user_time + thread.system_time
        main, other = (main + seconds, other) if thread.id == process.pid else (main, other + seconds)
    return main, other


def is_rank(process: psutil.Process) -> bool:
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return any(rank_command in command for rank_command in RANK_COMMANDS)


class RankCpu(threading.Thread):
    """Samples the CPU time of the training ranks below `root` every 0.1 s while a contender runs."""

    def __init__(self, root: int, ranks: int) -> None:
        super().__init__(daemon=True)
        self.root, self.ranks, self.stopping = root, ranks, threading.Event()
        self.samples: list[tuple[float, tuple[float, float]]] = []

    def run(self) -> None:
        root, ranks = psutil.Process(self.root), []
        last: dict[int, tuple[float, float]] = {}
        while not self.stopping.wait(0.1):
            if len(ranks) < self.ranks:
                ranks = [process for process in children(root) if is_rank(process)]
            for rank in ranks:
                with suppress(psutil.Error):  # an ended rank keeps its last sample
                    last[rank.pid] = thread_cpu(rank)
            total = tuple(sum(cpu[i] for cpu in last.values()) for i in (0, 1))
            self.samples.append((time.time(), total))

    def stop(self) -> list[tuple[float, tuple[float, float]]]:
        self.stopping.set()
        self.join()
        return self.samples


def prepare_recipe(workdir: Path, assignments: list[str] = ()) -> tuple[Path, Recipe]:
    """The tiny recipe (with FIELD=VALUE changes) reading data prepared once in `workdir/data`, written to
    `workdir/tiny.yaml`."""
    path, recipe = load_recipe("tiny")
    data_dir = workdir / "data"
    attach_data(recipe.data, recipe.model.vocab_size, recipe.train.seed, data_dir)
    prepared = {"data": {"source": str(data_dir), "tokenizer": str(data_dir / "tokenizer")}}
    changes = [parse_assignment(text) for text in assignments] + [prepared]
    recipe = validate(path, Recipe, merge_all(recipe.model_dump(), changes))
    (workdir / "tiny.yaml").write_text(dump(recipe))
    return workdir / "tiny.yaml", recipe


def run_orch(recipe_file: Path, steps: int, home: Path, checkout: Path = PROJECT_ROOT) -> dict[str, Any]:
    """`orch submit --wait` of a checkout in a fresh ORCH_HOME; per step: loss, step_time_s and when it was logged."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update(ORCH_HOME=str(home), PYTHONPATH=str(checkout))
    command = [sys.executable, "-m", "orchestrator", "submit", "--profile", "local", "--recipe", str(recipe_file)]
    started = time.time()
    process = subprocess.Popen(
        [*command, "--steps", str(steps), "--wait"],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sampler = RankCpu(process.pid, 2)
    sampler.start()
    output = process.communicate()[0]
    wall, cpu = time.time() - started, sampler.stop()
    if process.returncode:
        raise RuntimeError(f"orch submit failed:\n{output.decode()}")
    [run_dir] = (home / "runs").iterdir()
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [
        {"step": e["step"], "loss": e["metrics"]["loss"], "step_time_s": e["metrics"]["step_time_s"]} for e in entries
    ]
    for record, entry in zip(records, entries, strict=True):
        record["end"] = entry["time_ms"] / 1000
    return {"records": records, "wall_s": wall, "cpu": cpu}


def minimal_rank(ranks: Ranks, recipe: Recipe, data_dir: Path, steps: int, output: Path) -> None:
    """The training steps and nothing else; rank 0 writes each step's loss, time and end."""
    trainer = Trainer(recipe, batching(recipe.train, ranks.world), data_dir, ranks)
    records = []
    for step in range(steps):
        started = time.perf_counter()
        loss = trainer.step(step).loss
        elapsed = time.perf_counter() - started
        records.append({"step": step + 1, "loss": loss, "step_time_s": elapsed, "end": time.time()})
    if ranks.rank == 0:
        output.write_text(json.dumps(records))


def run_minimal(recipe: Recipe, steps: int, workdir: Path) -> dict[str, Any]:
    """The minimal loop on the local profile's ranks, with its environment (OMP_NUM_THREADS=1)."""
    _, profile = load_profile("local")
    os.environ.update(profile.env_vars)
    output = workdir / "minimal.json"
    started, sampler = time.time(), RankCpu(os.getpid(), profile.world_size)
    sampler.start()
    launch(
        profile.world_size,
        profile.launch.device,
        profile.launch.backend,
        minimal_rank,
        recipe,
        Path(recipe.data.source),
        steps,
        output,
    )
    return {"records": json.loads(output.read_text()), "wall_s": time.time() - started, "cpu": sampler.stop()}


def summary(run: dict[str, Any], warmup: int, recipe: Recipe) -> dict[str, Any]:
    """Step times, step-to-step intervals, wall time and CPU time per step of the steps after the warm-up.

    Intervals that hold an evaluation (orch evaluates before logging a step) or follow a checkpoint are left out.
    CPU time runs from the first sample after the warm-up's last step to the last sample before the final step."""
    records = run["records"]

    def plain(step: int) -> bool:
        evaluated = recipe.eval is not None and recipe.eval.due(step)
        return not evaluated and not recipe.checkpoint.due(step - 1)

    times = [t for t, _ in run["cpu"]]
    first = bisect.bisect_left(times, records[warmup - 1]["end"])
    last = bisect.bisect_right(times, records[-1]["end"]) - 1
    (start, before), (end, after) = run["cpu"][first], run["cpu"][last]
    steps = sum(start <= r["end"] <= end for r in records)
    return {
        "step_times": [r["step_time_s"] for r in records[warmup:]],
        "intervals": [
            records[i]["end"] - records[i - 1]["end"] for i in range(warmup, len(records)) if plain(records[i]["step"])
        ],
        "steps_wall_s": records[-1]["end"] - records[warmup - 1]["end"],
        "cpu_main_s": (after[0] - before[0]) / steps,
        "cpu_other_s": (after[1] - before[1]) / steps,
        "wall_s": run["wall_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the figures (at least 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidate", type=Path, default=None, help="another checkout of orch whose job is timed too")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="change the recipe, e.g. eval=null"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="orch-overhead-"))
    recipe_file, recipe = prepare_recipe(workdir, args.set)
    contenders: dict[str, Callable[[int], dict[str, Any]]] = {
        "orch": lambda i: run_orch(recipe_file, args.steps, workdir / f"orch-home-{i}")
    }
    if args.candidate:
        checkout = args.candidate.resolve()
        contenders["candidate"] = lambda i: run_orch(recipe_file, args.steps, workdir / f"candidate-{i}", checkout)
    contenders["minimal"] = lambda i: run_minimal(recipe, args.steps, workdir)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name, run in contenders.items():
            result = summary(run(round_), args.warmup, recipe)
            runs[name].append(result)
            print(
                f"round {round_ + 1} {name:<9} median step {statistics.median(result['step_times']) * 1e3:6.1f} ms  "
                f"step-to-step {statistics.median(result['intervals']) * 1e3:6.1f} ms  "
                f"steps {result['steps_wall_s']:6.2f} s  CPU/step main {result['cpu_main_s'] * 1e3:5.1f} ms "
                f"other {result['cpu_other_s'] * 1e3:5.1f} ms  process {result['wall_s']:5.1f} s",
                flush=True,
            )
    print_comparison(runs, args)
    print(f"\nworkdir: {workdir}")


def print_comparison(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    """Medians over all rounds' steps (means over rounds for the rest), each contender's ratio to the minimal loop."""
    print(f"\n{args.rounds} rounds of {args.steps} steps; figures over steps {args.warmup + 1}-{args.steps}")
    names = list(runs)
    others = [name for name in names if name != "minimal"]
    print(f"{'':<40}" + "".join(f"{name:>11}" for name in names) + "".join(f"{name + '/min':>15}" for name in others))

    def pooled(key: str) -> Callable[[str], float]:
        return lambda name: statistics.median(t for r in runs[name] for t in r[key]) * 1e3

    def mean(key: str, scale: float = 1.0) -> Callable[[str], float]:
        return lambda name: statistics.mean(r[key] for r in runs[name]) * scale

    rows = [
        ("median step_time_s (ms)", pooled("step_times")),
        ("median step-to-step, plain steps (ms)", pooled("intervals")),
        ("wall of the steps (s)", mean("steps_wall_s")),
        ("CPU per step, ranks' main threads (ms)", mean("cpu_main_s", 1e3)),
        ("CPU per step, other threads (ms)", mean("cpu_other_s", 1e3)),
        ("process wall (s)", mean("wall_s")),
    ]
    for label, value in rows:
        values = {name: value(name) for name in names}
        ratios = "".join(f"{values[name] / values['minimal']:>15.3f}" for name in others)
        print(f"{label:<40}" + "".join(f"{values[name]:>11.2f}" for name in names) + ratios)


if __name__ == "__main__":
    main()
