"""`orch repair RUN`: what is wrong with a run directory, and the repairs that other files make possible.

Each run file is checked through its model. What can be rebuilt is rebuilt from what the run still has:
- a checkpoint whose commit marker is unreadable or whose files do not match it is set aside (`damaged_step_N`);
- checkpoints/latest.json from the checkpoint folders that carry a commit marker;
- jobs.json from the job folders submitit keeps (`submitit/<job id>/`), with the profile's executor;
- metrics.jsonl: unreadable lines are dropped; when it is gone, it is rebuilt from the run's MLflow run;
- mlflow.json from the MLflow run tagged with the run's id;
- progress.json and attempts.json, which the next job writes again, are set aside (renamed *.damaged);
- the models killed evaluations exported into evals/ are removed.
run.json, profile.yaml and recipe.yaml say what was asked, the frozen code (checked against its manifest) what ran,
data/fingerprint.json what was trained on: they are reported, never guessed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.tracking import MetricSpool, find_or_create_run, spooled_key
from orchestrator.core import checkpoints
from orchestrator.core.config import Profile, Recipe
from orchestrator.core.errors import OrchError
from orchestrator.core.evals import EVALS, EXPORTS
from orchestrator.core.files import abandoned, write_atomic, write_json_atomic
from orchestrator.core.loading import validate
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import (
    FINGERPRINT,
    MIXTURE,
    SKIPS,
    Attempt,
    DamagedFile,
    DataFingerprint,
    JobRecord,
    MixChange,
    MlflowState,
    Progress,
    RunInfo,
    Skip,
    read_model,
)
from orchestrator.core.schedulers import scheduler_of
from orchestrator.core.yamlio import read_yaml


@dataclass(frozen=True)
class Finding:
    file: str
    state: str  # "ok", "missing", "damaged", "repaired", "set aside", "left alone", "left over", "removed"
    detail: str = ""


def repair(run: Run, fix: bool) -> list[Finding]:
    """Check every run file; with `fix`, repair what can be repaired. Returns what was found and done."""
    findings = [check_yaml(run.dir / "profile.yaml", Profile), check_yaml(run.dir / "recipe.yaml", Recipe)]
    findings.append(check(run.dir / "run.json", RunInfo, None, "what was asked: restore it from a backup"))
    findings.append(repair_jobs(run, fix))
    findings.extend(repair_checkpoints(run, fix))
    findings.append(repair_latest(run, fix))
    findings.append(repair_metrics(run, fix))
    findings.append(repair_mlflow(run, fix))
    for name, model in (("progress.json", Progress), ("attempts.json", list[Attempt])):
        findings.append(set_aside(run.dir / name, model, fix))
    for name, model in ((SKIPS, list[Skip]), (MIXTURE, list[MixChange])):
        findings.append(check(run.dir / name, model, None, "what was asked (rollbacks, --weights): fix it by hand"))
    findings.append(check_code(run))
    fingerprint_fix = "delete it, and the next resume records the data as it is then"
    findings.append(check(run.data_dir / FINGERPRINT, DataFingerprint, None, fingerprint_fix))
    findings.extend(remove_abandoned_exports(run, fix))
    return findings


def check(path: Path, model: object, fixable: str | None, otherwise: str) -> Finding:
    try:
        found = read_model(path, model)
    except DamagedFile as damage:
        return Finding(path.name, "damaged", f"{damage.why}; {fixable or otherwise}")
    return Finding(path.name, "ok" if found is not None else "missing")


def check_code(run: Run) -> Finding:
    """The frozen code against its manifest, reported only: restoring the file and taking the checkout's code instead
    (`orch resume --update-code`) are the user's choice."""
    problem = run.code_damage()
    if problem:
        return Finding("code/", "damaged", problem)
    return Finding("code/", "ok" if run.code_dir.is_dir() else "missing")


def remove_abandoned_exports(run: Run, fix: bool) -> list[Finding]:
    """The models that killed evaluations exported into evals/ (gigabytes each at 1.2B); one in use is left alone."""
    state, what = ("removed", "") if fix else ("left over", "; it would be removed")
    return [
        Finding(f"{EVALS}/{path.name}", state, f"the model an evaluation that was killed exported{what}")
        for path in abandoned(run.dir / EVALS, EXPORTS, remove=fix)
    ]


def check_yaml(path: Path, schema: type) -> Finding:
    try:
        validate(path, schema, read_yaml(path))
    except (OrchError, OSError) as err:
        return Finding(path.name, "damaged", f"{err}; it says what was asked: restore it by hand")
    return Finding(path.name, "ok")


def repair_jobs(run: Run, fix: bool) -> Finding:
    found = check(run.dir / "jobs.json", list[JobRecord], "rebuilt from the job folders under submitit/", "")
    if found.state != "damaged" or not fix:
        return found
    executor = read_yaml(run.dir / "profile.yaml").get("executor", "local")
    scheduler = scheduler_of(executor)
    folders = [p for p in run.submitit_dir.glob("*") if p.is_dir() and scheduler.job_id_problem(p.name) is None]
    jobs = [
        JobRecord(job_id=p.name, executor=executor, submitted=p.stat().st_mtime)
        for p in sorted(folders, key=lambda p: p.stat().st_mtime)
    ]
    write_json_atomic(run.dir / "jobs.json", [job.model_dump() for job in jobs])
    return Finding("jobs.json", "repaired", f"{len(jobs)} jobs from submitit/ ({executor})")


