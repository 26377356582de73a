"""Turn a validated profile + recipe into a run directory and a submitit job."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.cli.executors import executor_for, fill_path, from_frozen_code
from orchestrator.core.config import (
    PROJECT_ROOT,
    Profile,
    Recipe,
    dump_yaml,
    load_profile,
    load_recipe,
    merge_all,
    read_yaml,
    validate,
)
from orchestrator.core.errors import OrchError
from orchestrator.core.files import write_atomic
from orchestrator.core.plan import Plan
from orchestrator.core.preflight import checked_plan
from orchestrator.core.rundir import Run, create_run, new_run_id, remove_run
from orchestrator.core.runfiles import JobRecord
from orchestrator.core.scheduler import cancel_job, job_alive, wait_until_gone
from orchestrator.core.settings import named_tracking_uri


@dataclass(frozen=True)
class Request:
    """Everything `orch submit` was asked, resolved and checked; nothing written yet."""

    profile: Profile
    recipe: Recipe
    plan: Plan
    info: dict[str, Any]


def build_request(
    profile_name: str, recipe_name: str | None, steps: int, overrides: list[dict[str, Any]] = ()
) -> Request:
    """Load and check everything before anything is written or submitted; no recipe named: the profile's."""
    profile_path, profile = load_profile(profile_name, overrides)
    recipe_path, recipe = load_recipe(recipe_name or profile.default_recipe)
    plan = checked_plan(profile, profile_path, recipe, recipe_path, steps)
    info = {
        "profile": profile_path.stem,
        "recipe": recipe_path.stem,
        "steps": steps,
        "profile_file": str(profile_path),
        "recipe_file": str(recipe_path),
        "tracking_uri": named_tracking_uri(profile.tracking_uri),  # None: the embedded store beside the run
        "stop_before_end_s": plan.stop_before_end_s,
        "git_commit": git_commit(),
    }
    return Request(profile, plan.recipe, plan, info)  # `auto` train settings decided: the run's recipe.yaml keeps them


def git_commit() -> str | None:
    """The code a run trains with, for its MLflow tags."""
    import subprocess

    out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def submit(request: Request) -> Run:
    """Create the run, attach its data and queue its job; if any of it fails, the new run is removed again."""
    profile = request.profile
    if request.recipe.data.source == "demo" and not profile.demo_data:
        raise OrchError(
            f"{request.info['profile_file']}: this profile trains prepared data only (demo_data: false), and the "
            f"recipe {request.info['recipe_file']} names the demo corpus (data.source: demo). Prepare your corpus on "
            "a login or CPU node (`orch data prepare`, docs/data.md), then set data.source and data.tokenizer."
        )
    runs_dir = Path(fill_path(profile.paths.runs, profile)) if profile.paths.runs else None
    run = create_run(new_run_id(request.info["recipe"]), request.info, dump(profile), dump(request.recipe), runs_dir)
    try:
        with run.lock():
            attach_run_data(run, request.recipe)
            run.freeze_code()
            launch(run, profile, request.plan)
    except BaseException:
        remove_run(run)
        raise
    return run


def attach_run_data(run: Run, recipe: Recipe) -> None:
    """The run's data, set up here before its job is queued: the job never tokenizes."""
    from orchestrator.tools.run_data import attach_data

    attach_data(recipe.data, recipe.model.vocab_size, recipe.train.seed, run.data_dir)


def launch(run: Run, profile: Profile, plan: Plan) -> str:
    """Queue the run's next job and record it (the caller holds the run's lock)."""
    job_id = queue(from_frozen_code(profile, run.code_dir), plan, run.submitit_dir, job_function(run), f"run {run.id}")
    run.add_job(job_id, profile.executor)
    return job_id


