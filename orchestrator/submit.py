"""Turn a validated profile + recipe into a run directory and a submitit job."""

from __future__ import annotations

import getpass
import hashlib
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import (
    PROJECT_ROOT,
    Profile,
    Recipe,
    load_profile,
    load_recipe,
    merge_all,
    read_yaml,
    validate,
)
from orchestrator.errors import OrchError
from orchestrator.plan import Plan, make_plan
from orchestrator.runs import (
    Run,
    cancel_job,
    create_run,
    job_alive,
    new_run_id,
    orch_home,
    read_json,
    write_json_atomic,
)


@dataclass(frozen=True)
class Request:
    """Everything `orch submit` was asked, resolved and checked; nothing written yet."""

    profile: Profile
    recipe: Recipe
    plan: Plan
    info: dict[str, Any]


def prepare(profile_name: str, recipe_name: str, steps: int, overrides: list[dict[str, Any]] = ()) -> Request:
    """Load and check everything before anything is written or submitted."""
    profile_path, profile = load_profile(profile_name, overrides)
    recipe_path, recipe = load_recipe(recipe_name)
    plan = checked_plan(profile, profile_path, recipe, recipe_path, steps)
    info = {
        "profile": profile_path.stem,
        "recipe": recipe_path.stem,
        "steps": steps,
        "profile_file": str(profile_path),
        "recipe_file": str(recipe_path),
        "tracking_uri": tracking_uri(profile),
        "stop_before_end_s": plan.stop_before_end_s,
        "git_commit": git_commit(),
    }
    return Request(profile, recipe, plan, info)


def git_commit() -> str | None:
    """The code a run trains with, for its MLflow tags."""
    import subprocess

    out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def checked_plan(profile: Profile, profile_path: Path, recipe: Recipe, recipe_path: Path, steps: int) -> Plan:
    check_partition(profile, profile_path)
    plan = make_plan(profile, recipe, steps)
    check_memory(profile, profile_path, plan)
    check_data(recipe, recipe_path)
    return plan


def check_partition(profile: Profile, path: Path) -> None:
    """The partition's limits, each with what to change."""
    slurm = profile.slurm
    if slurm and slurm.account_required and not slurm.account:
        raise OrchError(
            f"{path}: partition '{slurm.partition}' needs an account (slurm.account): pass --account PROJECT-ID "
            "(e.g. --account OPEN-29-12), or set slurm.account in a profile that extends this one."
        )
    if slurm and profile.time_limit_min > slurm.max_walltime_min:
        raise OrchError(
            f"{path}: time limit {profile.time_limit_min:g} min is above partition '{slurm.partition}''s maximum "
            f"of {slurm.max_walltime_min:g} min; use --time {int(slurm.max_walltime_min)} or less. Longer runs are "
            "requeued automatically."
        )
    if slurm and profile.nodes > slurm.max_nodes:
        raise OrchError(
            f"{path}: {profile.nodes} nodes is above partition '{slurm.partition}''s limit of {slurm.max_nodes}; "
            f"use --nodes {slurm.max_nodes} or fewer, or a profile for a larger partition."
        )


def check_memory(profile: Profile, path: Path, plan: Plan) -> None:
    gpu_memory = profile.node.gpu_memory_gb
    if gpu_memory and plan.peak_memory_gb > gpu_memory:
        raise OrchError(
            f"Estimated peak memory {plan.peak_memory_gb:.1f} GB per GPU is above the {gpu_memory:g} GB of "
            f"{profile.node.gpu_model} ({path}); lower train.micro_batch_size (now {plan.micro_batch}) in the recipe "
            "or use more nodes."
        )


def check_data(recipe: Recipe, recipe_path: Path) -> None:
    """What the job will read must exist and fit the model before anything is queued."""
    data, model = recipe.data, recipe.model
    for field, value in (("data.source", data.source), ("data.tokenizer", data.tokenizer)):
        if value != "demo" and not Path(value).is_dir():
            raise OrchError(
                f"{recipe_path}: field '{field}' names {value!r}, which is not a folder. "
                "Allowed: 'demo' or an existing folder."
            )
    index = read_json(Path(data.source) / "train" / "index.json") if data.source != "demo" else None
    if index:
        check_prepared_data(recipe, recipe_path, index)
    if model.init_from:
        check_init_from(recipe, recipe_path)


