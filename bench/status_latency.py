"""`orch status` latency with many runs in ORCH_HOME (a benchmark, not a test).

Creates N run directories shaped like real ones (half completed, half running under a Slurm job id that the
scheduler no longer knows, so `squeue` is asked once for all of them), then times the real command, with the
finished runs' summaries cached (`runs/.status-cache.json`, made by the untimed first round) and once more without.
Each row is compared with `python -c "import submitit"` timed in the same invocation (machines are noisy); with
--candidate, the same commands of another checkout (e.g. `git worktree add /tmp/before HEAD`) are timed too. Every
command runs once per round, in turn, so that load from elsewhere falls on all alike.
Usage: python bench/status_latency.py [--runs 1000] [--repeat 7] [--candidate CHECKOUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.core.status_cache import CACHE

ROOT = Path(__file__).resolve().parent.parent


def make_runs(home: Path, count: int) -> None:
    for i in range(count):
        run_dir = home / "runs" / f"tiny-20261127-{i:06d}-abcd"
        run_dir.mkdir(parents=True)
        running = i % 2 == 1
        files = {
            "run.json": {
                "run_id": run_dir.name,
                "created": time.time() + i,
                "profile": "karolina",
                "recipe": "tiny",
                "steps": 200000,
                "tracking_uri": "sqlite:///x.db",
                "stop_before_end_s": 330,
            },
            "jobs.json": [{"job_id": str(900000 + i), "executor": "slurm" if running else "local", "submitted": 0}],
            "progress.json": {
                "state": "running" if running else "completed",
                "step": 1234,
                "steps": 200000,
                "job_id": str(900000 + i),
                "loss": 2.5,
                "tokens_per_s": 290000.0,
                "step_time_s": 3.6,
                "last_checkpoint_step": 1000,
                "updated": time.time(),
            },
            "attempts.json": [{"job_id": str(900000 + i), "start_step": 0, "started": time.time() - 3600, "nodes": 2}],
            "mlflow.json": {"run_id": "0" * 32, "sent_through": 1000},
        }
        for name, data in files.items():
            (run_dir / name).write_text(json.dumps(data))


COMMANDS = (["--help"], ["status"], ["status", "--json"], ["ls"])
UNCACHED = " (no status cache)"  # the row of `orch status` with the finished runs' summaries made anew each time


def time_once(args: list[str], env: dict[str, str], cwd: Path, uncached: bool = False) -> float:
    if uncached:
        (Path(env["ORCH_HOME"]) / "runs" / CACHE).unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--candidate", type=Path, default=None, help="another checkout of orch, timed alike")
    options = parser.parse_args()
    checkouts = {"": ROOT} | ({" (candidate)": options.candidate.resolve()} if options.candidate else {})
    rows = {"python -c 'import submitit'": (["-c", "import submitit"], ROOT)}
    for args in COMMANDS:
        for label, checkout in checkouts.items():
            rows[f"orch {' '.join(args)}{label}"] = (["-m", "orchestrator", *args], checkout)
    rows[f"orch status{UNCACHED}"] = (["-m", "orchestrator", "status"], ROOT)
    times: dict[str, list[float]] = {name: [] for name in rows}
    with tempfile.TemporaryDirectory() as home:
        make_runs(Path(home), options.runs)
        time.sleep(2.5)  # finished runs' files are older than the status cache's window for just-changed files
        env = {**os.environ, "ORCH_HOME": home}
        for name, (args, cwd) in rows.items():  # untimed: a checkout's first run compiles its bytecode
            time_once(args, env, cwd, name.endswith(UNCACHED))
        for _ in range(options.repeat):
            for name, (args, cwd) in rows.items():
                times[name].append(time_once(args, env, cwd, name.endswith(UNCACHED)))
    baseline = statistics.median(times["python -c 'import submitit'"])
    for name, taken in times.items():
        show(name, taken, baseline, options, times.get(name.removesuffix(" (candidate)")))


def show(name: str, times: list[float], baseline: float, options: argparse.Namespace, ours: list[float] | None) -> None:
    """One row: the median, its spread, its ratio to importing submitit measured in the same invocation, and for a
    candidate's row, this checkout's median over the candidate's."""
    median = statistics.median(times)
    versus = f"; this checkout / candidate {statistics.median(ours) / median:.2f}" if "(candidate)" in name else ""
    print(
        f"{name:40s} {options.runs} runs: median {median:.3f} s (min {min(times):.3f}, max {max(times):.3f}; "
        f"{median / baseline:.2f}x import submitit; {options.repeat} runs, {os.cpu_count()} cores{versus})"
    )


if __name__ == "__main__":
    main()
