"""What `orch doctor`'s job runs on every rank: what a node gives a training run, measured where the run would run,
then gathered by rank 0 into doctor.json (`orchestrator.core.doctor` holds its model and the rules that judge it).

A probe that fails reports the failure as its finding instead of raising: the report matters most when something is
wrong. Between the probes every rank runs the same collectives in the same order. torch is imported on the node
only, so that `orch doctor` pickles `DoctorJob` without it.
"""

from __future__ import annotations

import fcntl
import os
import platform
import resource
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.core.doctor import (
    DOCTOR_FILE,
    NETWORK_VARIABLES,
    WRITE_MIB,
    Bandwidth,
    DoctorReport,
    DoctorRequest,
    Gpus,
    Network,
    Probe,
    RankReport,
    SlurmSettings,
    Software,
    Storage,
)
from orchestrator.core.files import write_json_atomic
from orchestrator.core.schedulers import rank_started
from orchestrator.core.schedulers.slurm import site_settings

ALLREDUCE_MIB = {"cpu": (1, 4, 16), "cuda": (16, 64, 256)}  # tensor sizes, from latency-bound to bandwidth-bound
ALLREDUCE_ITERATIONS = {"cpu": 5, "cuda": 20}
WRITE_CHUNK = 4 << 20
TRACKING_TIMEOUT_S = 5


class DoctorJob:
    """The object submitit pickles and calls on every rank."""

    def __init__(self, request: DoctorRequest) -> None:
        self.request = request

    def __call__(self) -> None:
        import submitit
        import torch.distributed as dist

        from jobs.distributed import start_process_group

        rank_started()
        # the ranks see the node as a training job's ranks do (jobs/train.py)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        ranks = start_process_group(self.request.device, self.request.backend)
        try:
            examine(self.request, ranks.rank, ranks.world, ranks.device, str(submitit.JobEnvironment().job_id))
        finally:
            dist.destroy_process_group()


def examine(request: DoctorRequest, rank: int, world: int, device: Any, job_id: str) -> None:
    """Probe this rank, measure the filesystem and the all-reduce with every rank at once, and have rank 0 write
    what all of them found."""
    import torch.distributed as dist

    synchronize(device)  # every rank writes at once, as in a checkpoint save
    storage = probe_storage(Path(request.runs_dir), f".{request.doctor_id}.rank{rank}", WRITE_MIB[request.device])
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    soft, hard = (None if n == resource.RLIM_INFINITY else n for n in resource.getrlimit(resource.RLIMIT_NOFILE))
    report = RankReport(
        rank=rank,
        local_rank=int(os.environ["LOCAL_RANK"]),
        host=hosts[rank],
        software=software(),
        gpus=gpus(device),
        nofile_soft=soft,
        nofile_hard=hard,
        cpu_affinity=sorted(os.sched_getaffinity(0)),
        storage=storage,
        tracking=tracking_probe(request.tracking_uri),
        network=network(),
        allreduce=allreduce_bandwidth(device, hosts),
    )
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        done = DoctorReport(request=request, job_id=job_id, finished=time.time(), ranks=reports, slurm=slurm())
        write_json_atomic(Path(request.folder) / DOCTOR_FILE, done.model_dump(mode="json"))


def slurm() -> SlurmSettings | None:
    """The site's settings as `scontrol` tells them inside the job (None outside Slurm)."""
    if (settings := site_settings()) is None:
        return None
    config, part = settings
    return SlurmSettings(
        version=config.get("SLURM_VERSION"),
        job_requeue=config.get("JobRequeue"),
        enforce=config.get("AccountingStorageEnforce"),
        preempt_type=config.get("PreemptType"),
        preempt_parameters=config.get("PreemptParameters"),
        partition=os.environ.get("SLURM_JOB_PARTITION"),
        partition_preempt_mode=part.get("PreemptMode"),
        grace_time=part.get("GraceTime"),
    )


def software() -> Software:
    import torch

    cuda = torch.cuda.is_available()
    return Software(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        modules=os.environ.get("LOADEDMODULES"),
        driver=nvidia_driver() if cuda else None,
    )


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version, which bounds the CUDA builds of torch the nodes can run; None where NVML is
    missing (nvidia-ml-py is installed by the GPU environments)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # noqa: BLE001 - no NVML library or module: the report says "unknown"
        return None
    return version.decode() if isinstance(version, bytes) else version


def gpus(device: Any) -> Gpus:
    import torch

    return Gpus(
        device=str(device),
        visible=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        uuid=str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )


def network() -> Network:
    import psutil

    adapters = Path("/sys/class/infiniband")
    return Network(
        variables={name: os.environ[name] for name in NETWORK_VARIABLES if name in os.environ},
        interfaces={name: stats.isup for name, stats in sorted(psutil.net_if_stats().items())},
        hcas=sorted(p.name for p in adapters.iterdir()) if adapters.is_dir() else [],
    )


