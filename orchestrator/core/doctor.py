"""doctor.json: what `orch doctor`'s job found on every rank, and the rules that judge it.

The job (jobs/doctor.py) measures; the rules here turn the measurements into one check per row, each ok, warn or
info, so that the table `orch doctor` prints and the `checks` in doctor.json always agree. Doctor reports live in
`$ORCH_HOME/doctor/<id>/`, beside `runs/` and never in it: `orch status` and `orch ls` list runs only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, computed_field

from orchestrator.core.plan import SAVE_BANDWIDTH_GB_S
from orchestrator.core.runfiles import RunFile
from orchestrator.core.settings import orch_home

DOCTOR_FILE = "doctor.json"
MIN_NOFILE = 4096  # a 1024 soft limit is below one open file per token shard of a 168B-token corpus on every rank
MIN_FREE_GB = 20  # two checkpoints of a 1.2B-parameter model with LionW (~10 GB each) and room to write a third
WRITE_MIB = {"cuda": 256, "cpu": 16}  # written per rank; CPU profiles checkpoint small models
NETWORK_VARIABLES = ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "GLOO_SOCKET_IFNAME")
LOCK_OPTIONS = ("flock", "localflock", "noflock")  # Lustre's mount options for file locks
INCOHERENT_LOCKS = ("localflock", "noflock")  # locks that other nodes do not see, or none at all


def doctor_root() -> Path:
    return orch_home() / "doctor"


class DoctorRequest(RunFile):
    """What the job is asked to examine, and what the rules expect of it."""

    doctor_id: str
    profile: str
    executor: Literal["local", "slurm"]
    device: Literal["cpu", "cuda"]
    backend: Literal["gloo", "nccl"]
    nodes: int
    tasks_per_node: int
    folder: str  # the doctor folder: doctor.json and the job's submitit files
    runs_dir: str  # where the profile keeps run directories: the filesystem measured
    tracking_uri: str
    job_tracking: Literal["direct", "spool"]  # spool: the nodes never write to the store, the login node does
    preemptible: bool = False  # the profile expects preemption by SIGTERM
    wckey: str | None = None  # the profile's wckey for the job script


class Probe(RunFile):
    ok: bool
    detail: str


class Software(RunFile):
    python: str
    torch: str
    cuda: str | None  # torch.version.cuda: None in a CPU build
    nccl: str | None  # None without CUDA
    modules: str | None  # LOADEDMODULES: what Lmod (or Environment Modules) loaded, colon-separated
    driver: str | None = None  # the NVIDIA driver's version (NVML); None without one


class Gpus(RunFile):
    device: str  # the device this rank computes on
    visible: list[str]  # names of the GPUs the rank sees
    uuid: str | None  # of the GPU it computes on: two ranks with one UUID share a GPU
    cuda_visible_devices: str | None


class Storage(RunFile):
    """The run directories' filesystem as one rank sees it; `error` when it could not be used at all."""

    path: str
    fstype: str
    options: list[str]
    write_mib: int
    free_gb: float | None = None
    write_gb_s: float | None = None  # measured with fsync, every rank writing at once as a checkpoint save does
    flock: Probe | None = None
    lockf: Probe | None = None  # POSIX locks: what SQLite needs
    error: str | None = None


class Network(RunFile):
    variables: dict[str, str]  # those of NETWORK_VARIABLES that are set
    interfaces: dict[str, bool]  # name: up
    hcas: list[str]  # InfiniBand adapters (/sys/class/infiniband), what NCCL_IB_HCA names


class Bandwidth(RunFile):
    scope: str  # "within a node" or "across N nodes"
    ranks: int
    mib: int
    seconds: float  # per all-reduce

    @computed_field
    @property
    def algbw_gb_s(self) -> float:
        """Algorithm bandwidth: the tensor's bytes over the time of one all-reduce."""
        return self.mib * 2**20 / self.seconds / 1e9

    @computed_field
    @property
    def busbw_gb_s(self) -> float:
        """Bus bandwidth (as nccl-tests reports it): comparable with the links' speed whatever the rank count."""
        return self.algbw_gb_s * 2 * (self.ranks - 1) / self.ranks


