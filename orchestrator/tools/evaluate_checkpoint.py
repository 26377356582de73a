"""`orch eval`: a run's checkpoint scored on downstream tasks with lm-evaluation-harness (docs/eval.md).

The checkpoint is exported (`orchestrator.tools.export`) to a temporary Hugging Face model directory inside the run's
evals/ folder (the filesystem that holds the checkpoints has room for one more copy; /tmp on a node may not), lm-eval
scores it there, and the scores go to `evals/step_K.json` and, as `eval/<task>/<metric>` at step K, to the run's
MLflow run. `follow_milestones` does that for each milestone of a run as it commits (`orch eval --every K`). A killed
evaluation leaves its export behind (gigabytes at 1.2B): the next one, or `orch repair`, removes it. lm-eval is
imported only here, and only when an evaluation runs.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.tracking import BATCH
from orchestrator.core.checkpoints import committed_steps
from orchestrator.core.errors import OrchError
from orchestrator.core.evals import (
    EVALS,
    EXPORT_PREFIX,
    EXPORTS,
    TASKS_DIR,
    CheckpointEval,
    EvalsSent,
    TaskScores,
    due_milestones,
    eval_file,
    eval_files,
    local_tasks,
    metric_key,
    scored_steps,
    sent_file,
)
from orchestrator.core.files import abandoned, temporary_folder, write_json_atomic
from orchestrator.core.rundir import TERMINAL_STATES, Run
from orchestrator.core.runfiles import DamagedFile, MlflowState, read_model
from orchestrator.core.schedulers import rank_started
from orchestrator.tools.export import CheckpointUnavailable, choose_step, export_run

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)
# Tasks read their data from local files or the Hugging Face cache, never from the hub: compute nodes have no
# internet, and a test must not download. Set either to 0 to let lm-eval's built-in tasks download their data.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
BATCH_SIZE = {"cpu": 8, "cuda": "auto"}  # lm-eval finds the largest batch that fits the GPU
DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
FOLLOW_POLL_S = 5.0  # how often a follower looks for a new checkpoint: a step of a real run takes longer


def task_manager(tasks: list[str]) -> TaskManager:
    """lm-eval's index of the tasks: orch's local ones (evals/tasks/), and lm-eval's built-in ones only where a name is
    not local (indexing its ~14,000 task files takes seconds). A name neither knows is refused before anything is
    written; one that no built-in task file even mentions, without indexing them."""
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)  # read when huggingface_hub is first imported
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise OrchError(
            "orch eval needs lm-evaluation-harness, which is not installed in this environment "
            f"({sys.prefix}): install orch's eval extra, e.g. `pip install -e '.[eval]'` in the checkout."
        )
    local = local_tasks()
    builtin = [name for name in tasks if name not in local]
    unknown = unmentioned(builtin, Path(spec.origin).parent / "tasks")
    if not unknown:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(builtin))
        unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise OrchError(
            f"Option --tasks names {', '.join(map(repr, unknown))}, which is neither a local task (evals/tasks/: "
            f"{', '.join(local) or 'none'}) nor a task, group or tag of lm-evaluation-harness (`lm-eval ls tasks` "
            "lists those; they read their data from the Hugging Face cache, docs/eval.md). Nothing was evaluated."
        )
    return manager


def unmentioned(names: list[str], folder: Path) -> list[str]:
    """The names that occur in none of the task files under `folder`: lm-eval takes every name from them."""
    left = set(names)
    for path in folder.rglob("*.yaml") if left else ():
        text = path.read_bytes()
        left = {name for name in left if name.encode() not in text}
        if not left:
            break
    return [name for name in names if name in left]


def evaluate(
    run: Run, step: int | None, tasks: list[str], limit: int | None, device: str | None, job_id: str | None = None
) -> CheckpointEval:
    """Score the checkpoint of `step` (default: the newest committed one) on `tasks`, on `device` (None: this
    machine's GPU if it has one, else its CPU), and record the scores in evals/step_K.json; returns that file's
    content. Refusals (a step or task that does not exist) come before anything is written."""
    chosen = choose_step(run, step, "evaluate")
    manager = task_manager(tasks)
    import lm_eval
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    folder = run.dir / EVALS
    folder.mkdir(exist_ok=True)
    for left in abandoned(folder, EXPORTS, remove=True):
        log.warning("removed %s, the model an evaluation that was killed exported", left)
    with temporary_folder(folder, EXPORT_PREFIX.format(step=chosen)) as model_dir:
        export_run(run, chosen, model_dir)
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "device": device, "dtype": DTYPE[device]},
            tasks=tasks,
            limit=limit,
            batch_size=BATCH_SIZE[device],
            task_manager=manager,
            log_samples=False,
        )
    finished = time.time()
    samples = results.get("n-samples", {})
    scores = {
        task: TaskScores(
            metrics=lm_eval_metrics(values),
            samples=samples.get(task, {}).get("effective"),
            limit=limit,
            finished=finished,
            device=device,
            lm_eval_version=lm_eval.__version__,
            job_id=job_id,
            asked=tasks,
        )
        for task, values in results["results"].items()
    }
    return record(run, chosen, scores)


@dataclass(frozen=True)
class Milestone:
    """One milestone a follower handled: its scores, or why its checkpoint could not be scored."""

    step: int
    scores: CheckpointEval | None
    problem: str | None = None


def follow_milestones(
    run: Run, every: int, tasks: list[str], limit: int | None, device: str | None, job_id: str | None = None
) -> Iterator[Milestone]:
    """Score each committed checkpoint whose step is a multiple of `every`, and the final one, that evals/ has no score
    of for `tasks` at `limit`, oldest first, as soon as it commits; return once the run has reached a terminal state
    and every milestone it committed is scored. A checkpoint deleted or damaged before it is scored is yielded with
    the reason and left; the others are still scored."""
    left: set[int] = set()
    while True:
        ended = run.state() in TERMINAL_STATES  # asked first: whatever committed before the end is listed below
        scored = scored_steps(run.dir, tasks, limit) | left
        due = due_milestones(committed_steps(run.checkpoints_dir), every, run.info.steps, scored)
        if not due:
            if ended:
                return
            time.sleep(FOLLOW_POLL_S)
            continue
        try:
            milestone = Milestone(due[0], evaluate(run, due[0], tasks, limit, device, job_id))
        except OrchError as err:
            if not isinstance(err, CheckpointUnavailable) and due[0] in committed_steps(run.checkpoints_dir):
                raise
            left.add(due[0])  # deleted between the listing and the export (retention), or damaged
            milestone = Milestone(due[0], None, str(err))
        yield milestone


def lm_eval_metrics(values: dict[str, Any]) -> dict[str, float]:
    """A task's numeric results under orch's names: "acc,none" is "acc", "exact_match,strict-match" is
    "exact_match/strict-match"; entries without a filter (alias, sample_len) and values that are no number (lm-eval's
    "N/A" stderr) are left out."""
    metrics = {}
    for key, value in values.items():
        name, comma, selection = key.partition(",")
        if comma and isinstance(value, int | float) and math.isfinite(value):
            metrics[name if selection == "none" else f"{name}/{selection}"] = float(value)
    return metrics


def record(run: Run, step: int, scores: dict[str, TaskScores]) -> CheckpointEval:
    """Add the scores to evals/step_K.json, replacing those of the same tasks; under the run's lock, so that two
    evaluations of one checkpoint that finish together both stay."""
    path = eval_file(run.dir, step)
    with run.lock():
        try:
            before = read_model(path, CheckpointEval)
        except DamagedFile as damage:
            log.warning("%s; its scores are replaced by these", damage)
            before = None
        merged = CheckpointEval(step=step, tasks={**(before.tasks if before else {}), **scores})
        write_json_atomic(path, merged.model_dump(mode="json"))
    return merged


def mlflow_run_of(run: Run) -> str | None:
    """The run's MLflow run in the store it reports to now; None before one exists there."""
    try:
        state = read_model(run.dir / "mlflow.json", MlflowState)
    except DamagedFile:
        return None
    if state is None or state.tracking_uri not in (None, run.tracking_uri):
        return None
    return state.run_id


def send_evals(run: Run) -> int:
    """Send the scores of evals/ that the run's MLflow run does not have yet, as `eval/<task>/<metric>` at the
    checkpoint's step; returns how many metrics were sent. Each score carries its evaluation's time as timestamp, so
    sending it twice (a crash before the record) stores it once. Nothing is sent before the MLflow run exists: the
    training job or `orch sync` creates it, and `orch sync` sends the scores then. Raises when the store is down."""
    files = eval_files(run.dir)
    mlflow_run = mlflow_run_of(run) if files else None
    if mlflow_run is None:
        return 0
    import mlflow

    client, count = mlflow.MlflowClient(run.tracking_uri), 0
    for step, path in files.items():
        try:
            scores, sent = read_model(path, CheckpointEval), read_model(sent_file(run.dir, step), EvalsSent)
        except DamagedFile as damage:
            log.warning("%s; its scores are not sent", damage)
            continue
        done = sent.finished if sent is not None and sent.mlflow_run_id == mlflow_run else {}
        due = {task: s for task, s in scores.tasks.items() if done.get(task) != s.finished}
        metrics = [
            mlflow.entities.Metric(metric_key(task, name), value, int(s.finished * 1000), step)
            for task, s in due.items()
            for name, value in s.metrics.items()
        ]
        for i in range(0, len(metrics), BATCH):
            client.log_batch(mlflow_run, metrics=metrics[i : i + BATCH])
        if due:
            now_sent = EvalsSent(mlflow_run_id=mlflow_run, finished={**done, **{t: s.finished for t, s in due.items()}})
            write_json_atomic(sent_file(run.dir, step), now_sent.model_dump())
        count += len(metrics)
    return count


def report(run: Run) -> str:
    """Send the scores where the run's profile lets this process write the store (`job_tracking: direct`); else they
    wait in evals/ for `orch sync`, the store's single writer. One line on where they went."""
    if run.profile().job_tracking != "direct":
        return "The run's profile spools (job_tracking: spool): `orch sync` (or `orch ui`) sends the scores to MLflow."
    try:
        sent = send_evals(run)
    except Exception as err:  # noqa: BLE001 - a store outage leaves the scores in evals/ for `orch sync`
        return f"MLflow ({run.tracking_uri}) unreachable ({err}); `orch sync {run.id}` sends the scores later."
    mlflow_run = mlflow_run_of(run)
    if mlflow_run is None:
        return f"The run has no MLflow run yet; `orch sync {run.id}` creates it and sends the scores."
    return f"MLflow run {mlflow_run}: {sent} metrics sent."


@dataclass(frozen=True)
class EvalJob:
    """What an eval job runs (submitit pickles it): one process, on the profile's device. With `every` it follows the
    run and scores its milestones as they commit (`follow_milestones`)."""

    run_dir: Path
    step: int | None  # None: the newest committed checkpoint when the job starts (after training: the final one)
    tasks: tuple[str, ...]
    limit: int | None
    device: str
    every: int | None = None

    def __call__(self) -> str:
        import submitit

        rank_started()
        run = Run(self.run_dir)
        job_id = str(submitit.JobEnvironment().job_id)
        if self.every is None:
            done = evaluate(run, self.step, list(self.tasks), self.limit, self.device, job_id)
            where = report(run)
            print(f"Scores of step {done.step} in {eval_file(run.dir, done.step)}. {where}", flush=True)
            return where
        scored = []
        for milestone in follow_milestones(run, self.every, list(self.tasks), self.limit, self.device, job_id):
            if milestone.scores is None:
                print(f"Step {milestone.step} not scored: {milestone.problem}", flush=True)
                continue
            scored.append(milestone.step)
            print(f"Scores of step {milestone.step} in {eval_file(run.dir, milestone.step)}. {report(run)}", flush=True)
        return f"Run {run.id} ended ({run.state()}); milestones scored by this job: {scored or 'none'}."

    def checkpoint(self) -> Any:
        """At its time limit submitit requeues the job with this (a follower is queued with requeues to spare:
        training outlasts one allocation); the next start goes on from what evals/ holds."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)
