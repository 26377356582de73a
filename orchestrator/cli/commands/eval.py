"""`orch eval`: a run's checkpoint scored on downstream tasks with lm-evaluation-harness, in this process or in a job
queued on a profile's nodes, after the run's training job with --after-training; with --every K each milestone as it
commits while the run trains (docs/eval.md)."""

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
    from orchestrator.core.schedulers.base import Job
    from orchestrator.tools.evaluate_checkpoint import EvalJob

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
notes = Console(stderr=True)  # what happens meanwhile; stdout carries the scores
EVAL_TIME_LIMIT_MIN = 120  # an eval job's limit (or the profile's, if shorter): minutes for a 1.2B model on a GPU
# A job that follows a run has the profile's whole time limit and requeues itself at it while the run trains; it ends
# by itself with the run, so this only bounds a chain that never ends (the training's own guard stops those).
FOLLOW_REQUEUES = 20
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
    every: Annotated[
        Optional[int],
        typer.Option(
            help="follow the run: score each checkpoint whose step is a multiple of K, and the final one, as it "
            "commits, until the run has ended; already scored ones are skipped",
            metavar="K",
        ),
    ] = None,
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
    if every is not None and (step is not None or after_training):
        other = f"--step {step}" if step is not None else "--after-training"
        raise OrchError(
            f"Options --every {every} and {other} exclude each other: --every follows the run and scores every "
            f"checkpoint at a multiple of step {every} (and the final one) as it commits; --step scores one "
            "committed checkpoint, --after-training the final one. Leave one of them out."
        )
    if after_training and step is not None:
        raise OrchError(
            f"Options --after-training and --step {step} exclude each other: after training the job scores the final "
            f"checkpoint. Score step {step} now with `orch eval {run.id} --step {step} --tasks {tasks}`."
        )
    if every is not None:
        from orchestrator.core.evals import check_milestones

        check_milestones(run.id, run.recipe().checkpoint, every)
    if profile is None and not after_training and every is None:
        evaluate_here(run, step, names, limit, dry_run)
    elif profile is None and every is not None:
        follow_here(run, every, names, limit, dry_run)
    else:
        queue_eval(run, step, names, limit, profile, account, after_training, every, wait, dry_run)


def task_names(tasks: str) -> list[str]:
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise OrchError(f"Option --tasks is {tasks!r}. Allowed: task names separated by commas, e.g. czech_cloze.")
    return list(dict.fromkeys(names))


def evaluate_here(run: "Run", step: int | None, names: list[str], limit: int | None, dry_run: bool) -> None:
    """In this process, on its GPU if it has one, else on the CPU."""
    from orchestrator.tools.evaluate_checkpoint import evaluate, report, task_manager
    from orchestrator.tools.export import choose_step

    if dry_run:
        chosen = choose_step(run, step, "evaluate")
        task_manager(names)
        console.print(f"Dry run: this process would score run {run.id} at step {chosen} on {', '.join(names)}.")
        return
    show_newest(run, evaluate(run, step, names, limit, None))
    console.print(report(run), highlight=False, soft_wrap=True)