class RankReport(RunFile):
    rank: int
    local_rank: int
    host: str
    software: Software
    gpus: Gpus
    nofile_soft: int | None  # None: unlimited
    nofile_hard: int | None
    cpu_affinity: list[int] = []  # the cores this rank may run on (sched_getaffinity)
    storage: Storage
    tracking: Probe
    network: Network
    allreduce: list[Bandwidth]


class Check(BaseModel):
    name: str
    status: Literal["ok", "warn", "info"]
    finding: str


class SlurmSettings(RunFile):
    """What the site's Slurm does that a job script must not assume (`scontrol show config` and the partition)."""

    version: str | None
    job_requeue: str | None  # JobRequeue: whether jobs are requeued without --requeue
    enforce: str | None  # AccountingStorageEnforce: "wckeys" in it refuses jobs without a known wckey
    preempt_type: str | None
    preempt_parameters: str | None  # send_user_signal: preemption warns with the job's signal (USR2) first
    partition: str | None
    partition_preempt_mode: str | None  # OFF, REQUEUE, CANCEL, SUSPEND, ...
    grace_time: str | None  # seconds between SIGTERM and SIGKILL on preemption


class DoctorReport(RunFile):
    """doctor.json, written by the job's rank 0. `checks` is derived, and recomputed whenever the file is read."""

    request: DoctorRequest
    job_id: str
    finished: float
    ranks: list[RankReport]
    slurm: SlurmSettings | None = None  # None: not a Slurm job (or scontrol could not be run)

    @computed_field
    @property
    def checks(self) -> list[Check]:
        return [rule(self) for rule in RULES] + allreduce_checks(self)


# --- the rules: one check each ------------------------------------------------------------------


def ranks_text(ranks: Iterable[RankReport]) -> str:
    """'rank 3 (acn02)' or 'ranks 0-7 (acn01), 8 (acn02)': where something was found."""
    hosts: dict[str, list[int]] = {}
    for report in ranks:
        hosts.setdefault(report.host, []).append(report.rank)
    numbers = [n for group in hosts.values() for n in group]
    parts = [f"{span(group)} ({host})" for host, group in hosts.items()]
    return f"rank{'s' if len(numbers) > 1 else ''} {', '.join(parts)}"


def span(numbers: list[int]) -> str:
    contiguous = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    return f"{numbers[0]}-{numbers[-1]}" if contiguous and len(numbers) > 2 else ", ".join(map(str, numbers))


def by_value(report: DoctorReport, value: Callable[[RankReport], Any]) -> dict[Any, list[RankReport]]:
    groups: dict[Any, list[RankReport]] = {}
    for rank in report.ranks:
        groups.setdefault(value(rank), []).append(rank)
    return groups


def same_everywhere(name: str, report: DoctorReport, value: Callable[[RankReport], str], status: str) -> Check:
    """One value on every rank is `status`; ranks that differ (a node with another environment) are a warning."""
    groups = by_value(report, value)
    if len(groups) == 1:
        return Check(name=name, status=status, finding=next(iter(groups)))
    found = "; ".join(f"{text} on {ranks_text(ranks)}" for text, ranks in groups.items())
    return Check(name=name, status="warn", finding=f"ranks differ: {found}")


def check_ranks(report: DoctorReport) -> Check:
    request, hosts = report.request, by_value(report, lambda r: r.host)
    finding = f"{len(report.ranks)} ranks on {len(hosts)} node(s): " + ", ".join(
        f"{host} ({len(ranks)})" for host, ranks in hosts.items()
    )
    if len(hosts) != request.nodes or len(report.ranks) != request.nodes * request.tasks_per_node:
        expected = f"{request.nodes} node(s) × {request.tasks_per_node} ranks"
        return Check(name="ranks", status="warn", finding=f"{finding}; the profile asks for {expected}")
    return Check(name="ranks", status="ok", finding=finding)


def check_software(report: DoctorReport) -> Check:
    def versions(rank: RankReport) -> str:
        s = rank.software
        driver = f", NVIDIA driver {s.driver}" if s.driver else ""
        return f"Python {s.python}, torch {s.torch}, CUDA {s.cuda or 'none'}, NCCL {s.nccl or 'none'}{driver}"

    return same_everywhere("software", report, versions, "ok")


