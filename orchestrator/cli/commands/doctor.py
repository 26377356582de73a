"""`orch doctor`: one short job, queued the way `orch submit` queues training, that reports what the profile's nodes
give a run: software and modules, GPUs, open-file limit, the run directories' filesystem (type, free space, write
speed, file locks), the tracking store, network interfaces and variables, and all-reduce bandwidth."""

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from orchestrator.core.errors import OrchError

if TYPE_CHECKING:
    from orchestrator.core.config import Profile
    from orchestrator.core.doctor import DoctorReport, DoctorRequest
    from orchestrator.core.schedulers.base import Job

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
notes = Console(stderr=True)  # what happens meanwhile; stdout carries the table or the JSON only
LIMIT_MIN = 10  # the job takes seconds; the limit bounds what a stuck collective costs
WAIT_FACTOR = 2  # the wait allows the job's time limit again for queueing and start
POLL_S = 1.0
STYLES = {"ok": "green", "warn": "bold yellow", "info": "dim"}


@app.command()
def doctor(
    profile: Annotated[str, typer.Option(help="cluster profile: a name in cluster_profiles/ or a YAML path")] = "local",
    nodes: Annotated[Optional[int], typer.Option(help="number of nodes (2 or more also measures across nodes)")] = None,
    account: Annotated[Optional[str], typer.Option(help="Slurm account (project id), e.g. OPEN-29-12")] = None,
    dry_run: Annotated[
        bool, typer.Option(help="print what the job would check, and its script; submit nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print doctor.json instead of the table")] = False,
) -> None:
    """Run a short job on the profile's nodes and report what a training run would find there."""
    from orchestrator.core.doctor import DOCTOR_FILE
    from orchestrator.core.loading import load_profile
    from orchestrator.core.preflight import check_partition

    overrides = [{"slurm": {"account": account}}] if account else []
    overrides += [{"nodes": nodes}] if nodes is not None else []
    path, resolved = load_profile(profile, overrides)
    resolved = resolved.model_copy(update={"time_limit_min": min(LIMIT_MIN, resolved.time_limit_min)})
    check_partition(resolved, path)
    request = doctor_request(path.stem, resolved)
    if dry_run:
        show_request(request, resolved)
        return
    report = run_doctor(resolved, request)
    if as_json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
        return
    (console if console.is_terminal else Console(width=150)).print(checks_table(report))  # a log keeps whole rows
    console.print(f"Report: {Path(request.folder) / DOCTOR_FILE}", highlight=False, soft_wrap=True)


def doctor_request(name: str, profile: "Profile") -> "DoctorRequest":
    from orchestrator.core.doctor import DoctorRequest, doctor_root
    from orchestrator.core.rundir import new_run_id
    from orchestrator.core.settings import runs_location, tracking_uri

    doctor_id = new_run_id("doctor")
    return DoctorRequest(
        doctor_id=doctor_id,
        profile=name,
        executor=profile.executor,
        device=profile.launch.device,
        backend=profile.launch.backend,
        nodes=profile.nodes,
        tasks_per_node=profile.launch.tasks_per_node,
        folder=str(doctor_root() / doctor_id),
        runs_dir=str(runs_location(profile)),
        tracking_uri=tracking_uri(profile.tracking_uri),
        job_tracking=profile.job_tracking,
        preemptible=profile.preemptible,
        wckey=profile.slurm.wckey if profile.slurm else None,
    )


def run_doctor(profile: "Profile", request: "DoctorRequest") -> "DoctorReport":
    """Queue the job, then wait for its report; a job that ends without one is an error naming its logs."""
    from jobs.doctor import DoctorJob
    from orchestrator.cli.submit import queue
    from orchestrator.core.schedulers.base import Job

    folder = Path(request.folder)
    folder.mkdir(parents=True)
    try:
        job_id = queue(profile, None, folder / "submitit", DoctorJob(request), f"orch doctor {request.doctor_id}")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    job = Job(profile.executor, job_id, time.time(), folder / "submitit")
    notes.print(
        f"Submitted doctor job {job_id} ({profile.executor}); its folder is {folder}", highlight=False, soft_wrap=True
    )
    return wait_for_report(folder, job, WAIT_FACTOR * profile.time_limit_min * 60)


def wait_for_report(folder: Path, job: "Job", wait_s: float) -> "DoctorReport":
    """doctor.json once rank 0 wrote it. A rank that failed ends the wait at once, and the job with it: the other
    ranks would wait for it in a collective until the time limit."""
    from orchestrator.core.doctor import DOCTOR_FILE, DoctorReport
    from orchestrator.core.runfiles import read_model
    from orchestrator.core.schedulers import cancel_job, job_alive

    logs, deadline = folder / "submitit" / job.job_id, time.time() + wait_s
    with notes.status(f"Waiting for job {job.job_id} (up to {wait_s / 60:.0f} min) ..."):
        while time.time() < deadline:
            alive = job_alive(job)  # asked before reading: a job that wrote its report and ended is no failure
            report = read_model(folder / DOCTOR_FILE, DoctorReport)
            if report is not None:
                return report
            error = rank_error(logs)
            if error or not alive:
                if alive:
                    cancel_job(job)
                raise OrchError(
                    f"The doctor job {job.job_id} failed without a report ({error or 'no rank reported an error'}). "
                    f"Its ranks' logs are in {logs} ({job.job_id}_0_log.err and _log.out are rank 0's)."
                )
            time.sleep(POLL_S)
    raise OrchError(
        f"The doctor job {job.job_id} has not reported within {wait_s / 60:.0f} min (still queued?). It goes on and "
        f"writes {folder / DOCTOR_FILE} when it runs."
    )


def rank_error(logs: Path) -> str | None:
    """'rank N: <the exception>' from the first result submitit wrote for a failed rank, if any."""
    import pickle

    for result in sorted(logs.glob("*_result.pkl")):
        outcome, value = pickle.loads(result.read_bytes())
        if outcome == "error":
            return f"rank {result.name.split('_')[-2]}: {value.strip().splitlines()[-1]}"
    return None


def checks_table(report: "DoctorReport") -> Table:
    request = report.request
    table = Table(
        "check",
        "status",
        Column("finding", overflow="fold"),
        title=f"orch doctor: profile {request.profile}, job {report.job_id}, {len(report.ranks)} ranks",
    )
    for check in report.checks:
        table.add_row(check.name, Text(check.status, style=STYLES[check.status]), Text(check.finding))
    return table


def show_request(request: "DoctorRequest", profile: "Profile") -> None:
    from orchestrator.cli.executors import job_script
    from orchestrator.core.doctor import DOCTOR_FILE, WRITE_MIB

    rows = [
        ("profile", f"{request.profile} ({request.executor})"),
        ("nodes × ranks per node", f"{request.nodes} × {request.tasks_per_node}, {request.device}/{request.backend}"),
        ("time limit", f"{profile.time_limit_min:g} min"),
        ("run directories measured", f"{request.runs_dir} ({WRITE_MIB[request.device]} MiB written per rank)"),
        ("tracking store", request.tracking_uri),
        ("report", str(Path(request.folder) / DOCTOR_FILE)),
    ]
    table = Table(
        "item", Column("value", overflow="fold"), title="orch doctor (dry run: nothing submitted)", show_header=False
    )
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    script = job_script(profile, None, Path(request.folder))
    if script is not None:
        console.print("[bold]sbatch script:[/]")
        console.print(script, markup=False, highlight=False, soft_wrap=True)