def follow_here(run: "Run", every: int, names: list[str], limit: int | None, dry_run: bool) -> None:
    """`--every` in this process: each milestone is scored as it commits, until the run has ended. Ctrl-C stops
    between two writes of evals/ (a score is written whole or not at all), and the same command continues."""
    from orchestrator.core.checkpoints import committed_steps
    from orchestrator.core.evals import due_milestones, scored_steps
    from orchestrator.tools.evaluate_checkpoint import follow_milestones, report, task_manager

    task_manager(names)
    final = run.info.steps
    what = f"each checkpoint of run {run.id} at a multiple of step {every} and its final step {final}"
    if dry_run:
        due = due_milestones(committed_steps(run.checkpoints_dir), every, final, scored_steps(run.dir, names, limit))
        console.print(
            f"Dry run: this process would score {what} on {', '.join(names)} as it commits, until the run has ended; "
            f"due now: {', '.join(map(str, due)) or 'none'}.",
            highlight=False,
            soft_wrap=True,
        )
        return
    scored: list[int] = []
    try:
        with notes.status(f"Following run {run.id}: scoring {what} as it commits ..."):
            for milestone in follow_milestones(run, every, names, limit, None):
                if milestone.scores is None:
                    notes.print(
                        f"Step {milestone.step} not scored: {milestone.problem}", highlight=False, soft_wrap=True
                    )
                    continue
                scored.append(milestone.step)
                show_newest(run, milestone.scores)
                console.print(report(run), highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        notes.print(
            f"\nStopped following run {run.id} (scored now: {', '.join(map(str, scored)) or 'none'}); "
            f"`orch eval {run.id} --tasks {','.join(names)} --every {every}{f' --limit {limit}' if limit else ''}` "
            "goes on with the milestones left.",
            highlight=False,
            soft_wrap=True,
        )
        raise SystemExit(130) from None
    console.print(
        f"Run {run.id} has ended ({run.state()}) and its milestones are scored (now: "
        f"{', '.join(map(str, scored)) or 'none'}).",
        highlight=False,
        soft_wrap=True,
    )


def queue_eval(
    run: "Run",
    step: int | None,
    names: list[str],
    limit: int | None,
    profile_name: str | None,
    account: str | None,
    after_training: bool,
    every: int | None,
    wait: bool,
    dry_run: bool,
) -> None:
    """A job of one process on the profile's nodes; with `after_training`, one that starts when the run's training job
    has completed; with `every`, one that starts when it has started and follows the run."""
    from orchestrator.cli.submit import queue
    from orchestrator.core.evals import EVALS
    from orchestrator.core.preflight import check_partition
    from orchestrator.core.schedulers.base import Job
    from orchestrator.tools.evaluate_checkpoint import EvalJob, task_manager
    from orchestrator.tools.export import choose_step

    name, path, base = chosen_profile(run, profile_name, account)
    after = training_job(run, base) if after_training else None
    scores_now = not after_training and every is None
    chosen = choose_step(run, step, "evaluate") if scores_now else None  # scores what is committed now
    task_manager(names)
    if after is not None and not dry_run:
        after = still_training(run, after)
    if every is not None:
        after = training_to_follow(run, base, name, ask_scheduler=not dry_run)
    dependency = f"{'after' if every else 'afterok'}:{after.job_id}" if after else None
    resolved = job_profile(base, dependency, following=every is not None)
    check_partition(resolved, path)
    job = EvalJob(run.dir, chosen, tuple(names), limit, resolved.launch.device, every)
    folder = run.dir / EVALS / "submitit"
    if every is not None:
        console.print(following_cost(run, resolved, name, names), highlight=False, soft_wrap=True)
    if dry_run:
        show_job(run, job, resolved, name, after, folder)
        return
    requeues = FOLLOW_REQUEUES if every else None
    job_id = queue(resolved, None, folder, job, f"orch eval {run.id}", requeues)
    console.print(
        f"Submitted eval job {job_id} ({resolved.executor}): run {run.id}, {job_target(job, after)}, tasks "
        f"{', '.join(names)}. Its logs: {folder / job_id}",
        highlight=False,
        soft_wrap=True,
    )
    if wait:
        follow_job(run, Job(resolved.executor, job_id, time.time(), folder), job.every)


def following_cost(run: "Run", profile: "Profile", name: str, names: list[str]) -> str:
    """What a job that follows the run holds (its one GPU, or one process, for the rest of the training, waiting
    between milestones), and the cheaper way: a short job per committed milestone."""
    from orchestrator.core.plan import make_plan

    summary = run.summary()
    remaining_s = summary["eta_s"]
    if remaining_s is None:  # not running now: the plan's estimate for the steps left
        hours = make_plan(run.profile(), run.recipe(), run.info.steps).hours
        remaining_s = hours * 3600 * (1 - (summary["step"] or 0) / run.info.steps) if hours else None
    held = "1 GPU" if profile.node.gpus else "1 process"
    cost = "for the rest of the training"
    if remaining_s is not None:
        cost += f", about {remaining_s / 3600:.1f} h"
        if profile.node.gpus:
            cost += f" ({remaining_s / 3600 / profile.node.gpus:.2f} node-hours at {profile.node.gpus} GPUs a node)"
    return (
        f"This job holds {held} {cost}, mostly waiting for checkpoints. Cheaper: one short job per milestone once it "
        f"has committed, `orch eval {run.id} --tasks {','.join(names)} --step K --profile {name}` (at most "
        f"{EVAL_TIME_LIMIT_MIN} min each)."
    )


def job_target(job: "EvalJob", after: "JobRecord | None") -> str:
    """What an eval job scores, in words."""
    if job.every is not None:
        start = f" from when training job {after.job_id} has started" if after else ""
        return f"each checkpoint at a multiple of step {job.every} and the final one as it commits{start}"
    if after is not None:
        return f"the final checkpoint once training job {after.job_id} has completed"
    return f"step {job.step}"


def chosen_profile(run: "Run", name: str | None, account: str | None) -> "tuple[str, Path, Profile]":
    """The named profile, else the one the run trains with: its name, its file and its fields."""
    from orchestrator.core.config import Profile
    from orchestrator.core.loading import load_profile, merge_all, validate
    from orchestrator.core.yamlio import read_yaml

    overrides = [{"slurm": {"account": account}}] if account else []
    if name:
        path, profile = load_profile(name, overrides)
        return path.stem, path, profile
    path = run.dir / "profile.yaml"
    return run.info.profile, path, validate(path, Profile, merge_all(read_yaml(path), overrides))


def training_job(run: "Run", profile: "Profile") -> "JobRecord":
    """The run's newest training job, which a Slurm dependency can name."""
    from orchestrator.core.schedulers import scheduler_of

    jobs = run.jobs
    if not jobs:
        raise OrchError(f"Run {run.id} has no training job to wait for (jobs.json lists none).")
    job = jobs[-1]
    if job.executor != profile.executor or not scheduler_of(profile.executor).dependencies:
        raise OrchError(
            f"--after-training makes the eval job a Slurm dependency of run {run.id}'s training job {job.job_id}, "
            f"which runs under the {job.executor} executor, and the eval job would run under the {profile.executor} "
            f"one. Both must be Slurm's. Locally, follow the run to its end (`orch submit --wait`, `orch status "
            f"{run.id}`) and then run `orch eval {run.id} --tasks ...`."
        )
    return job


def training_to_follow(run: "Run", profile: "Profile", name: str, ask_scheduler: bool) -> "JobRecord | None":
    """The training job a follower job starts after (Slurm's `after`: once it has started), where both run under
    Slurm and the scheduler still has it; None where a dependency cannot be had (the local executor) or is not needed
    (training has ended: the follower scores what was committed and ends). A local training job is seen only on this
    machine: a follower on other nodes could not tell when it ends."""
    from orchestrator.core.schedulers import job_alive, scheduler_of

    jobs = run.jobs
    job = jobs[-1] if jobs else None
    if job is not None and scheduler_of(job.executor).one_machine and profile.executor != job.executor:
        raise OrchError(
            f"Run {run.id}'s training job {job.job_id} runs under the local executor on this machine, which a job "
            f"on profile {name}'s nodes ({profile.executor}) cannot watch. Follow it here (leave --profile out) or "
            "with a local profile."
        )
    if job is None or job.executor != profile.executor or not scheduler_of(profile.executor).dependencies:
        return None
    return job if not ask_scheduler or job_alive(run.job(job)) else None


def still_training(run: "Run", job: "JobRecord") -> "JobRecord | None":
    """The training job while the scheduler has it; None when it has ended and the run completed (then the eval job
    waits for nothing). A run whose training ended otherwise is refused: an afterok dependency on it never holds."""
    from orchestrator.core.schedulers import job_alive

    if job_alive(run.job(job)):
        return job
    state = run.state(False)
    if state == "completed":
        return None
    raise OrchError(
        f"Run {run.id}'s training job {job.job_id} has ended and the run is {state}, not completed: there is no final "
        f"checkpoint to wait for. Score a committed one with `orch eval {run.id} --step K --tasks ... --profile P`, "
        f"or resume the run (`orch resume {run.id}`) and ask again."
    )


def job_profile(profile: "Profile", dependency: str | None, following: bool = False) -> "Profile":
    """The eval job's resources: one process on one node (with one GPU where the nodes have GPUs), for at most
    EVAL_TIME_LIMIT_MIN, or the profile's whole time limit for a job `following` a run. After a training job it
    carries Slurm's `dependency` on it (afterok: completed; after: started), and Slurm cancels it when that dependency
    can never hold (kill-on-invalid-dep) instead of keeping it pending for good. The dependency is the one directive
    outside the profile's allow-list: orch writes it, from a job id it recorded."""
    update = {
        "nodes": 1,
        "time_limit_min": profile.time_limit_min if following else min(profile.time_limit_min, EVAL_TIME_LIMIT_MIN),
        "launch": profile.launch.model_copy(update={"tasks_per_node": 1}),
        "node": profile.node.model_copy(update={"gpus": min(profile.node.gpus, 1)}),
    }
    if dependency is not None:
        extra = {**profile.slurm.extra_sbatch, "dependency": dependency, "kill-on-invalid-dep": "yes"}
        update["slurm"] = profile.slurm.model_copy(update={"extra_sbatch": extra})
    return profile.model_copy(update=update)


def follow_job(run: "Run", job: "Job", every: int | None = None) -> None:
    """Wait for the job's end, then print its scores (a follower's, of each milestone it scored); a job that failed,
    or that scored one checkpoint and ended without its scores, is an error naming its logs. Ctrl-C stops the waiting,
    never the job."""
    from orchestrator.cli.commands.doctor import rank_error
    from orchestrator.core.evals import CheckpointEval, eval_files
    from orchestrator.core.runfiles import read_model
    from orchestrator.core.schedulers import job_alive

    try:
        with notes.status(f"Waiting for eval job {job.job_id} ..."):
            while job_alive(job):
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        notes.print(f"\nStopped waiting; eval job {job.job_id} goes on (`scancel {job.job_id}` stops a Slurm one).")
        raise SystemExit(130) from None
    shown = []
    for step, path in eval_files(run.dir).items():
        scores = read_model(path, CheckpointEval)
        done = {task: s for task, s in scores.tasks.items() if s.job_id == job.job_id}
        if done:
            show_scores(run, scores, done)
            shown.append(step)
    logs = run.dir / "evals" / "submitit" / job.job_id
    error = rank_error(logs) if every or not shown else None
    if error or not (shown or every):
        ended = f"after scoring steps {', '.join(map(str, shown))}" if shown else "without scores"
        raise OrchError(
            f"Eval job {job.job_id} of run {run.id} ended {ended} ({error or 'no error was recorded'}). "
            f"Its logs are in {logs}."
        )
    if every:
        console.print(
            f"Eval job {job.job_id} followed run {run.id} to its end; milestones it scored: "
            f"{', '.join(map(str, shown)) or 'none (the others were scored before)'}.",
            highlight=False,
            soft_wrap=True,
        )


def show_newest(run: "Run", scores: "CheckpointEval") -> None:
    """The tasks of a checkpoint's scores that its newest evaluation scored."""
    newest = max(s.finished for s in scores.tasks.values())
    show_scores(run, scores, {task: s for task, s in scores.tasks.items() if s.finished == newest})


def show_scores(run: "Run", scores: "CheckpointEval", tasks: "dict[str, TaskScores]") -> None:
    """One evaluation's tasks (a group's subtasks too) of the checkpoint's scores."""
    from orchestrator.core.evals import eval_file

    table = Table("task", "metric", "value", "documents", title=f"run {run.id}, step {scores.step}")
    for task, result in tasks.items():
        for metric, value in result.metrics.items():
            table.add_row(task, metric, f"{value:.4f}", str(result.samples or "-"))
    console.print(table)
    console.print(f"Scores in {eval_file(run.dir, scores.step)}", highlight=False, soft_wrap=True)


def show_job(
    run: "Run", job: "EvalJob", profile: "Profile", name: str, after: "JobRecord | None", folder: Path
) -> None:
    from orchestrator.cli.executors import job_script

    console.print(
        f"Dry run: an eval job of run {run.id} on profile {name} ({profile.executor}, 1 process, "
        f"{profile.launch.device}, at most {profile.time_limit_min:g} min) would score {job_target(job, after)} on "
        f"{', '.join(job.tasks)}. Nothing was submitted.",
        highlight=False,
        soft_wrap=True,
    )
    if after:
        console.print(f"Whether job {after.job_id} is still queued or running is asked on submission.", highlight=False)
    script = job_script(profile, None, folder.parent)
    if script is not None:
        console.print("[bold]sbatch script:[/]")
        console.print(script, markup=False, highlight=False, soft_wrap=True)
