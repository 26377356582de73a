"""How a profile's job is queued: one adapter per executor kind, each a submitit executor and the environment the
submitting process gives it. Liveness and cancelling are `orchestrator.core.scheduler`'s."""

from __future__ import annotations

import getpass
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from orchestrator.core.config import PROJECT_ROOT, Profile
from orchestrator.core.errors import OrchError
from orchestrator.core.plan import Plan
from orchestrator.core.scheduler import partition_nodes
from orchestrator.core.settings import runs_root

log = logging.getLogger(__name__)


ENV_CHECK_TIMEOUT_S = 120


def fill_path(template: str, profile: Profile) -> str:
    """A profile path with its placeholders ({account_lower}, {user}) filled in."""
    account = (profile.slurm.account if profile.slurm else None) or ""
    return template.format(account_lower=account.lower(), user=getpass.getuser())


def runs_location(profile: Profile) -> Path:
    """The folder that holds the profile's run directories (the profile's `paths.runs`, else ORCH_HOME's)."""
    return Path(fill_path(profile.paths.runs, profile)) if profile.paths.runs else runs_root()


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


def from_frozen_code(profile: Profile, code_dir: Path) -> Profile:
    """The profile a run's job is queued with: its Python imports the run's `code/` ahead of any checkout, and not
    even from the folder it starts in (PYTHONSAFEPATH), and it sources the environment script of that copy, so every
    requeue runs the code that was submitted."""
    frozen = {"PYTHONPATH": str(code_dir), "PYTHONSAFEPATH": "1"}
    update: dict[str, Any] = {"env_vars": {**profile.env_vars, **frozen}}
    if profile.env_script:  # absolute: setup_lines joins it to PROJECT_ROOT, which an absolute path replaces
        update["env_script"] = str(code_dir / profile.env_script)
    return profile.model_copy(update=update)


def excluding(
    profile: Profile, hosts: list[str], nodes_of: Callable[[str], list[str] | None] = partition_nodes
) -> Profile:
    """The profile with `hosts` kept out of the job (sbatch --exclude, besides any the profile names), unless that
    would leave the partition (its nodes as `nodes_of` lists them) fewer nodes than the job needs: such a job would
    wait for good, so it goes where it may and the suspects stay recorded (a warning says so)."""
    if not hosts or profile.slurm is None:
        return profile
    named = [h for h in profile.slurm.extra_sbatch.get("exclude", "").split(",") if h]
    excluded = sorted({*named, *hosts})
    nodes = nodes_of(profile.slurm.partition)
    if nodes is not None and len(set(nodes) - set(excluded)) < profile.nodes:
        log.warning(
            "not excluding the suspect hosts %s: partition %s has %d nodes (%s), and the job needs %d",
            ",".join(hosts), profile.slurm.partition, len(nodes), ",".join(nodes), profile.nodes,
        )  # fmt: skip
        return profile
    extra = {**profile.slurm.extra_sbatch, "exclude": ",".join(excluded)}
    return profile.model_copy(update={"slurm": profile.slurm.model_copy(update={"extra_sbatch": extra})})


class Executor(Protocol):
    def make(self, profile: Profile, plan: Plan | None, folder: Path, requeues: int | None = None) -> Any:
        """A configured submitit executor whose jobs keep their files under `folder`; `plan` None: a one-off job.
        `requeues`: how often a job may requeue itself at its time limit, where not as the plan needs."""

    def environment(self, profile: Profile, log: Path) -> Any:
        """A context in which `submit` is called."""

    def script(self, profile: Profile, plan: Plan | None, run_dir: Path) -> str | None:
        """The job script the scheduler would receive, where there is one."""