def probe_storage(folder: Path, name: str, write_mib: int) -> Storage:
    """Free space, write speed and file locks in the folder that holds run directories (created if missing, as
    `orch submit` would)."""
    fstype, options = mount_of(folder)
    found = Storage(path=str(folder), fstype=fstype, options=options, write_mib=write_mib)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / name
        try:
            speed = write_speed(probe, write_mib)
            flock, lockf = lock_probe(probe, fcntl.flock), lock_probe(probe, fcntl.lockf)
        finally:
            probe.unlink(missing_ok=True)
        free_gb = shutil.disk_usage(folder).free / 1e9
    except OSError as err:
        return found.model_copy(update={"error": str(err)})
    return found.model_copy(update={"free_gb": free_gb, "write_gb_s": speed, "flock": flock, "lockf": lockf})


def mount_of(path: Path) -> tuple[str, list[str]]:
    """The type and options of the mount that holds `path`: the deepest mount point above it, the last one mounted
    where several share it (/proc/mounts, through psutil)."""
    import psutil

    resolved = path.resolve()
    mounts = [m for m in psutil.disk_partitions(all=True) if resolved.is_relative_to(m.mountpoint)]
    mount = max(reversed(mounts), key=lambda m: len(m.mountpoint))
    return mount.fstype, mount.opts.split(",")


def write_speed(path: Path, mib: int) -> float:
    """GB/s of writing `mib` MiB of incompressible data to `path` and forcing it to disk."""
    chunk = os.urandom(WRITE_CHUNK)
    start = time.perf_counter()
    with path.open("wb") as f:
        for _ in range(mib * 2**20 // WRITE_CHUNK):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return mib * 2**20 / (time.perf_counter() - start) / 1e9


def lock_probe(path: Path, lock: Callable[[int, int], Any]) -> Probe:
    """Whether an exclusive lock of this kind (fcntl.flock, or fcntl.lockf: POSIX, what SQLite uses) can be taken on
    `path`; a filesystem mounted without lock support refuses it."""
    try:
        with path.open("rb+") as f:
            lock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        return Probe(ok=False, detail=str(err))
    return Probe(ok=True, detail="works")


def tracking_probe(uri: str) -> Probe:
    """Whether this node reaches the store the run reports to: an answer from a tracking server, or the folder of an
    SQLite database or a file store, taking files and POSIX locks."""
    scheme, path = urllib.parse.urlsplit(uri).scheme, Path(urllib.parse.urlsplit(uri).path)
    if scheme in ("http", "https"):
        return server_probe(uri)
    if scheme == "sqlite":
        return folder_probe(Path(uri.removeprefix("sqlite:///")).parent)
    if scheme in ("file", ""):
        return folder_probe(path if path.is_dir() else path.parent)
    return Probe(ok=False, detail="not checked: orch checks http(s)://, sqlite:/// and file stores")


def server_probe(uri: str) -> Probe:
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(uri, timeout=TRACKING_TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as err:  # an answer all the same
        status = err.code
    except (OSError, ValueError) as err:
        return Probe(ok=False, detail=f"no answer (waited up to {TRACKING_TIMEOUT_S} s): {getattr(err, 'reason', err)}")
    return Probe(ok=True, detail=f"HTTP {status} in {(time.perf_counter() - start) * 1000:.0f} ms")


def folder_probe(folder: Path) -> Probe:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".orch-doctor-") as f:
            locked = lock_probe(Path(f.name), fcntl.lockf)
    except OSError as err:
        return Probe(ok=False, detail=f"{folder} is not writable: {err}")
    if not locked.ok:
        return Probe(ok=False, detail=f"POSIX locks fail in {folder}, and SQLite needs them: {locked.detail}")
    return Probe(ok=True, detail=f"{folder} is writable and takes POSIX locks")


def allreduce_bandwidth(device: Any, hosts: list[str]) -> list[Bandwidth]:
    """All-reduce times within each node and, with several nodes, across all of them (every rank calls this with
    the same `hosts`: rank -> host)."""
    import torch.distributed as dist

    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)
    scopes: list[tuple[str, Any]] = [("within a node", None)]
    if len(by_host) > 1:
        node_group, _ = dist.new_subgroups_by_enumeration(list(by_host.values()))
        scopes = [("within a node", node_group), (f"across {len(by_host)} nodes", None)]
    return [time_allreduce(device, scope, group, mib) for scope, group in scopes for mib in ALLREDUCE_MIB[device.type]]


def time_allreduce(device: Any, scope: str, group: Any, mib: int) -> Bandwidth:
    import torch
    import torch.distributed as dist

    tensor = torch.ones(mib * 2**20 // 4, device=device)  # float32
    dist.all_reduce(tensor, group=group)  # warm-up: connections and buffers
    iterations = ALLREDUCE_ITERATIONS[device.type]
    synchronize(device, group)
    start = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(tensor, group=group)
    synchronize(device, group)
    seconds = (time.perf_counter() - start) / iterations
    return Bandwidth(scope=scope, ranks=dist.get_world_size(group), mib=mib, seconds=seconds)


def synchronize(device: Any, group: Any = None) -> None:
    """Until every rank of the group has finished its queued work."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=group, device_ids=[device.index] if device.type == "cuda" else None)
