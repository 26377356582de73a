"""System metrics per node: what the machine did while the model trained, for when throughput drops.

One daemon thread per node (in its local rank 0) samples, every `system_metrics_interval_s` of the profile, the
host's CPU utilisation, memory, load average and the resident memory of the node's ranks, and where the job runs on
GPUs, per GPU through NVML: utilisation, memory used, power and temperature. Each sample is one line of
`RUN_DIR/system/JOB.NODE.jsonl` (one writer per file: that node's local rank 0), with its time and the training step.
The sender of metrics.jsonl sends these files too (`jobs.tracking.send`: the job's sender, or `orch sync`), as
`system/NODE/FIELD` with the training step as MLflow step, without waiting for a checkpoint: they describe the
machine, not the model, and a rollback does not undo them. mlflow.json records how many bytes of each file MLflow has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from orchestrator.core.files import append_plain

log = logging.getLogger(__name__)
SYSTEM_DIR = "system"
ALWAYS = "cpu_percent"  # a field of every sample: how far MLflow has a node's samples is read from its history
GB = 1e9


def node_name() -> str:
    """Slurm's name of this node (distinct per node, even where nodes share a host name), else the short host name;
    safe in a file name and an MLflow metric key."""
    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "node"


def spool_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / SYSTEM_DIR).glob("*.jsonl"))


def metric_key(path: Path, field: str) -> str:
    """`system/NODE/FIELD`: a node's samples of every job of the run form one history."""
    return f"system/{path.stem.split('.', 1)[-1]}/{field}"


def read_from(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The samples of the complete lines after byte `offset`, and the offset after them. A line still being written
    waits for the next read; a garbled one is skipped."""
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    samples = []
    for line in complete.splitlines():
        try:
            entry = json.loads(line)
            metrics = {str(k): float(v) for k, v in entry["metrics"].items()}
            samples.append({"time_ms": int(entry["time_ms"]), "step": int(entry["step"]), "metrics": metrics})
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return samples, offset + len(complete)


def offset_through(path: Path, time_ms: int | None) -> int:
    """The byte offset after the samples taken at or before `time_ms` (0 for None): how far an MLflow run whose
    newest sample of this node is at `time_ms` has the file."""
    offset = 0
    if time_ms is None:
        return offset
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n") or taken_after(line, time_ms):
                break
            offset += len(line)
    return offset


def taken_after(line: bytes, time_ms: int) -> bool:
    try:
        return int(json.loads(line)["time_ms"]) > time_ms
    except (ValueError, KeyError, TypeError):
        return False  # garbled: never sent, so passed over like a sent line


def unsent(run_dir: Path, sent: dict[str, int] | None) -> bool:
    """Whether a system file has bytes past what `sent` says MLflow has (None: not known; then any that has bytes)."""
    sent = sent or {}
    return any(path.stat().st_size > sent.get(path.name, 0) for path in spool_files(run_dir))


class Gpus:
    """This node's GPUs through NVML (`nvidia-ml-py`, the `gpu` extra); NVML's index is nvidia-smi's numbering."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def sample(self) -> dict[str, float]:
        nvml, sample = self.nvml, {}
        for i, handle in enumerate(self.handles):
            sample[f"gpu{i}_util_percent"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            sample[f"gpu{i}_memory_used_gb"] = nvml.nvmlDeviceGetMemoryInfo(handle).used / GB
            sample[f"gpu{i}_power_w"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000
            sample[f"gpu{i}_temperature_c"] = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        return sample

    def close(self) -> None:
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()


class Sampler:
    """One sample of the node: host CPU % (since the previous sample), memory, load, the ranks' RSS, and the GPUs
    where `gpus` is set and NVML answers (else GPU fields are left out, said once in the log)."""

    def __init__(self, gpus: bool) -> None:
        self.ranks = node_ranks()
        self.gpus = open_gpus() if gpus else None
        psutil.cpu_percent()  # starts the interval; psutil keeps one per thread, so build a Sampler where it samples

    def sample(self) -> dict[str, float]:
        memory = psutil.virtual_memory()
        sample = {
            ALWAYS: psutil.cpu_percent(),
            "memory_used_gb": (memory.total - memory.available) / GB,
            "memory_percent": memory.percent,
            "load_1m": os.getloadavg()[0],
            "ranks_rss_gb": sum(rss(p) for p in self.ranks) / GB,
        }
        if self.gpus is not None:
            try:
                sample.update(self.gpus.sample())
            except self.gpus.nvml.NVMLError as err:
                log.warning("NVML stopped answering (%s); system metrics go on without GPU fields", err)
                self.close()
        return sample

    def close(self) -> None:
        gpus, self.gpus = self.gpus, None
        if gpus is not None:
            gpus.close()


def open_gpus() -> Gpus | None:
    try:
        return Gpus()
    except Exception as err:  # noqa: BLE001 - no nvidia-ml-py, no driver: the host fields still come
        log.warning("no GPU system metrics: NVML unavailable (%s); `pip install nvidia-ml-py` adds them", err)
        return None


def node_ranks() -> list[psutil.Process]:
    """This process and its siblings with the same command line: the node's ranks, as the LocalExecutor's
    controller or Slurm's step daemon started them."""
    me = psutil.Process()
    try:
        parent, command = me.parent(), me.cmdline()
        return [p for p in parent.children() if p.cmdline() == command] if parent else [me]
    except psutil.Error:
        return [me]


def rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:  # a rank that has ended
        return 0


class SystemMonitor:
    """The node's sampling thread, started on the node's local rank 0 (`start`; None elsewhere, and where the
    profile's interval is 0)."""

    def __init__(self, path: Path, interval_s: float, step: Callable[[], int | None], gpus: bool) -> None:
        self.path, self.interval_s, self.step, self.gpus = path, interval_s, step, gpus
        self.stopping = threading.Event()
        self.failed = False
        self.thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    @classmethod
    def start(
        cls, run_dir: Path, job_id: str, interval_s: float, gpus: bool, step: Callable[[], int | None]
    ) -> SystemMonitor | None:
        if interval_s <= 0 or os.environ.get("LOCAL_RANK", "0") != "0":
            return None
        path = run_dir / SYSTEM_DIR / f"{job_id}.{node_name()}.jsonl"
        path.parent.mkdir(exist_ok=True)
        monitor = cls(path, interval_s, step, gpus)
        monitor.thread.start()
        return monitor

    def _loop(self) -> None:
        """A sample every interval, and a last one when stopped (so that even a short job has one)."""
        sampler = Sampler(self.gpus)
        try:
            while True:
                stopping = self.stopping.wait(self.interval_s)
                self.record(sampler)
                if stopping:
                    return
        finally:
            sampler.close()

    def record(self, sampler: Sampler) -> None:
        try:
            line = {"time_ms": int(time.time() * 1000), "step": self.step() or 0, "metrics": sampler.sample()}
            append_plain(self.path, json.dumps(line) + "\n")
        except Exception as err:  # noqa: BLE001 - a full disk must not stop training; said once
            if not self.failed:
                log.warning("system metrics not recorded in %s: %s", self.path, err)
            self.failed = True

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
