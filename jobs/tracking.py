"""MLflow tracking: one MLflow run per orch run, across every job, requeue and resume.

Policy: metrics are held back until their checkpoint commits. Rank 0 appends every step's metrics to
`RUN_DIR/metrics.jsonl` at once (so `orch status` and the run directory are live), and a background thread
sends to MLflow the steps up to the newest committed checkpoint. A resume from step k drops the spooled
steps after k, so MLflow shows each step exactly once and never a step that was rolled back. A rollback to a
checkpoint older than what MLflow has (`orch rollback`) sets the MLflow run aside and sends the surviving steps to a
new one: MLflow cannot delete a metric's points. When the server is down, training goes on and the spool waits;
`orch sync RUN_ID` sends what is left. `RUN_DIR/mlflow.json` holds the MLflow run id and how far MLflow has the metrics.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from jobs.system_metrics import ALWAYS, metric_key, offset_through, read_from, spool_files
from orchestrator.core.config import Recipe
from orchestrator.core.corpus import cannot_validate
from orchestrator.core.errors import OrchError
from orchestrator.core.files import append_plain, write_atomic, write_json_atomic
from orchestrator.core.plan import Plan, make_plan
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import ROLLED_BACK, SPOOL, DamagedFile, MlflowState, read_model, spool_entries
from orchestrator.core.settings import EXPERIMENT

log = logging.getLogger(__name__)
BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch
VAL_SKIPPED = "orch.val_skipped"  # the tag of a run that cannot validate, with the reason
SET_ASIDE = "orch.rolled_back_to"  # the tag of an MLflow run set aside by a rollback: the step the run went back to
# MLflow 3's kind of a classic model-training experiment: without it, UIs that read the tag open the GenAI views
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# MLflow's run page lays out charts by metric name: the sections (a name's text before its last "/") first, then the
# unsectioned "Model metrics", each alphabetically. So its Model metrics tab gets the training curves, loss first
# (loss, lr, mfu, tokens_per_s, val_loss, val_perplexity), and the figures of how the job ran go to its System
# metrics tab as system/NAME; each job's goodput, one value at its last step, becomes the run's tags
# (docs/tracking.md). metrics.jsonl keeps every name as it is.
JOB_FIGURES = frozenset(
    {
        "grad_norm", "step_time_s", "data_wait_fraction", "checkpoint_stall_s", "eval_s", "tokens_per_s_per_rank",
        "peak_memory_gb", "skipped_steps",
    }
)  # fmt: skip
STRAGGLER = "straggler/"  # per-host step phases (jobs/stragglers.py): how the job ran, to the System metrics tab
SUMMARY = "goodput/"

# A tracking server that is down must fail fast: training must not wait on it.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def client_for(uri: str) -> Any:
    """An MLflow client of `uri` whose store exists. A new SQLite store is created under a lock beside it: jobs that
    start at once on a fresh store (a sweep's runs) would otherwise race through its schema migrations, and the
    losers fail."""
    import mlflow

    if uri.startswith("sqlite:///"):
        sqlite_store_ready(uri)
    return mlflow.MlflowClient(uri)


@functools.cache
def sqlite_store_ready(uri: str) -> None:
    """Once per process: the store's tables exist, made under the lock if this process is the first to use it. A new
    store starts as an empty file (an empty SQLite database) with the mode the umask gives it: SQLite would create it
    0644 whatever the umask, and the project group's other members could not write their runs' metrics to it."""
    import mlflow

    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mlflow.MlflowClient(uri).search_experiments(max_results=1)  # a new store's tables are made by its first use


class MetricSpool:
    """Append-only per-step metrics in the run directory (written by rank 0 only)."""

    def __init__(self, run_dir: Path) -> None:
        self.path, self.rolled_back = run_dir / SPOOL, run_dir / ROLLED_BACK

    def append(self, step: int, metrics: dict[str, float]) -> None:
        entry = {"step": step, "time_ms": int(time.time() * 1000), "metrics": metrics}
        append_plain(self.path, json.dumps(entry) + "\n")

    def entries(self) -> list[dict[str, Any]]:
        """Every readable entry (the next rollback drops a torn line from the file)."""
        return spool_entries(self.path)

    def rollback(self, step: int) -> None:
        """Forget steps after `step`: the run resumes from its checkpoint there. The forgotten steps move to
        rolled_back.jsonl first, where the goodput accounting finds the time they took."""
        entries = self.entries()
        dropped = "".join(json.dumps(e) + "\n" for e in entries if e["step"] > step)
        if dropped:
            append_plain(self.rolled_back, dropped)  # a crash before the rewrite repeats lines; readers skip repeats
        write_atomic(self.path, "".join(json.dumps(e) + "\n" for e in entries if e["step"] <= step))


def mlflow_key(key: str) -> str:
    """A spooled metric's name in MLflow (see JOB_FIGURES and STRAGGLER)."""
    return f"system/{key}" if key in JOB_FIGURES or key.startswith(STRAGGLER) else key


def spooled_key(key: str) -> str | None:
    """A metric of the MLflow run by its name in metrics.jsonl; None for the nodes' own (system/NODE/FIELD)."""
    if key.startswith("system/"):
        name = key.removeprefix("system/")
        return name if name in JOB_FIGURES or name.startswith(STRAGGLER) else None
    return key


def send(run_dir: Path, uri: str, through_step: int, params: dict[str, Any], tags: dict[str, str]) -> int:
    """Send spooled metrics up to `through_step` and the nodes' new system samples to MLflow, creating the MLflow run
    on first contact, and again where a rollback dropped steps it has (`went_back`). Returns the step MLflow now has
    everything through. Raises when the server cannot be reached."""
    import mlflow

    client = client_for(uri)
    state_path = run_dir / "mlflow.json"
    try:
        known = read_model(state_path, MlflowState)
    except DamagedFile as damage:
        log.warning("%s; finding the run's MLflow run by its orch.run_id tag", damage)
        known = None
    if known is not None and known.tracking_uri not in (None, uri):
        log.info("the run now reports to %s (it reported to %s)", uri, known.tracking_uri)
        known = None
    checked, back = went_back(run_dir, known)
    if known is not None and back is not None:
        log.info(
            "the run went back to step %d and MLflow run %s has its steps through %d: it is set aside (deleted in "
            "MLflow, where `mlflow runs restore` brings it back) and a new MLflow run gets the steps that stand",
            back, known.run_id, known.sent_through,
        )  # fmt: skip
        set_aside(client, known.run_id, back)
        tags = {**tags, "orch.replaces": known.run_id}
        known = None
    state = (
        known.model_dump() if known else {**find_or_create_run(client, uri, run_dir.name, params), "tracking_uri": uri}
    )
    recorded = known is not None and known.experiment_id is not None and known.rolled_back_checked == checked
    if state.get("experiment_id") is None:  # a file of an older version
        state["experiment_id"] = client.get_run(state["run_id"]).info.experiment_id
    state["rolled_back_checked"] = checked
    if not recorded:
        write_json_atomic(state_path, state)
    spooled = MetricSpool(run_dir).entries() if through_step > state["sent_through"] else []  # read only when due
    entries = [e for e in spooled if state["sent_through"] < e["step"] <= through_step]
    summaries = {k: f"{v:.6g}" for e in entries for k, v in e["metrics"].items() if k.startswith(SUMMARY)}  # newest
    if tags or summaries:
        client.log_batch(state["run_id"], tags=[mlflow.entities.RunTag(k, v) for k, v in {**tags, **summaries}.items()])
    metrics = [
        mlflow.entities.Metric(mlflow_key(key), float(value), e["time_ms"], e["step"])
        for e in entries
        for key, value in e["metrics"].items()
        if not key.startswith(SUMMARY)
    ]
    for i in range(0, len(metrics), BATCH):
        client.log_batch(state["run_id"], metrics=metrics[i : i + BATCH])
    if entries:
        state["sent_through"] = entries[-1]["step"]
        write_json_atomic(state_path, state)
    send_system(client, run_dir, state, state_path)
    return state["sent_through"]


def went_back(run_dir: Path, known: MlflowState | None) -> tuple[int, int | None]:
    """How many bytes of rolled_back.jsonl the sender has now looked through, and the step the run went back to where
    the steps a rollback dropped since (`MetricSpool.rollback`) include some MLflow has (None where they do not). Only
    a rollback to a checkpoint older than the newest one does that: MLflow is sent the committed steps only. Where
    `known` has not recorded how far it looked, the file's earlier rollbacks are taken as looked through."""
    path = run_dir / ROLLED_BACK
    size = path.stat().st_size if path.is_file() else 0
    if known is None or known.rolled_back_checked is None:
        return size, None
    dropped, checked = read_from(path, known.rolled_back_checked) if size > known.rolled_back_checked else ([], size)
    sent = [entry["step"] for entry in dropped if entry["step"] <= known.sent_through]
    return checked, min(sent) - 1 if sent else None


def set_aside(client: Any, mlflow_run_id: str, step: int) -> None:
    """An MLflow run holding steps that a rollback undid (their points cannot be deleted) leaves the runs MLflow
    shows: tagged with the step the run went back to, then deleted, which MLflow's `runs restore` undoes. Done once,
    also where a crash interrupted it."""
    if client.get_run(mlflow_run_id).info.lifecycle_stage == "active":
        client.set_tag(mlflow_run_id, SET_ASIDE, str(step))
        client.delete_run(mlflow_run_id)


def send_system(client: Any, run_dir: Path, state: dict[str, Any], state_path: Path) -> None:
    """Each node's system samples past what MLflow has (`jobs.system_metrics`), not held back for a checkpoint; each
    file's progress is recorded as soon as its samples are in."""
    import mlflow

    if state.get("system_sent") is None:
        state["system_sent"] = system_sent_in(client, state["run_id"], run_dir)
        write_json_atomic(state_path, state)
    for path in spool_files(run_dir):
        samples, offset = read_from(path, state["system_sent"].get(path.name, 0))
        metrics = [
            mlflow.entities.Metric(metric_key(path, key), value, sample["time_ms"], sample["step"])
            for sample in samples
            for key, value in sample["metrics"].items()
        ]
        for i in range(0, len(metrics), BATCH):
            client.log_batch(state["run_id"], metrics=metrics[i : i + BATCH])
        if offset != state["system_sent"].get(path.name, 0):
            state["system_sent"][path.name] = offset
            write_json_atomic(state_path, state)


def system_sent_in(client: Any, run_id: str, run_dir: Path) -> dict[str, int]:
    """How far an MLflow run found by its tag has each system file: through the newest sample of the file's node."""
    newest = functools.cache(
        lambda key: max((m.timestamp for m in client.get_metric_history(run_id, key)), default=None)
    )
    return {path.name: offset_through(path, newest(metric_key(path, ALWAYS))) for path in spool_files(run_dir)}


def find_or_create_run(client: Any, uri: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The MLflow run tagged with this orch run (mlflow.json lost or damaged) and the last step it has, or a new one
    with the run's parameters."""
    import mlflow

    experiment_id = training_experiment(client, uri)
    found = client.search_runs([experiment_id], filter_string=f"tags.`orch.run_id` = '{name}'", max_results=1)
    if found:
        history = client.get_metric_history(found[0].info.run_id, "loss")
        sent_through = max((m.step for m in history), default=0)
        return {"run_id": found[0].info.run_id, "sent_through": sent_through, "experiment_id": experiment_id}
    run = client.create_run(experiment_id, run_name=name, tags={"orch.run_id": name})
    flat = {k: v for section, value in params.items() for k, v in flatten(section, value).items()}
    items = [mlflow.entities.Param(k, v[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return {"run_id": run.info.run_id, "sent_through": 0, "system_sent": {}, "experiment_id": experiment_id}


def training_experiment(client: Any, uri: str) -> str:
    """The id of the experiment runs report to, created where it is new. It is of MLflow 3's classic model-training
    kind, which an experiment that an older orch created is given here."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return create_experiment(client, uri)
    if EXPERIMENT_KIND[0] not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def create_experiment(client: Any, uri: str) -> str:
    """An embedded SQLite store keeps its artifacts beside the database, not in the job's working directory."""
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def upload_artifacts(run_dir: Path, uri: str, files: list[Path]) -> None:
    """The resolved recipe and profile, the job script and the job logs, under `orch/` in the MLflow run."""

    run_id = mlflow_run_id(run_dir)
    if run_id is None:
        return
    client = client_for(uri)
    for path in files:
        if path.is_file():
            folder = "orch/logs" if path.suffix in (".out", ".err") else "orch"
            client.log_artifact(run_id, str(path), folder)


def mlflow_run_id(run_dir: Path) -> str | None:
    try:
        state = read_model(run_dir / "mlflow.json", MlflowState)
    except DamagedFile:
        return None
    return state.run_id if state else None


def flatten(prefix: str, data: Any) -> dict[str, str]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in flatten(f"{prefix}.{key}", value).items()}
    return {prefix: str(data)}


def describe(run: Run) -> tuple[dict[str, Any], dict[str, str]]:
    """The MLflow run's parameters (the resolved recipe and profile, steps, world size, the command line's
    overrides as `overrides.recipe.…` and `overrides.profile.…`) and tags, from the run directory: the same whether
    the job or `orch sync` creates the MLflow run. Parameters are fixed when the MLflow run is created; tags follow
    later changes (a schedule that `orch resume --beyond-schedule` extended)."""
    info, recipe = run.info, run.recipe()
    plan = make_plan(run.profile(), recipe, info.steps)
    params = {
        "recipe": yaml.safe_load((run.dir / "recipe.yaml").read_text()),
        "profile": yaml.safe_load((run.dir / "profile.yaml").read_text()),
        "run": {"steps": plan.steps, "world_size": plan.world_size, "grad_accum": plan.grad_accum},
    }
    if info.overrides:
        params["overrides"] = dict(text.split("=", 1) for text in info.overrides)
    tags = {
        "orch.job_ids": ",".join(j.job_id for j in run.jobs),
        "orch.profile": info.profile,
        "orch.recipe": info.recipe,
        "orch.git_commit": info.git_commit or "unknown",
    }
    if info.sweep:
        tags["orch.sweep"] = info.sweep
    if info.beyond_schedule:
        tags["orch.beyond_schedule"] = f"{info.beyond_schedule} (schedule.total_steps {recipe.schedule.total_steps})"
    if problem := validation_problem(run, recipe, plan):
        tags[VAL_SKIPPED] = problem
    return params, tags


def validation_problem(run: Run, recipe: Recipe, plan: Plan) -> str | None:
    """Why the run gets no val_loss (`cannot_validate` of its val splits), for the MLflow run that would otherwise
    just lack it; None where it validates, has no `eval`, or its data cannot be read here (the job's log says it)."""
    if recipe.eval is None:
        return None
    from jobs.data import load_val_blocks  # torch: imported where a run is described, not by every `orch` command

    try:
        tokens = {name: blocks.tokens for name, blocks in load_val_blocks(run.data_dir).items()}
    except (OrchError, OSError) as err:
        log.warning("cannot tell whether run %s validates: %s", run.id, err)
        return None
    return cannot_validate(tokens, recipe.eval.blocks, plan.world_size, plan.micro_batch, recipe.data.max_seq_len)


def artifacts(run: Run, job_id: str, logs: bool = False) -> list[Path]:
    """What the MLflow run keeps of a job: the resolved recipe and profile, the job script, at the end the logs."""
    files = [run.dir / "recipe.yaml", run.dir / "profile.yaml", run.submitit_dir / job_id / f"{job_id}_submission.sh"]
    return files + (sorted((run.submitit_dir / job_id).glob("*_log.*")) if logs else [])


class Tracker:
    """Rank 0's link to MLflow: spools every step and, where the job sends to the store itself (`uri` given), sends
    committed steps from a background thread. Without `uri` the job writes only the spool, and `orch sync
    --follow` (or `orch ui`) on the login node is the store's single writer."""

    def __init__(
        self,
        run_dir: Path,
        uri: str | None,
        params: dict[str, Any],
        tags: dict[str, str],
        committed: Callable[[], int | None],
    ) -> None:
        self.run_dir, self.uri, self.params, self.tags, self.committed = run_dir, uri, params, tags, committed
        self.spool = MetricSpool(run_dir)
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.outage_reported = False
        self.sent_through: int | None = None
        self.thread = threading.Thread(target=self._loop, name="mlflow", daemon=True)
        if uri:
            self.thread.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Spool the step; wake the sender only when a newer checkpoint has committed since it last sent."""
        self.spool.append(step, metrics)
        committed = self.committed()
        if self.uri and committed is not None and (self.sent_through is None or committed > self.sent_through):
            self.wake.set()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(timeout=15)
            self.wake.clear()
            self.flush()

    def flush(self, through: int | None = None) -> None:
        """Send the steps through `through` (default: the newest committed checkpoint) and the new system samples;
        before the MLflow run is first reached, only once a step is due."""
        through = self.committed() if through is None else through
        if not self.uri or (through is None and self.sent_through is None):
            return
        try:
            through = max(through or 0, self.sent_through or 0)
            self.sent_through = send(self.run_dir, self.uri, through, self.params, self.tags)
            self.tags = {}
            if self.outage_reported:
                log.info("tracking server %s reachable again; spooled metrics sent", self.uri)
            self.outage_reported = False
        except Exception as err:  # noqa: BLE001 - any failure to reach MLflow leaves the metrics spooled
            if not self.outage_reported:
                log.warning(
                    "tracking server %s unreachable (%s); metrics stay spooled in the run directory", self.uri, err
                )
            self.outage_reported = True

    def stop(self) -> None:
        """Stop the sender without waiting for it: the spool keeps what it has not sent, for the next job."""
        self.stopping.set()
        self.wake.set()

    def close(self, status: str, artifacts: list[Path]) -> None:
        """Stop the thread, send what is committed, upload the artifacts and mark the MLflow run's status."""
        if not self.uri:
            return
        self.stop()
        self.thread.join()
        self.flush()
        if not self.outage_reported:
            finish_run(self.run_dir, self.uri, status, artifacts)


def finish_run(run_dir: Path, uri: str, status: str, artifacts: list[Path]) -> None:
    """Upload the artifacts and mark the MLflow run's status (best effort: the files stay in the run directory)."""
    run_id = mlflow_run_id(run_dir)
    if run_id is None:
        return

    try:
        upload_artifacts(run_dir, uri, artifacts)
        client_for(uri).set_terminated(run_id, status=status)
    except Exception as err:  # noqa: BLE001 - best effort: the files stay in the run directory
        log.warning("could not finish the MLflow run (artifacts, status): %s", err)
