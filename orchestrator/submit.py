"""Turn a validated profile + recipe into a run directory and a submitit job."""

from __future__ import annotations

from pathlib import Path

import yaml

from orchestrator.config import Profile, Recipe, load_profile, load_recipe
from orchestrator.errors import OrchError
from orchestrator.plan import Plan, make_plan
from orchestrator.runs import Run, create_run, new_run_id


def check_data(recipe: Recipe, recipe_path: Path) -> None:
    """Paths the job will read must exist before anything is queued."""
    for field, value in (("data.source", recipe.data.source), ("data.tokenizer", recipe.data.tokenizer)):
        if value != "demo" and not Path(value).is_dir():
            raise OrchError(
                f"{recipe_path}: field '{field}' names {value!r}, which is not a folder. "
                "Allowed: 'demo' or an existing folder."
            )
    if recipe.model.init_from and not Path(recipe.model.init_from).is_dir():
        raise OrchError(
            f"{recipe_path}: field 'model.init_from' names {recipe.model.init_from!r}, which is not a "
            "folder. Allowed: a local Hugging Face model directory, or leave it out to start from scratch."
        )


def prepare(profile_name: str, recipe_name: str, steps: int) -> tuple[Profile, Recipe, Plan, dict]:
    """Load and check everything; nothing is written."""
    profile_path, profile = load_profile(profile_name)
    recipe_path, recipe = load_recipe(recipe_name)
    plan = make_plan(profile, recipe, steps)
    check_data(recipe, recipe_path)
    info = {
        "profile": profile_path.stem,
        "recipe": recipe_path.stem,
        "steps": steps,
        "profile_file": str(profile_path),
        "recipe_file": str(recipe_path),
    }
    return profile, recipe, plan, info


def submit(profile_name: str, recipe_name: str, steps: int) -> Run:
    profile, recipe, _, info = prepare(profile_name, recipe_name, steps)
    run = create_run(new_run_id(info["recipe"]), info, dump(profile), dump(recipe))
    launch(run, profile)
    return run


def dump(config: Profile | Recipe) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def launch(run: Run, profile: Profile) -> str:
    """Queue one job of the run on the profile's executor; returns its job id."""
    import submitit

    from jobs.entry import TrainJob

    if profile.executor != "local":
        raise OrchError(f"executor '{profile.executor}' is not supported yet")
    executor = submitit.LocalExecutor(folder=run.submitit_dir / "%j")
    executor.update_parameters(
        tasks_per_node=profile.launch.tasks_per_node,
        timeout_min=profile.time_limit_min,
        signal_delay_s=profile.signal_delay_s,
        setup=profile.env_setup,
    )
    job = executor.submit(TrainJob(run.dir))
    run.add_job(job.job_id, profile.executor)
    return job.job_id