def check_modules(report: DoctorReport) -> Check:
    def modules(rank: RankReport) -> str:
        loaded = rank.software.modules
        return loaded.replace(":", ", ") if loaded else "none loaded (no LOADEDMODULES)"

    return same_everywhere("modules", report, modules, "info")


def check_gpus(report: DoctorReport) -> Check:
    """On a GPU profile every rank computes on a GPU of its own (it may see the node's others)."""
    first = report.ranks[0].gpus
    seen = f"{len(first.visible)} × {', '.join(sorted(set(first.visible)))}" if first.visible else "none"
    finding = f"{seen} visible to rank 0 (CUDA_VISIBLE_DEVICES {first.cuda_visible_devices or 'unset'})"
    if report.request.device != "cuda":
        return Check(name="GPUs", status="info", finding=f"none used (CPU profile); {finding}")
    without = [r for r in report.ranks if r.gpus.uuid is None]
    shared = [rs for (_, uuid), rs in by_value(report, lambda r: (r.host, r.gpus.uuid)).items() if uuid and len(rs) > 1]
    problems = [f"{ranks_text(without)} compute on no GPU"] if without else []
    problems += [f"{ranks_text(ranks)} share one GPU" for ranks in shared]
    if problems:
        return Check(name="GPUs", status="warn", finding=f"{'; '.join(problems)}: {finding}")
    return Check(name="GPUs", status="ok", finding=f"one GPU per rank; {finding}")


def check_cpu_affinity(report: DoctorReport) -> Check:
    """Each rank of a node on cores of its own: ranks that share cores (no binding) slow each other's data loading
    and kernel launches, and a rank far from its GPU's socket pays on every copy."""
    reported = [r for r in report.ranks if r.cpu_affinity]
    if not reported:
        return Check(name="CPU affinity", status="info", finding="not reported")
    for host, ranks in by_value(report, lambda r: r.host).items():
        seen: dict[int, int] = {}
        for rank in ranks:
            for core in rank.cpu_affinity:
                if core in seen:
                    return Check(
                        name="CPU affinity",
                        status="warn",
                        finding=f"ranks {seen[core]} and {rank.rank} on {host} share core {core}: bind each rank to "
                        "its own cores (srun --cpu-bind=cores, with the profile's slurm.cpus_per_task)",
                    )
                seen[core] = rank.rank
    counts = sorted({len(r.cpu_affinity) for r in reported})
    first = reported[0]
    return Check(
        name="CPU affinity",
        status="ok",
        finding=f"every rank on cores of its own ({'/'.join(map(str, counts))} each); rank {first.rank}: "
        f"{cores_text(first.cpu_affinity)}",
    )


def cores_text(cores: list[int]) -> str:
    """'0-15' or '0-7, 64-71': a set of cores as ranges."""
    ranges: list[list[int]] = []
    for core in sorted(cores):
        if ranges and core == ranges[-1][1] + 1:
            ranges[-1][1] = core
        else:
            ranges.append([core, core])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in ranges)


def check_nofile(report: DoctorReport) -> Check:
    lowest = min(report.ranks, key=lambda r: r.nofile_soft if r.nofile_soft is not None else float("inf"))
    soft, hard = (str(n) if n is not None else "unlimited" for n in (lowest.nofile_soft, lowest.nofile_hard))
    finding = f"ulimit -n {soft} (hard limit {hard}) on {ranks_text([lowest])}"
    if lowest.nofile_soft is not None and lowest.nofile_soft < MIN_NOFILE:
        return Check(
            name="open files",
            status="warn",
            finding=f"{finding}: below {MIN_NOFILE}, too few for one open file per data shard on every rank; add "
            f"`ulimit -n {lowest.nofile_hard or 65536}` to the profile's env_script",
        )
    return Check(name="open files", status="ok", finding=finding)