def check_prepared_data(recipe: Recipe, recipe_path: Path, index: dict[str, Any]) -> None:
    """Shards from `orch data prepare` name their vocabulary size and tokenizer: both must match the recipe."""
    if index["vocab_size"] > recipe.model.vocab_size:
        raise OrchError(
            f"{recipe_path}: field 'model.vocab_size' is {recipe.model.vocab_size}, but {recipe.data.source} was "
            f"tokenized with {index['vocab_size']} token ids. Allowed: at least {index['vocab_size']}."
        )
    tokenizer = Path(recipe.data.tokenizer) / "tokenizer.json"
    if not tokenizer.is_file() or hashlib.sha256(tokenizer.read_bytes()).hexdigest() != index["tokenizer"]["sha256"]:
        raise OrchError(
            f"{recipe_path}: field 'data.tokenizer' ({recipe.data.tokenizer}) is not the tokenizer "
            f"{recipe.data.source} was prepared with. Allowed: that tokenizer, e.g. {recipe.data.source}/tokenizer."
        )


MODEL_FIELDS = {  # recipe field -> Hugging Face config key
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
}


def check_init_from(recipe: Recipe, recipe_path: Path) -> None:
    """A model directory brings its own architecture: the recipe's (which the plan and estimates use) must agree."""
    model = recipe.model
    config = read_json(Path(model.init_from) / "config.json")
    if config is None:
        raise OrchError(
            f"{recipe_path}: field 'model.init_from' names {model.init_from!r}, which has no config.json. "
            "Allowed: a local Hugging Face model directory, or leave it out to start from scratch."
        )
    differ = [
        f"model.{field} is {getattr(model, field)} but {key} is {config.get(key)}"
        for field, key in MODEL_FIELDS.items()
        if config.get(key) != getattr(model, field)
    ]
    if differ:
        raise OrchError(
            f"{recipe_path}: the model in {model.init_from} differs from the recipe: {'; '.join(differ)}. "
            "Allowed: the directory's dimensions (copy them into the recipe's model section)."
        )


def tracking_uri(profile: Profile) -> str:
    """MLFLOW_TRACKING_URI, else the profile's, else the embedded SQLite store in ORCH_HOME."""
    return os.environ.get("MLFLOW_TRACKING_URI") or profile.tracking_uri or f"sqlite:///{orch_home() / 'mlflow.db'}"


def fill_path(template: str, profile: Profile) -> str:
    account = (profile.slurm.account if profile.slurm else None) or ""
    return template.format(account_lower=account.lower(), user=getpass.getuser())


def submit(request: Request) -> Run:
    profile = request.profile
    runs_dir = Path(fill_path(profile.paths.runs, profile)) if profile.paths.runs else None
    run = create_run(new_run_id(request.info["recipe"]), request.info, dump(profile), dump(request.recipe), runs_dir)
    with run.lock():
        launch(run, profile, request.plan)
    return run


def launch(run: Run, profile: Profile, plan: Plan) -> str:
    """Queue the run's next job and record it (the caller holds the run's lock)."""
    with local_environment(profile, run.submitit_dir / "controller.log"):
        job_id = make_executor(profile, plan, run.submitit_dir).submit(job_function(run)).job_id
    run.add_job(job_id, profile.executor)
    return job_id


CONFIRM_TIMEOUT_S = 300


def stop_and_confirm(run: Run, job: dict[str, Any]) -> None:
    """Cancel a job and wait until the scheduler no longer lists it."""
    cancel_job(job)
    run.mark_cancelled()
    deadline = time.time() + CONFIRM_TIMEOUT_S
    while job_alive(job):
        if time.time() > deadline:
            raise OrchError(
                f"Job {job['job_id']} of run {run.id} is still alive {CONFIRM_TIMEOUT_S} s after "
                "cancelling it; nothing was resubmitted."
            )
        time.sleep(2)


