"""`orch eval`: a run's checkpoint scored on downstream tasks with lm-evaluation-harness, in this process or in a job
queued on a profile's nodes, after the run's training job with --after-training (docs/eval.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.core.errors import OrchError

if TYPE_CHECKING:
    from orchestrator.core.config import Profile
    from orchestrator.core.evals import CheckpointEval, TaskScores
    from orchestrator.core.rundir import Run
    from orchestrator.core.runfiles import JobRecord
    from orchestrator.tools.evaluate_checkpoint import EvalJob

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
notes = Console(stderr=True)  # what happens meanwhile; stdout carries the scores
EVAL_TIME_LIMIT_MIN = 120  # an eval job's limit (or the profile's, if shorter): minutes for a 1.2B model on a GPU
POLL_S = 2.0


@app.command("eval")
def eval_command(
    run_id: Annotated[str, typer.Argument(help="the run whose checkpoint is scored")],
    tasks: Annotated[
        str, typer.Option(help="comma-separated tasks: local ones (evals/tasks/, e.g. czech_cloze) or lm-eval's own")
    ],
    step: Annotated[Optional[int], typer.Option(help="the checkpoint's step; the latest when left out")] = None,
    limit: Annotated[Optional[int], typer.Option(help="score only the first N documents of each task")] = None,
    profile: Annotated[
        Optional[str], typer.Option(help="evaluate in a job on this profile's nodes instead of in this process")
    ] = None,
    account: Annotated[Optional[str], typer.Option(help="Slurm account (project id) of the job")] = None,
    after_training: Annotated[
        bool,
        typer.Option(help="queue the job to start when the run's training job has completed; it scores the final step"),
    ] = False,
    wait: Annotated[bool, typer.Option(help="follow a queued job to its end and print its scores")] = False,
    dry_run: Annotated[bool, typer.Option(help="check everything and print the job script; evaluate nothing")] = False,
) -> None:
    """Score a run's checkpoint on downstream tasks; the scores go to RUN_DIR/evals/step_K.json and to the run's
    MLflow run as eval/TASK/METRIC at step K."""
    from orchestrator.core.rundir import get_run

    run = get_run(run_id)
    names = task_names(tasks)
    if limit is not None and limit < 1:
        raise OrchError(f"Option --limit is {limit}. Allowed: a number of documents per task, 1 or more.")
    if after_training and step is not None:
        raise OrchError(
            f"Options --after-training and --step {step} exclude each other: after training the job scores the final "
            f"checkpoint. Score step {step} now with `orch eval {run.id} --step {step} --tasks {tasks}`."
        )
    if profile is None and not after_training:
        evaluate_here(run, step, names, limit, dry_run)
    else:
        queue_eval(run, step, names, limit, profile, account, after_training, wait, dry_run)


def task_names(tasks: str) -> list[str]:
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise OrchError(f"Option --tasks is {tasks!r}. Allowed: task names separated by commas, e.g. czech_cloze.")
    return list(dict.fromkeys(names))


def evaluate_here(run: Run, step: int | None, names: list[str], limit: int | None, dry_run: bool) -> None:
    """In this process, on its GPU if it has one, else on the CPU."""
    from orchestrator.tools.evaluate_checkpoint import evaluate, report, task_manager
    from orchestrator.tools.export import choose_step

    if dry_run:
        chosen = choose_step(run, step, "evaluate")
        task_manager(names)
        console.print(f"Dry run: this process would score run {run.id} at step {chosen} on {', '.join(names)}.")
        return
    scores = evaluate(run, step, names, limit, None)
    newest = max(s.finished for s in scores.tasks.values())
    show_scores(run, scores, {task: s for task, s in scores.tasks.items() if s.finished == newest})
    console.print(report(run), highlight=False, soft_wrap=True)


def queue_eval(
    run: Run,
    step: int | None,
    names: list[str],
    limit: int | None,
    profile_name: str | None,
    account: str | None,
    after_training: bool,
    wait: bool,
    dry_run: bool,
) -> None:
    """A job of one process on the profile's nodes; with `after_training`, one that starts when the run's training job
    has completed."""
    from orchestrator.cli.submit import queue
    from orchestrator.core.evals import EVALS
    from orchestrator.core.preflight import check_partition
    from orchestrator.core.runfiles import JobRecord
    from orchestrator.tools.evaluate_checkpoint import EvalJob, task_manager
    from orchestrator.tools.export import choose_step

    name, path, base = chosen_profile(run, profile_name, account)
    after = training_job(run, base) if after_training else None
    chosen = None if after_training else choose_step(run, step, "evaluate")  # scores what is committed now
    task_manager(names)
    if after is not None and not dry_run:
        after = still_training(run, after)
    resolved = job_profile(base, after.job_id if after else None)
    check_partition(resolved, path)
    job = EvalJob(run.dir, chosen, tuple(names), limit, resolved.launch.device)
    folder = run.dir / EVALS / "submitit"
    if dry_run:
        show_job(run, job, resolved, name, after, folder)
        return
    job_id = queue(resolved, None, folder, job, f"orch eval {run.id}")
    what = f"the final checkpoint once job {after.job_id} has completed" if after else f"step {chosen}"
    console.print(
        f"Submitted eval job {job_id} ({resolved.executor}): run {run.id}, {what}, tasks {', '.join(names)}. "
        f"Its logs: {folder / job_id}",
        highlight=False,
        soft_wrap=True,
    )
    if wait:
        follow_job(run, JobRecord(job_id=job_id, executor=resolved.executor, submitted=time.time()))


def chosen_profile(run: Run, name: str | None, account: str | None) -> tuple[str, Path, Profile]:
    """The named profile, else the one the run trains with: its name, its file and its fields."""
    from orchestrator.core.config import Profile, load_profile, merge_all, read_yaml, validate

    overrides = [{"slurm": {"account": account}}] if account else []
    if name:
        path, profile = load_profile(name, overrides)
        return path.stem, path, profile
    path = run.dir / "profile.yaml"
    return run.info.profile, path, validate(path, Profile, merge_all(read_yaml(path), overrides))


def training_job(run: Run, profile: Profile) -> JobRecord:
    """The run's newest training job, which a Slurm dependency can name."""
    jobs = run.jobs
    if not jobs:
        raise OrchError(f"Run {run.id} has no training job to wait for (jobs.json lists none).")
    job = jobs[-1]
    if job.executor != "slurm" or profile.executor != "slurm":
        raise OrchError(
            f"--after-training makes the eval job a Slurm dependency of run {run.id}'s training job {job.job_id}, "
            f"which runs under the {job.executor} executor, and the eval job would run under the {profile.executor} "
            f"one. Both must be Slurm's. Locally, follow the run to its end (`orch submit --wait`, `orch status "
            f"{run.id}`) and then run `orch eval {run.id} --tasks ...`."
        )
    return job