def check_filesystem(report: DoctorReport) -> Check:
    def mount(rank: RankReport) -> str:
        s = rank.storage
        locks = [option for option in s.options if option in LOCK_OPTIONS]
        return f"{s.path}: {s.fstype}" + (f" ({', '.join(locks)})" if locks else "")

    broken = [r for r in report.ranks if r.storage.error]
    if broken:
        return Check(
            name="filesystem", status="warn", finding=f"unusable on {ranks_text(broken)}: {broken[0].storage.error}"
        )
    check = same_everywhere("filesystem", report, mount, "ok")
    incoherent = sorted({o for r in report.ranks for o in r.storage.options if o in INCOHERENT_LOCKS})
    if incoherent:
        note = "its locks are refused or not seen by other nodes (SQLite and orch's run locks need them)"
        return Check(name=check.name, status="warn", finding=f"{check.finding}: {', '.join(incoherent)}: {note}")
    return check


def unmeasured(report: DoctorReport, name: str) -> Check | None:
    """The warning of a storage rule where the run directories could not be used (the filesystem row says why)."""
    if any(r.storage.error for r in report.ranks):
        return Check(
            name=name, status="warn", finding="not measured: the run directories are unusable (see filesystem)"
        )
    return None


def check_free_space(report: DoctorReport) -> Check:
    if unusable := unmeasured(report, "free space"):
        return unusable
    lowest = min(report.ranks, key=lambda r: r.storage.free_gb)
    finding = f"{lowest.storage.free_gb:,.0f} GB free in {lowest.storage.path}, the least on {ranks_text([lowest])}"
    if lowest.storage.free_gb < MIN_FREE_GB:
        return Check(name="free space", status="warn", finding=f"{finding}: below {MIN_FREE_GB} GB (checkpoints)")
    return Check(name="free space", status="ok", finding=finding)


def check_write_speed(report: DoctorReport) -> Check:
    """Checkpoint saves are what a run writes; the plan sizes the warning signal with SAVE_BANDWIDTH_GB_S per rank.
    The rule applies to GPU profiles, whose probe is large enough to measure it (a CPU probe is mostly latency)."""
    if unusable := unmeasured(report, "write speed"):
        return unusable
    measured = sorted(report.ranks, key=lambda r: r.storage.write_gb_s)
    slowest, speeds = measured[0], [r.storage.write_gb_s for r in measured]
    finding = (
        f"{speeds[0]:.2f}-{speeds[-1]:.2f} GB/s per rank, the slowest on {ranks_text([slowest])}; {sum(speeds):.2f} "
        f"GB/s together ({slowest.storage.write_mib} MiB per rank with fsync, {len(speeds)} ranks at once)"
    )
    if report.request.device == "cuda" and speeds[0] < SAVE_BANDWIDTH_GB_S:
        return Check(
            name="write speed",
            status="warn",
            finding=f"{finding}: below the {SAVE_BANDWIDTH_GB_S:g} GB/s per rank that plans assume for checkpoint "
            "saves, so the warning signal may leave too little time to save",
        )
    return Check(name="write speed", status="ok", finding=finding)


def check_locks(report: DoctorReport) -> Check:
    if unusable := unmeasured(report, "file locks"):
        return unusable
    failures = [
        f"{kind} fails on {ranks_text([rank])}: {probe.detail}"
        for rank in report.ranks
        for kind, probe in (("flock", rank.storage.flock), ("lockf", rank.storage.lockf))
        if not probe.ok
    ]
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        return Check(name="file locks", status="warn", finding=f"in the run directories, {failures[0]}{more}")
    return Check(name="file locks", status="ok", finding="flock and lockf (POSIX) work in the run directories")


def check_tracking(report: DoctorReport) -> Check:
    uri = report.request.tracking_uri
    failed = [r for r in report.ranks if not r.tracking.ok]
    if report.request.job_tracking == "spool":
        seen = failed[0] if failed else report.ranks[0]
        finding = f"{uri}: jobs only spool metrics (job_tracking: spool), the nodes need not reach it; from "
        return Check(
            name="tracking store", status="info", finding=f"{finding}{ranks_text([seen])}: {seen.tracking.detail}"
        )
    if failed:
        detail = failed[0].tracking.detail
        return Check(name="tracking store", status="warn", finding=f"{uri}: from {ranks_text(failed)}: {detail}")
    return Check(name="tracking store", status="ok", finding=f"{uri}: {report.ranks[0].tracking.detail}")