def queue(profile: Profile, plan: Plan | None, folder: Path, job: Callable[[], Any], what: str) -> str:
    """Queue `job` with the profile's executor, its submitit files under `folder`; returns the job id. A refusal by
    the scheduler is an OrchError with its message, naming `what` the job was for."""
    executor = executor_for(profile)
    try:
        with executor.environment(profile, folder / "controller.log"):
            return executor.make(profile, plan, folder).submit(job).job_id
    except Exception as err:  # noqa: BLE001 - sbatch's or the executor's refusal, whatever its type
        message = " ".join(str(err).split())[:1000] or type(err).__name__
        raise OrchError(f"The {profile.executor} scheduler refused the job of {what}: {message}") from None


CONFIRM_TIMEOUT_S = 300


def stop_and_confirm(run: Run, job: JobRecord) -> None:
    """Cancel a job and wait until the scheduler no longer lists it."""
    cancel_job(job)
    run.mark_cancelled()
    if not wait_until_gone(job, CONFIRM_TIMEOUT_S):
        raise OrchError(
            f"Job {job.job_id} of run {run.id} is still alive {CONFIRM_TIMEOUT_S} s after cancelling it; "
            "nothing was resubmitted."
        )


def resume(
    run: Run,
    steps: int | None,
    profile_name: str | None,
    overrides: list[dict[str, Any]],
    force: bool,
    from_scratch: bool = False,
    update_code: bool = False,
) -> str:
    """Submit a new job that continues the run from its newest valid checkpoint; returns the job id. Nothing in the
    run changes unless the job is queued, except its code with `update_code` (the checkout's, asked for)."""
    with run.lock():
        jobs, report, info = run.jobs, run.progress, run.info
        if jobs and job_alive(jobs[-1]):
            if not force:
                raise OrchError(
                    f"Run {run.id} already has a live job {jobs[-1].job_id} ({run.state()}): two jobs must never "
                    f"write one run. Wait for it to end, stop it with `orch cancel {run.id}`, or pass --force to "
                    "cancel it and resume once the scheduler confirms it is gone."
                )
            stop_and_confirm(run, jobs[-1])
        steps = steps or info.steps
        done = report.step if report else 0
        if run.state() == "completed" and steps <= done:
            raise OrchError(
                f"Run {run.id} already completed {done} steps; pass --steps N with N > {done} to train further."
            )
        if profile_name:
            profile_path, profile = load_profile(profile_name, overrides)
        else:
            profile_path = run.dir / "profile.yaml"
            profile = validate(profile_path, Profile, merge_all(read_yaml(profile_path), overrides))
        recipe_path = run.dir / "recipe.yaml"
        recipe = validate(recipe_path, Recipe, read_yaml(recipe_path))
        plan = checked_plan(profile, profile_path, recipe, recipe_path, steps)
        changed = info.model_copy(
            update={
                "steps": steps,
                "profile": profile_name or info.profile,
                "stop_before_end_s": plan.stop_before_end_s,
                "from_scratch": from_scratch,
            }
        )
        if update_code or not run.code_dir.is_dir():  # runs submitted before code was frozen get it now
            run.freeze_code()
        with rewritten(run.dir / "run.json", json.dumps(changed.model_dump(), indent=2, sort_keys=True)):
            with rewritten(run.dir / "profile.yaml", dump(profile)):
                return launch(run, profile, plan)


@contextmanager
def rewritten(path: Path, text: str) -> Iterator[None]:
    """`path` holds `text` from here on, unless the block fails: then it is put back as it was."""
    before = path.read_bytes()
    write_atomic(path, text)
    try:
        yield
    except BaseException:
        write_atomic(path, before)
        raise


def cancel(run: Run) -> str:
    """Stop the run's live job; its checkpoints stay and `orch resume` continues from them."""
    with run.lock():
        jobs = run.jobs
        if not jobs or not job_alive(jobs[-1]):
            raise OrchError(f"Run {run.id} has no live job to cancel (state: {run.state()}).")
        cancel_job(jobs[-1])
        run.mark_cancelled()
        return jobs[-1].job_id


def job_function(run: Run):
    from jobs.entry import TrainJob

    return TrainJob(run.dir)


def dump(config: Profile | Recipe) -> str:
    """YAML that reads back to the same values (strings such as 'yes' or '1e5' stay quoted)."""
    return dump_yaml(config.model_dump(mode="json"))