def repair_checkpoints(run: Run, fix: bool) -> list[Finding]:
    """Every committed checkpoint whose commit marker is unreadable, or whose files are missing or of other sizes
    than it lists (checksums are the job's to check: gigabytes each), is set aside as `damaged_step_N`."""
    findings = []
    for step in checkpoints.committed_steps(run.checkpoints_dir):
        folder = checkpoints.step_dir(run.checkpoints_dir, step)
        problem = checkpoints.damage(folder, checksums=False)
        if problem is None:
            continue
        name = f"checkpoints/{folder.name}"
        if not fix:
            findings.append(Finding(name, "damaged", f"{problem}; it would be set aside"))
            continue
        aside = checkpoints.set_aside(run.checkpoints_dir, step, "damaged")
        findings.append(Finding(name, "set aside", f"{problem}; renamed {aside.name}"))
    return findings


def repair_latest(run: Run, fix: bool) -> Finding:
    path = run.checkpoints_dir / checkpoints.LATEST
    steps = checkpoints.committed_steps(run.checkpoints_dir)
    found = check(path, checkpoints.Latest, "rebuilt from the committed checkpoint folders", "")
    try:
        named = checkpoints.read_latest(run.checkpoints_dir)
    except DamagedFile:
        named = None
    stale = named is not None and named.step not in steps
    if found.state == "ok" and not stale:
        return found
    if not steps and stale:
        return Finding(
            path.name,
            "damaged",
            f"names step {named.step}, set aside, and no committed checkpoint is left: the next job stops rather than "
            f"train from step 0; `orch resume {run.id} --from-scratch` trains from step 0",
        )
    if not steps:
        return Finding(path.name, found.state, "no committed checkpoint folder to name")
    detail = f"names step {steps[0]}, the newest committed folder"
    if not fix:
        return Finding(path.name, "damaged" if stale else found.state, f"would be rebuilt: {detail}")
    checkpoints.write_latest(run.checkpoints_dir, steps[0])
    return Finding(path.name, "repaired", detail)


def repair_metrics(run: Run, fix: bool) -> Finding:
    spool = MetricSpool(run.dir)
    if spool.path.is_file():
        lines = spool.path.read_text(errors="replace").splitlines()
        entries = spool.entries()
        bad = len(lines) - len(entries)
        if not bad:
            return Finding(spool.path.name, "ok")
        if not fix:
            return Finding(spool.path.name, "damaged", f"{bad} unreadable lines; they would be dropped")
        write_atomic(spool.path, "".join(json.dumps(e) + "\n" for e in entries))
        return Finding(spool.path.name, "repaired", f"{bad} unreadable lines dropped, {len(entries)} steps kept")
    if not fix:
        return Finding(spool.path.name, "missing", "would be rebuilt from the run's MLflow run")
    try:
        count = rebuild_metrics_from_mlflow(run)
    except Exception as err:  # noqa: BLE001 - the store may be unreachable: say so, change nothing
        return Finding(spool.path.name, "missing", f"MLflow at {run.tracking_uri} could not be read: {err}")
    return Finding(spool.path.name, "repaired" if count else "missing", f"{count} steps from MLflow")


def rebuild_metrics_from_mlflow(run: Run) -> int:
    import mlflow

    state = run.mlflow
    if state is None:
        return 0
    client = mlflow.MlflowClient(run.tracking_uri)
    keys = {k: spooled for k in client.get_run(state.run_id).data.metrics if (spooled := spooled_key(k))}
    by_step: dict[int, dict] = {}
    for key, spooled in keys.items():
        for metric in client.get_metric_history(state.run_id, key):
            entry = by_step.setdefault(metric.step, {"step": metric.step, "time_ms": metric.timestamp, "metrics": {}})
            entry["metrics"][spooled] = metric.value
    write_atomic(MetricSpool(run.dir).path, "".join(json.dumps(by_step[s]) + "\n" for s in sorted(by_step)))
    return len(by_step)


def repair_mlflow(run: Run, fix: bool) -> Finding:
    found = check(run.dir / "mlflow.json", MlflowState, "found again by the run's orch.run_id tag", "")
    if found.state != "damaged" or not fix:
        return found
    import mlflow

    try:
        client = mlflow.MlflowClient(run.tracking_uri)
        found_run = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`orch.run_id` = '{run.id}'",
            max_results=1,
        )
    except Exception as err:  # noqa: BLE001 - an unreachable store leaves the file as it is
        return Finding("mlflow.json", "damaged", f"MLflow at {run.tracking_uri} could not be read: {err}")
    if not found_run:
        (run.dir / "mlflow.json").rename(run.dir / "mlflow.json.damaged")
        return Finding("mlflow.json", "set aside", "no MLflow run has this run's tag; the next job creates one")
    state = find_or_create_run(client, run.tracking_uri, run.id, {})
    write_json_atomic(run.dir / "mlflow.json", state)
    return Finding("mlflow.json", "repaired", f"MLflow run {state['run_id']}, metrics through {state['sent_through']}")


def set_aside(path: Path, model: object, fix: bool) -> Finding:
    found = check(path, model, "set aside; the next job writes it again", "")
    if found.state != "damaged" or not fix:
        return found
    path.rename(path.with_name(f"{path.name}.damaged-{int(time.time())}"))
    return Finding(path.name, "set aside", "the next job writes it again")