def names_present(value: str, present: Iterable[str]) -> bool:
    """Whether an NCCL/Gloo interface or HCA list names something present: comma-separated prefixes, '=' for exact
    names, ':port' suffixes; an exclusion list ('^...') names nothing to look for."""
    if value.startswith("^"):
        return True
    exact, wanted = value.startswith("="), [item.split(":")[0] for item in value.lstrip("=").split(",")]
    return any(name == item if exact else name.startswith(item) for item in wanted if item for name in present)


def check_network_variables(report: DoctorReport) -> Check:
    def variables(rank: RankReport) -> str:
        found = rank.network.variables
        return ", ".join(f"{k}={v}" for k, v in found.items()) or "none set (NCCL and Gloo pick interfaces)"

    check = same_everywhere("NCCL/Gloo variables", report, variables, "info")
    missing = [
        f"{name}={value} names nothing on {ranks_text([rank])}"
        for rank in report.ranks
        for name, value in rank.network.variables.items()
        if not names_present(value, rank.network.hcas if name == "NCCL_IB_HCA" else rank.network.interfaces)
    ]
    if missing:
        return Check(name=check.name, status="warn", finding=f"{check.finding}; {missing[0]}")
    return check


def check_interfaces(report: DoctorReport) -> Check:
    def interfaces(rank: RankReport) -> str:
        found = rank.network.interfaces
        text = ", ".join(f"{name} ({'up' if up else 'down'})" for name, up in found.items())
        return f"{text}; InfiniBand adapters: {', '.join(rank.network.hcas) or 'none'}"

    groups = by_value(report, interfaces)
    if len(groups) == 1:
        return Check(name="network interfaces", status="info", finding=next(iter(groups)))
    found = "; ".join(f"{ranks[0].host}: {text}" for text, ranks in groups.items())
    return Check(name="network interfaces", status="info", finding=found)


def allreduce_checks(report: DoctorReport) -> list[Check]:
    """One row per scope: each size's bandwidth as the slowest rank measured it."""
    slowest: dict[str, dict[int, Bandwidth]] = {}
    for rank in report.ranks:
        for result in rank.allreduce:
            sizes = slowest.setdefault(result.scope, {})
            if result.mib not in sizes or result.seconds > sizes[result.mib].seconds:
                sizes[result.mib] = result
    checks = []
    for scope, sizes in slowest.items():
        results = [sizes[mib] for mib in sorted(sizes)]
        figures = ", ".join(f"{r.mib} MiB {r.algbw_gb_s:.2f}" for r in results)
        checks.append(
            Check(
                name=f"all-reduce {scope}",
                status="info",
                finding=f"{report.request.backend}, {results[-1].ranks} ranks: {figures} GB/s algorithm bandwidth "
                f"(bus bandwidth {results[-1].busbw_gb_s:.2f} GB/s at {results[-1].mib} MiB)",
            )
        )
    return checks


def check_slurm(report: DoctorReport) -> Check:
    """The Slurm settings the profile must match: wckeys where enforced, `preemptible` where the partition preempts."""
    slurm = report.slurm
    if slurm is None:
        return Check(name="slurm", status="info", finding="not a Slurm job")
    facts = (
        f"Slurm {slurm.version}, JobRequeue={slurm.job_requeue} (the job script asks --requeue itself), "
        f"partition {slurm.partition} PreemptMode={slurm.partition_preempt_mode}, GraceTime={slurm.grace_time} s"
    )
    problems = []
    if "wckeys" in (slurm.enforce or "") and not report.request.wckey:
        problems.append("the site enforces wckeys: set slurm.wckey in the profile")
    preempts = (slurm.partition_preempt_mode or "OFF").upper() not in ("OFF", "")
    if preempts and not report.request.preemptible:
        problems.append("the partition preempts: set `preemptible: true` so a preemption saves at the next step")
    if preempts and "send_user_signal" not in (slurm.preempt_parameters or ""):
        facts += "; preemption sends SIGTERM only (no warning signal)"
    return Check(name="slurm", status="warn" if problems else "ok", finding="; ".join([*problems, facts]))


RULES: tuple[Callable[[DoctorReport], Check], ...] = (
    check_ranks,
    check_software,
    check_modules,
    check_gpus,
    check_cpu_affinity,
    check_nofile,
    check_filesystem,
    check_free_space,
    check_write_speed,
    check_locks,
    check_tracking,
    check_network_variables,
    check_interfaces,
    check_slurm,
)