def still_training(run: Run, job: JobRecord) -> JobRecord | None:
    """The training job while the scheduler has it; None when it has ended and the run completed (then the eval job
    waits for nothing). A run whose training ended otherwise is refused: an afterok dependency on it never holds."""
    from orchestrator.core.scheduler import job_alive

    if job_alive(job):
        return job
    state = run.state(False)
    if state == "completed":
        return None
    raise OrchError(
        f"Run {run.id}'s training job {job.job_id} has ended and the run is {state}, not completed: there is no final "
        f"checkpoint to wait for. Score a committed one with `orch eval {run.id} --step K --tasks ... --profile P`, "
        f"or resume the run (`orch resume {run.id}`) and ask again."
    )


def job_profile(profile: Profile, after: str | None) -> Profile:
    """The eval job's resources: one process on one node (with one GPU where the nodes have GPUs), for at most
    EVAL_TIME_LIMIT_MIN. After a training job it carries Slurm's afterok dependency, and Slurm cancels it when that
    job fails or is cancelled (kill-on-invalid-dep) instead of keeping it pending for good. The dependency is the one
    directive outside the profile's allow-list: orch writes it, from a job id it recorded."""
    update = {
        "nodes": 1,
        "time_limit_min": min(profile.time_limit_min, EVAL_TIME_LIMIT_MIN),
        "launch": profile.launch.model_copy(update={"tasks_per_node": 1}),
        "node": profile.node.model_copy(update={"gpus": min(profile.node.gpus, 1)}),
    }
    if after is not None:
        extra = {**profile.slurm.extra_sbatch, "dependency": f"afterok:{after}", "kill-on-invalid-dep": "yes"}
        update["slurm"] = profile.slurm.model_copy(update={"extra_sbatch": extra})
    return profile.model_copy(update=update)


def follow_job(run: Run, job: JobRecord) -> None:
    """Wait for the job's end, then print its scores; a job that ended without any is an error naming its logs.
    Ctrl-C stops the waiting, never the job."""
    from orchestrator.cli.commands.doctor import rank_error
    from orchestrator.core.evals import CheckpointEval, eval_files
    from orchestrator.core.runfiles import read_model
    from orchestrator.core.scheduler import job_alive

    try:
        with notes.status(f"Waiting for eval job {job.job_id} ..."):
            while job_alive(job):
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        notes.print(f"\nStopped waiting; eval job {job.job_id} goes on (`scancel {job.job_id}` stops a Slurm one).")
        raise SystemExit(130) from None
    for path in reversed(eval_files(run.dir).values()):
        scores = read_model(path, CheckpointEval)
        done = {task: s for task, s in scores.tasks.items() if s.job_id == job.job_id}
        if done:
            show_scores(run, scores, done)
            return
    logs = run.dir / "evals" / "submitit" / job.job_id
    raise OrchError(
        f"Eval job {job.job_id} of run {run.id} ended without scores ({rank_error(logs) or 'no error was recorded'}). "
        f"Its logs are in {logs}."
    )


def show_scores(run: Run, scores: CheckpointEval, tasks: dict[str, TaskScores]) -> None:
    """One evaluation's tasks (a group's subtasks too) of the checkpoint's scores."""
    from orchestrator.core.evals import eval_file

    table = Table("task", "metric", "value", "documents", title=f"run {run.id}, step {scores.step}")
    for task, result in tasks.items():
        for metric, value in result.metrics.items():
            table.add_row(task, metric, f"{value:.4f}", str(result.samples or "-"))
    console.print(table)
    console.print(f"Scores in {eval_file(run.dir, scores.step)}", highlight=False, soft_wrap=True)


def show_job(run: Run, job: EvalJob, profile: Profile, name: str, after: JobRecord | None, folder: Path) -> None:
    from orchestrator.cli.executors import executor_for

    which = f"the final checkpoint (once training job {after.job_id} has completed)" if after else f"step {job.step}"
    console.print(
        f"Dry run: an eval job of run {run.id} on profile {name} ({profile.executor}, 1 process, "
        f"{profile.launch.device}, at most {profile.time_limit_min:g} min) would score {which} on "
        f"{', '.join(job.tasks)}. Nothing was submitted.",
        highlight=False,
        soft_wrap=True,
    )
    if after:
        console.print(f"Whether job {after.job_id} is still queued or running is asked on submission.", highlight=False)
    script = executor_for(profile).script(profile, None, folder.parent)
    if script is not None:
        console.print("[bold]sbatch script:[/]")
        console.print(script, markup=False, highlight=False, soft_wrap=True)
