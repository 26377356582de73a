from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator.core.rundir import TERMINAL_STATES, Run
from orchestrator.core.schedulers.local import descendants

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def orch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "orch-home"
    monkeypatch.setenv("ORCH_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@contextmanager
def module_home(tmp_path_factory: pytest.TempPathFactory, name: str, **env: str) -> Iterator[Path]:
    """An ORCH_HOME for a module's runs (a module-scoped fixture holds it), with `env` set on top."""
    home = tmp_path_factory.mktemp(name) / "orch-home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORCH_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        for variable, value in env.items():
            patch.setenv(variable, value)
        yield home


def orch(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the real `orch` command line in a subprocess, as a user would, with `env` added to this environment."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        cwd=ROOT,
    )


def status_json(run_id: str | None = None) -> dict | list:
    result = orch("status", "--json", *([run_id] if run_id else []))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def slurm_available(starter: str = "envs/slurm-local.sh") -> bool:
    """A local Slurm answering `sinfo` (the one SLURM_CONF names; `starter` starts it). In CI it is required, never
    skipped."""
    try:
        ok = subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        ok = False
    if not ok and os.environ.get("ORCH_REQUIRE_SLURM") == "1":
        pytest.fail(f"ORCH_REQUIRE_SLURM=1 but no Slurm answers: run {starter}")
    return ok


needs_slurm = pytest.mark.skipif(
    "not __import__('tests.conftest').conftest.slurm_available()",
    reason="no local Slurm (run: bash envs/slurm-local.sh)",
)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts filesystems: root only (CI runs as root)")


@contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (as mount takes it: 600k, 16m) mounted at `folder` for the block: a full disk for real."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a job's process may still hold a file


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """`folder` bind-mounted read-only onto itself for the block."""
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(folder: Path, leave: int) -> None:
    """Take all but `leave` bytes of the free space of the filesystem that holds `folder` (in a new file there)."""
    free = os.statvfs(folder)
    fd, _ = tempfile.mkstemp(dir=folder, prefix="filler-")
    with os.fdopen(fd, "wb") as filler:
        filler.write(bytes(max(0, free.f_bavail * free.f_frsize - leave)))


def kill_job_tree(job_id: str) -> None:
    """kill -9 a local job's controller and every training process under it."""
    for pid in [int(job_id), *descendants(int(job_id))]:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def run_dir_of(orch_home: Path, run_id: str) -> Path:
    return orch_home / "runs" / run_id


def wait_until(condition: Callable[[], object], what: str, timeout: float = 180, poll_s: float = 1) -> None:
    until = time.time() + timeout
    while not condition():
        assert time.time() < until, f"timed out waiting for {what}"
        time.sleep(poll_s)


def wait_until_ended(run: Run, timeout: float = 600, poll_s: float = 0.2) -> str:
    """The state that ends the run (read in this process: cheaper to poll than `orch status`)."""
    until = time.time() + timeout
    while (state := run.state()) not in TERMINAL_STATES:
        assert time.time() < until, run.summary()
        time.sleep(poll_s)
    return state


def wait_for_step(run_dir: Path, step: int, timeout: float = 300) -> None:
    """Until the job has finished `step` (its metrics spool gets a line at every step)."""
    spool, until = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < until:
        lines = spool.read_text().splitlines() if spool.is_file() else []
        if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= step:
            return
        time.sleep(0.01)
    raise TimeoutError(f"run never reached step {step}")


def spooled_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    return {e["step"]: e["metrics"]["loss"] for e in entries}


def report_goodput(run_id: str, fault: str, capsys: pytest.CaptureFixture[str], **env: str) -> dict:
    """`orch status RUN` with its goodput table, and one line with what the fault cost, printed into the test output
    whatever pytest captures; returns the `goodput` object of `orch status RUN --json` (docs/goodput.md)."""
    table = orch("status", run_id, **env)
    status = orch("status", run_id, "--json", **env)
    assert table.returncode == status.returncode == 0, table.stderr + status.stderr
    found = json.loads(status.stdout)["goodput"]
    unit, parts = f"{found['device']}-s", {part: (hours or 0) * 3600 for part, hours in found["parts_h"].items()}
    line = (
        f"{fault}: goodput {found['percent']:.1f} % of {found['allocated_h'] * 3600:.1f} {unit}; "
        f"{found['steps']['rolled_back']} steps rolled back ({parts['rolled_back']:.2f} {unit}), "
        f"idle {parts['idle']:.1f} {unit}, startup {parts['startup']:.1f} {unit}"
    )
    with capsys.disabled():
        print(f"\n{line}\n{table.stdout}")
    return found


def final_weights(run_dir: Path, step: int) -> dict:
    """A committed checkpoint's full model state, read without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = run_dir / f"weights-{step}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step_{step:08d}", target)
    return torch.load(target, weights_only=False)["model"]


def submitted_run_id(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split("Submitted run ")[1].split()[0]


@dataclass(frozen=True)
class Pace:
    """How fast this machine trains the tiny recipe on the local profile right now, from a run that did it."""

    run_id: str  # the measured run: extend it with `orch resume --steps N --wait` to get a reference of N steps
    step_s: float  # median seconds per step
    startup_s: float  # seconds from submission to the end of the first step


def measure_pace(steps: int = 40) -> Pace:
    """Train `steps` steps of the tiny recipe on the local profile and time them: tests that need a number of
    allocations size their step counts from this, not from a guess about the machine."""
    import statistics

    run_id = submitted_run_id(orch("submit", "--steps", str(steps), "--wait"))
    run_dir = Path(status_json(run_id)["run_dir"])
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    submitted = json.loads((run_dir / "jobs.json").read_text())[0]["submitted"]
    step_s = statistics.median(e["metrics"]["step_time_s"] for e in entries[1:])
    return Pace(run_id, step_s, entries[0]["time_ms"] / 1000 - submitted)


def steps_for_allocations(pace: Pace, allocations: float, limit_s: float, stop_before_end_s: float) -> int:
    """Steps that take about `allocations` allocations of `limit_s`, when each stops `stop_before_end_s` before its
    end and starts by paying `pace.startup_s` again."""
    trains_s = limit_s - stop_before_end_s - pace.startup_s
    assert trains_s > 5 * pace.step_s, f"an allocation of {limit_s} s leaves no time to train at {pace}"
    return max(20, round(allocations * trains_s / pace.step_s))


def tiny_llama(tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    """A randomly initialised Llama that runs forward and backward in milliseconds on a CPU, built here (no
    download), in fp32 and in training mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie_word_embeddings, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()