def resume(run: Run, steps: int | None, profile_name: str | None, overrides: list[dict[str, Any]], force: bool) -> str:
    """Submit a new job that continues the run from its newest valid checkpoint; returns the job id."""
    with run.lock():
        jobs, report, info = run.jobs, run.progress, run.info
        if jobs and job_alive(jobs[-1]):
            if not force:
                raise OrchError(
                    f"Run {run.id} already has a live job {jobs[-1]['job_id']} ({run.state()}): two jobs must never "
                    f"write one run. Wait for it to end, stop it with `orch cancel {run.id}`, or pass --force to "
                    "cancel it and resume once the scheduler confirms it is gone."
                )
            stop_and_confirm(run, jobs[-1])
        steps = steps or info["steps"]
        if run.state() == "completed" and steps <= report.get("step", 0):
            raise OrchError(
                f"Run {run.id} already completed {report['step']} steps; pass --steps N with N > {report['step']} "
                "to train further."
            )
        if profile_name:
            profile_path, profile = load_profile(profile_name, overrides)
        else:
            profile_path = run.dir / "profile.yaml"
            profile = validate(profile_path, Profile, merge_all(read_yaml(profile_path), overrides))
        recipe_path = run.dir / "recipe.yaml"
        recipe = validate(recipe_path, Recipe, read_yaml(recipe_path))
        plan = checked_plan(profile, profile_path, recipe, recipe_path, steps)
        info.update(steps=steps, profile=profile_name or info["profile"], stop_before_end_s=plan.stop_before_end_s)
        write_json_atomic(run.dir / "run.json", info)
        (run.dir / "profile.yaml").write_text(dump(profile))
        return launch(run, profile, plan)


def cancel(run: Run) -> str:
    """Stop the run's live job; its checkpoints stay and `orch resume` continues from them."""
    with run.lock():
        jobs = run.jobs
        if not jobs or not job_alive(jobs[-1]):
            raise OrchError(f"Run {run.id} has no live job to cancel (state: {run.state()}).")
        cancel_job(jobs[-1])
        run.mark_cancelled()
        return jobs[-1]["job_id"]


def job_function(run: Run):
    from jobs.entry import TrainJob

    return TrainJob(run.dir)


def dump(config: Profile | Recipe) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def setup_lines(profile: Profile) -> list[str]:
    """Shell lines run before the job starts: the environment script and variables, all quoted."""
    lines = [f"export {name}={shlex.quote(value)}" for name, value in profile.env_vars.items()]
    if profile.env_script:
        if profile.paths.venv:
            lines.append(f"export ORCH_VENV={shlex.quote(fill_path(profile.paths.venv, profile))}")
        lines.append(f"source {shlex.quote(str(PROJECT_ROOT / profile.env_script))}")
    return lines


@contextmanager
def local_environment(profile: Profile, log: Path) -> Iterator[None]:
    """A local job inherits this process's environment and open files while it starts: give it the profile's
    variables (setup lines would put a shell between the job id and the job, which signals must reach) and
    a log file instead of our stdout and stderr (a pipe reading them would otherwise wait for the job)."""
    if profile.executor != "local":
        yield
        return
    saved_env, saved_fds = dict(os.environ), (os.dup(1), os.dup(2))
    os.environ.update(profile.env_vars)
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with log.open("a") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        for fd, saved in zip((1, 2), saved_fds, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        os.environ.clear()
        os.environ.update(saved_env)


def make_executor(profile: Profile, plan: Plan, folder: Path):
    """A submitit executor for the profile: LocalExecutor on this machine, SlurmExecutor on a cluster."""
    import submitit

    # Enough requeues for every allocation the plan needs, plus two for early signals; without an estimate,
    # the requeue-loop guard is what stops a chain.
    max_num_timeout = plan.allocations + 2 if plan.tokens_per_s else 20
    if profile.executor == "local":
        executor = submitit.LocalExecutor(folder=folder / "%j", max_num_timeout=max_num_timeout)
        executor.update_parameters(
            tasks_per_node=profile.launch.tasks_per_node,
            timeout_min=profile.time_limit_min,
            signal_delay_s=plan.signal_delay_s,
        )
        return executor
    slurm = profile.slurm
    executor = submitit.SlurmExecutor(
        folder=folder / "%j", max_num_timeout=max_num_timeout, python=profile.python or None
    )
    parameters: dict[str, Any] = {
        "job_name": f"orch-{folder.parent.name}",
        "nodes": profile.nodes,
        "ntasks_per_node": profile.launch.tasks_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "time": int(profile.time_limit_min),
        "partition": slurm.partition,
        "signal_delay_s": plan.signal_delay_s,
        "setup": setup_lines(profile),
        "additional_parameters": dict(slurm.extra_sbatch),
    }
    if profile.node.gpus:
        parameters["gpus_per_node"] = profile.node.gpus
    if slurm.account:
        parameters["account"] = slurm.account
    if slurm.qos:
        parameters["qos"] = slurm.qos
    executor.update_parameters(**parameters)
    return executor


def sbatch_script(profile: Profile, plan: Plan, run_dir: Path) -> str:
    """The exact script `sbatch` would receive for this run (Slurm profiles)."""
    executor = make_executor(profile, plan, run_dir / "submitit")
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")
