"""The object submitit pickles. It stays light so the login-node side can pickle it without torch."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

from submitit import JobEnvironment
from submitit.helpers import Checkpointable


class TrainJob(Checkpointable):
    """Runs the training loop of one run directory on every rank of the job.

    Checkpointable: after a timeout or preemption submitit requeues this same callable; the training
    state itself lives in the run directory's checkpoints, so nothing else needs to travel.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def __call__(self) -> int | None:
        from orchestrator.core.schedulers import rank_started

        rank_started()  # first: a rank never outlives its job
        check_frozen_code(self.run_dir)
        from jobs.preemption import StopFlag

        offline_and_unlimited()
        compile_caches_in(self.run_dir)
        stop = StopFlag()  # before the heavy imports: from now on a warning signal waits for a step boundary
        from jobs.train import run_training

        try:
            return run_training(self.run_dir, stop)
        except SystemExit as requeued:
            # submitit requeues by exiting with a code its controller reads. Everything is saved and flushed
            # by now: leave at once, so no teardown of the training stack can change the exit code.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(requeued.code if isinstance(requeued.code, int) else 1)


def check_frozen_code(run_dir: Path) -> None:
    """The run's code/ is what was frozen at submission, before anything else is imported from it: the job's Python
    would take a module missing there from another checkout, without a word. Damage stops the job with the reason
    recorded where `orch status` finds it."""
    from orchestrator.core.errors import OrchError
    from orchestrator.core.rundir import Run

    run = Run(run_dir)
    problem = run.code_damage()
    if problem:
        job = JobEnvironment()
        err = OrchError(problem)
        run.record_failure(str(job.job_id), job.global_rank, None, err)
        raise err


def offline_and_unlimited() -> None:
    """Compute nodes reach no internet: no Hugging Face hub lookups, no MLflow telemetry. Every shard may be read:
    the open-file limit is raised to the hard limit the site allows."""
    for name, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        os.environ.setdefault(name, value)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def compile_caches_in(run_dir: Path) -> None:
    """torch.compile's caches (inductor's, Triton's) in the run's `cache/` on scratch, not in `$HOME` (small, and
    shared by every job of the user): the run's later jobs reuse what its first compiled. A profile's env_vars that
    name other folders win."""
    for name, folder in {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}.items():
        os.environ.setdefault(name, str(run_dir / "cache" / folder))
