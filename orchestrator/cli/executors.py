"""What the command line decides about a job before its scheduler queues it: how often it may requeue itself, its
warning signal's lead, the run's frozen code, the environment script checked here. The scheduler's own module
(`orchestrator.core.schedulers`) builds the submitit executor and answers for the job from then on."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from orchestrator.core.config import Profile
from orchestrator.core.errors import OrchError
from orchestrator.core.plan import Plan
from orchestrator.core.schedulers import scheduler_of
from orchestrator.core.schedulers.slurm import setup_lines

ENV_CHECK_TIMEOUT_S = 120


def max_requeues(plan: Plan | None, requeues: int | None = None) -> int:
    """Enough requeues for every allocation the plan needs, plus two for early signals; without an estimate,
    the requeue-loop guard is what stops a chain. A job without a plan (`orch doctor`) runs once, unless it asks for
    `requeues` (an eval job that follows a training chain)."""
    if requeues is not None:
        return requeues
    if plan is None:
        return 0
    return plan.allocations + 2 if plan.tokens_per_s else 20


def signal_delay_s(profile: Profile, plan: Plan | None) -> int:
    """The plan's lead time for the warning signal; the profile's for a job without a plan."""
    return plan.signal_delay_s if plan is not None else profile.signal_delay_s


def make_executor(profile: Profile, plan: Plan | None, folder: Path, requeues: int | None = None) -> Any:
    """A configured submitit executor whose jobs keep their files under `folder`; `plan` None: a one-off job.
    `requeues`: how often a job may requeue itself at its time limit, where not as the plan needs."""
    return scheduler_of(profile.executor).executor(
        profile, folder, max_requeues(plan, requeues), signal_delay_s(profile, plan)
    )


def job_script(profile: Profile, plan: Plan | None, run_dir: Path) -> str | None:
    """The job script the scheduler would receive for a job of `run_dir`, where there is one."""
    return scheduler_of(profile.executor).script(
        profile, run_dir / "submitit", max_requeues(plan), signal_delay_s(profile, plan)
    )


def from_frozen_code(profile: Profile, code_dir: Path) -> Profile:
    """The profile a run's job is queued with: its Python imports the run's `code/` ahead of any checkout, and not
    even from the folder it starts in (PYTHONSAFEPATH), and it sources the environment script of that copy, so every
    requeue runs the code that was submitted."""
    frozen = {"PYTHONPATH": str(code_dir), "PYTHONSAFEPATH": "1"}
    update: dict[str, Any] = {"env_vars": {**profile.env_vars, **frozen}}
    if profile.env_script:  # absolute: setup_lines joins it to PROJECT_ROOT, which an absolute path replaces
        update["env_script"] = str(code_dir / profile.env_script)
    return profile.model_copy(update=update)


def check_environment(profile: Profile, path: Path) -> None:
    """Source the profile's environment script here, as every job will before it trains (its modules, its virtual
    environment): one that fails stops the submission with its own message, not the job after its wait in the
    queue. A login node has the compute nodes' modules and filesystems."""
    if not profile.env_script:
        return
    try:
        done = subprocess.run(["bash", "-c", " && ".join(setup_lines(profile))], capture_output=True, text=True,
                              timeout=ENV_CHECK_TIMEOUT_S, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise OrchError(
            f"{path}: the environment script {profile.env_script} did not finish within {ENV_CHECK_TIMEOUT_S} s here "
            "(jobs source it before training). Allowed: a script that sets up the environment and returns."
        ) from None
    if done.returncode != 0:
        said = " ".join(done.stderr.split()[-60:]) or f"exit status {done.returncode}"  # its last words, one line
        raise OrchError(
            f"{path}: the environment script {profile.env_script} fails here, and every job sources it before "
            f"training: {said.rstrip('.')}. Fix what it names (module versions are at the script's top), then "
            "submit again."
        )