class LocalExecutor:
    """submitit's LocalExecutor: the profile's tasks as processes on this machine."""

    def make(self, profile: Profile, plan: Plan | None, folder: Path, requeues: int | None = None) -> Any:
        import submitit

        executor = submitit.LocalExecutor(folder=folder / "%j", max_num_timeout=max_requeues(plan, requeues))
        executor.update_parameters(
            tasks_per_node=profile.launch.tasks_per_node,
            timeout_min=profile.time_limit_min,
            signal_delay_s=signal_delay_s(profile, plan),
        )
        return executor

    @contextmanager
    def environment(self, profile: Profile, log: Path) -> Iterator[None]:
        """A local job inherits this process's environment and open files while it starts: give it the profile's
        variables (setup lines would put a shell between the job id and the job, which signals must reach) and
        a log file instead of our stdout and stderr (a pipe reading them would otherwise wait for the job). The job
        starts with SIGINT ignored: it shares the terminal's process group, and Ctrl-C on `--wait` must stop the
        following only (`orch cancel` stops the job)."""
        saved_env, saved_fds = dict(os.environ), (os.dup(1), os.dup(2))
        saved_interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
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
            signal.signal(signal.SIGINT, saved_interrupt)

    def script(self, profile: Profile, plan: Plan | None, run_dir: Path) -> str | None:
        return None


class SlurmExecutor:
    """submitit's SlurmExecutor: an sbatch script with one task per GPU (or per the profile's launch layout)."""

    def make(self, profile: Profile, plan: Plan | None, folder: Path, requeues: int | None = None) -> Any:
        import submitit

        slurm = profile.slurm
        executor = submitit.SlurmExecutor(
            folder=folder / "%j", max_num_timeout=max_requeues(plan, requeues), python=profile.python or None
        )
        parameters: dict[str, Any] = {
            "job_name": f"orch-{folder.parent.name}",
            "nodes": profile.nodes,
            "ntasks_per_node": profile.launch.tasks_per_node,
            "cpus_per_task": slurm.cpus_per_task,
            "time": int(profile.time_limit_min),
            "partition": slurm.partition,
            "signal_delay_s": signal_delay_s(profile, plan),
            "setup": setup_lines(profile),
            "wckey": slurm.wckey,  # None leaves it out (submitit's default, "submitit", is refused where enforced)
            # srun does not take --cpus-per-task from sbatch on Slurm 22.05-23.02; one crashed rank ends the step
            # instead of leaving the others blocked in a collective until the timeout.
            "srun_args": [f"--cpus-per-task={slurm.cpus_per_task}", "--kill-on-bad-exit=1"],
            # requeue after a timeout or preemption, whatever the site's default
            "additional_parameters": {"requeue": True, **slurm.extra_sbatch},
        }
        if profile.node.gpus:
            parameters["gpus_per_node"] = profile.node.gpus
        if slurm.account:
            parameters["account"] = slurm.account
        if slurm.qos:
            parameters["qos"] = slurm.qos
        executor.update_parameters(**parameters)
        return executor

    @contextmanager
    def environment(self, profile: Profile, log: Path) -> Iterator[None]:
        """sbatch runs the setup lines on the node: nothing to change here."""
        yield

    def script(self, profile: Profile, plan: Plan | None, run_dir: Path) -> str | None:
        """The exact script `sbatch` would receive for this run."""
        executor = self.make(profile, plan, run_dir / "submitit")
        return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


EXECUTORS: dict[str, Executor] = {"local": LocalExecutor(), "slurm": SlurmExecutor()}


def executor_for(profile: Profile) -> Executor:
    return EXECUTORS[profile.executor]


def setup_lines(profile: Profile) -> list[str]:
    """Shell lines run before the job starts: the environment script and variables, all quoted."""
    lines = [f"export {name}={shlex.quote(value)}" for name, value in profile.env_vars.items()]
    if profile.env_script:
        if profile.paths.venv:
            lines.append(f"export ORCH_VENV={shlex.quote(fill_path(profile.paths.venv, profile))}")
        lines.append(f"source {shlex.quote(str(PROJECT_ROOT / profile.env_script))}")
    return lines


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
