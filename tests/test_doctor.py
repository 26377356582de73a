"""`orch doctor`: the job on the real executors (local Slurm and the LocalExecutor), and the rules that judge what it
found."""

import json
import pickle
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from jobs.doctor import tracking_probe
from orchestrator.cli.commands.doctor import checks_table, wait_for_report
from orchestrator.core.doctor import (
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
from orchestrator.core.errors import OrchError
from orchestrator.core.runfiles import read_model
from orchestrator.core.schedulers.base import Job
from tests.conftest import ROOT, free_port, needs_slurm, orch, status_json

WORKS = Probe(ok=True, detail="works")


def gpu_rank(rank: int, host: str) -> RankReport:
    """A rank of a healthy two-node GPU job: every check ok or info."""
    return RankReport(
        rank=rank,
        local_rank=rank % 2,
        host=host,
        software=Software(python="3.11.5", torch="2.5.1", cuda="12.4", nccl="2.21.5", modules="Python/3.11.5",
                          driver="550.54.15"),  # fmt: skip
        gpus=Gpus(
            device=f"cuda:{rank % 2}",
            visible=["A100-SXM4-40GB"] * 2,
            uuid=f"{host}-{rank % 2}",
            cuda_visible_devices=None,
        ),
        nofile_soft=65536,
        nofile_hard=65536,
        cpu_affinity=list(range(16 * (rank % 2), 16 * (rank % 2) + 16)),  # 16 cores of its own, as srun binds them
        storage=Storage(
            path="/scratch/runs",
            fstype="lustre",
            options=["rw", "flock"],
            write_mib=256,
            free_gb=5000.0,
            write_gb_s=2.5,
            flock=WORKS,
            lockf=WORKS,
        ),
        tracking=Probe(ok=True, detail="HTTP 200 in 4 ms"),
        network=Network(variables={"NCCL_SOCKET_IFNAME": "ib"}, interfaces={"ib0": True, "lo": True}, hcas=["mlx5_0"]),
        allreduce=[Bandwidth(scope="within a node", ranks=2, mib=256, seconds=0.004)],
    )


def gpu_report(ranks: list[RankReport] | None = None, **request: object) -> DoctorReport:
    asked = dict(
        doctor_id="doctor-1",
        profile="gpu",
        executor="slurm",
        device="cuda",
        backend="nccl",
        nodes=2,
        tasks_per_node=2,
        folder="/home/u/.orch/doctor/doctor-1",
        runs_dir="/scratch/runs",
        tracking_uri="http://login1:5000",
        job_tracking="direct",
    )
    healthy = [gpu_rank(n, host) for n, host in enumerate(["acn01", "acn01", "acn02", "acn02"])]
    return DoctorReport(request=DoctorRequest(**{**asked, **request}), job_id="1", finished=0.0, ranks=ranks or healthy)


def statuses(report: DoctorReport) -> dict[str, str]:
    return {check.name: check.status for check in report.checks}


def finding(report: DoctorReport, name: str) -> str:
    return next(check.finding for check in report.checks if check.name == name)


def with_rank(index: int, **changes: object) -> list[RankReport]:
    """The healthy ranks, rank `index` changed: a field of RankReport or of its storage, gpus or tracking."""
    ranks = gpu_report().ranks
    rank = ranks[index]
    for name, value in changes.items():
        part = next((p for p in ("storage", "gpus", "network") if name in type(getattr(rank, p)).model_fields), None)
        if part:
            value = getattr(rank, part).model_copy(update={name: value})
            name = part
        rank = rank.model_copy(update={name: value})
    return [*ranks[:index], rank, *ranks[index + 1 :]]


def test_a_healthy_gpu_report_has_no_warning_and_reads_back_the_same(tmp_path: Path):
    report = gpu_report()
    assert "warn" not in statuses(report).values(), report.checks
    assert statuses(report)["GPUs"] == "ok" and "one GPU per rank" in finding(report, "GPUs")
    assert "NVIDIA driver 550.54.15" in finding(report, "software")
    assert finding(report, "CPU affinity") == "every rank on cores of its own (16 each); rank 0: 0-15"
    path = tmp_path / "doctor.json"
    path.write_text(json.dumps(report.model_dump(mode="json")))
    assert read_model(path, DoctorReport).checks == report.checks
    assert json.loads(path.read_text())["ranks"][0]["allreduce"][0]["algbw_gb_s"] == pytest.approx(67.1, abs=0.1)


@pytest.mark.parametrize(
    ("changes", "check", "says"),
    [
        ({"nofile_soft": 1024}, "open files", "ulimit -n 1024"),
        ({"flock": Probe(ok=False, detail="[Errno 38] Function not implemented")}, "file locks", "flock fails"),
        ({"lockf": Probe(ok=False, detail="[Errno 37] No locks available")}, "file locks", "lockf fails"),
        ({"tracking": Probe(ok=False, detail="no answer within 5 s: timed out")}, "tracking store", "timed out"),
        ({"uuid": "acn02-0"}, "GPUs", "share one GPU"),
        ({"uuid": None, "device": "cpu"}, "GPUs", "compute on no GPU"),
        ({"options": ["rw", "localflock"]}, "filesystem", "localflock"),
        ({"write_gb_s": 0.3}, "write speed", "below the 1 GB/s"),
        ({"free_gb": 3.0}, "free space", "3 GB free"),
        ({"variables": {"NCCL_SOCKET_IFNAME": "eth"}}, "NCCL/Gloo variables", "NCCL_SOCKET_IFNAME=eth names nothing"),
        ({"variables": {"NCCL_IB_HCA": "=mlx5_1"}}, "NCCL/Gloo variables", "NCCL_IB_HCA==mlx5_1 names nothing"),
        ({"software": gpu_rank(0, "x").software.model_copy(update={"torch": "2.4.0"})}, "software", "ranks differ"),
        ({"software": gpu_rank(0, "x").software.model_copy(update={"driver": "535.104.05"})}, "software", "535.104"),
        ({"cpu_affinity": list(range(8, 24))}, "CPU affinity", "ranks 2 and 3 on acn02 share core 8"),
    ],
)
def test_each_problem_warns_and_names_the_rank(changes: dict, check: str, says: str):
    report = gpu_report(with_rank(3, **changes))
    assert statuses(report)[check] == "warn"
    assert says in finding(report, check) and "acn02" in finding(report, check)
    assert [name for name, status in statuses(report).items() if status == "warn"] == [check]


def test_unusable_run_directories_warn_once_with_the_cause_and_mark_the_rest_unmeasured():
    unusable = dict(error="[Errno 13] Permission denied: '/scratch/runs'", free_gb=None, write_gb_s=None)
    report = gpu_report(with_rank(3, **unusable, flock=None, lockf=None))
    assert "Permission denied" in finding(report, "filesystem") and "rank 3 (acn02)" in finding(report, "filesystem")
    for name in ("free space", "write speed", "file locks"):
        assert statuses(report)[name] == "warn" and finding(report, name).startswith("not measured")


def test_the_tracking_probe_tells_a_reachable_store_from_one_that_is_not(tmp_path: Path):
    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        answered = tracking_probe(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert answered.ok and answered.detail.startswith("HTTP 404")  # any answer means the server is reachable
    refused = tracking_probe(f"http://127.0.0.1:{free_port()}")
    assert not refused.ok and "refused" in refused.detail
    assert tracking_probe(f"sqlite:///{tmp_path}/mlflow.db").ok
    assert not tracking_probe(f"sqlite:///{tmp_path}/missing/mlflow.db").ok
    assert tracking_probe(f"file://{tmp_path}/mlruns").ok and tracking_probe(str(tmp_path)).ok
    assert "not checked" in tracking_probe("postgresql://db:5432/mlflow").detail


def test_profile_settings_change_what_warns():
    """CPU profiles write too little to judge speed and use no GPU; a spooling profile's nodes need no store."""
    cpu = gpu_report(with_rank(3, write_gb_s=0.3, uuid=None, device="cpu"), device="cpu", backend="gloo")
    assert (statuses(cpu)["write speed"], statuses(cpu)["GPUs"]) == ("ok", "info")
    unreachable = with_rank(1, tracking=Probe(ok=False, detail="no answer within 5 s: timed out"))
    spooling = gpu_report(unreachable, job_tracking="spool")
    assert statuses(spooling)["tracking store"] == "info" and "timed out" in finding(spooling, "tracking store")
    assert statuses(gpu_report(nodes=3))["ranks"] == "warn"
    excluding = [
        rank.model_copy(
            update={"network": rank.network.model_copy(update={"variables": {"NCCL_SOCKET_IFNAME": "^lo"}})}
        )
        for rank in gpu_report().ranks
    ]
    assert statuses(gpu_report(excluding))["NCCL/Gloo variables"] == "info"  # an exclusion names nothing to look for


def test_slurm_settings_the_profile_does_not_match_warn():
    preempting = SlurmSettings(
        version="23.02.7",
        job_requeue="0",
        enforce="associations,limits,qos,wckeys",
        preempt_type="preempt/partition_prio",
        preempt_parameters=None,
        partition="qgpu_preempt",
        partition_preempt_mode="REQUEUE",
        grace_time="60",
    )
    report = gpu_report().model_copy(update={"slurm": preempting})
    said = finding(report, "slurm")
    assert statuses(report)["slurm"] == "warn" and "slurm.wckey" in said and "preemptible: true" in said
    assert "SIGTERM only" in said
    matching = gpu_report(preemptible=True, wckey="orch").model_copy(update={"slurm": preempting})
    assert statuses(matching)["slurm"] == "ok"
    assert statuses(gpu_report())["slurm"] == "info"  # no Slurm settings: not a Slurm job


def test_the_table_shows_every_check_with_its_status():
    report = gpu_report(with_rank(2, nofile_soft=1024))
    out = Console(record=True, width=200)
    out.print(checks_table(report))
    lines = out.export_text().splitlines()
    assert len([line for line in lines if " ok " in line or " info " in line or " warn " in line]) == len(report.checks)
    assert any("open files" in line and " warn " in line for line in lines)


def test_a_failed_rank_ends_the_wait_with_its_error_and_logs(tmp_path: Path):
    logs = tmp_path / "submitit" / "4194305"
    logs.mkdir(parents=True)
    (logs / "4194305_0_result.pkl").write_bytes(pickle.dumps(("success", None)))
    (logs / "4194305_1_result.pkl").write_bytes(pickle.dumps(("error", "Traceback ...\nValueError: no GPU\n")))
    gone = Job("local", "4194305", 0.0, tmp_path / "submitit")
    with pytest.raises(OrchError, match=r"rank 1: ValueError: no GPU\).*4194305_0_log.err"):
        wait_for_report(tmp_path, gone, 60)


def test_the_job_module_pickles_without_torch():
    code = "import sys, jobs.doctor; print([m for m in ('torch', 'numpy', 'mlflow') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_dry_run_shows_the_short_job_and_refuses_what_submit_refuses(orch_home: Path):
    result = orch("doctor", "--profile", "karolina", "--account", "OPEN-29-12", "--nodes", "2", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --time=10" in result.stdout and "#SBATCH --nodes=2" in result.stdout
    assert "/scratch/project/open-29-12/orch/runs" in result.stdout and not orch_home.exists()
    refused = orch("doctor", "--profile", "karolina", "--dry-run")
    assert refused.returncode == 2 and "--account" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.slow
@needs_slurm
def test_doctor_on_local_slurm_reports_both_ranks(orch_home: Path):
    result = orch("doctor", "--profile", "local-slurm", "--json", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and report["request"]["executor"] == "slurm"
    for rank in ranks:
        assert [b["mib"] for b in rank["allreduce"]] == [1, 4, 16]
        assert all(b["algbw_gb_s"] > 0 and b["ranks"] == 2 for b in rank["allreduce"])
        storage = rank["storage"]
        assert storage["write_gb_s"] > 0 and storage["free_gb"] > 0 and storage["fstype"]
        assert storage["flock"]["ok"] and storage["lockf"]["ok"]  # the local disk takes both
        assert rank["nofile_soft"] is None or rank["nofile_soft"] > 0
        assert rank["tracking"]["ok"], rank["tracking"]
        assert rank["gpus"]["device"].startswith("cpu") and rank["network"]["interfaces"]["lo"]
        assert rank["cpu_affinity"] and rank["software"]["driver"] is None  # no GPU here: no NVIDIA driver
    assert {c["name"] for c in report["checks"]} >= {"open files", "file locks", "tracking store", "write speed"}
    assert report["slurm"]["version"] and report["slurm"]["partition"] == "debug"
    assert report["slurm"]["partition_preempt_mode"] == "OFF" and report["slurm"]["job_requeue"] is not None
    folder = Path(report["request"]["folder"])
    assert (folder / "doctor.json").is_file() and folder.parent == orch_home / "doctor"
    assert not list((orch_home / "runs").glob(".doctor-*"))  # the probe files are gone
    assert status_json() == []  # a doctor folder is no run


@pytest.mark.slow
def test_doctor_on_the_local_executor_prints_the_table(orch_home: Path):
    result = orch("doctor", "--profile", "local", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all-reduce within a node" in result.stdout and "file locks" in result.stdout
    report = Path(result.stdout.split("Report: ")[1].split()[0])
    assert read_model(report, DoctorReport).request.executor == "local"
