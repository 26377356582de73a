"""Every private or version-dependent part of submitit that orch relies on, in one place; torch's, transformers' and
accelerate's are in jobs/compat.py. Nothing here imports submitit, so that the core stays light (the import contract
in pyproject.toml); tests/test_compat.py checks each of them against the installed submitit, so that an upgrade that
changes one fails there first."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from submitit import SlurmExecutor

SUBMITIT_CONTROLLER_MODULE = "submitit.local._local"
"""The module that the LocalExecutor's job controller runs as; its PID is the job id, so this is how /proc tells a
live local job from a process that took its number (checked on submitit 1.5.4). orch runs the controller with
`LOCAL_CONTROLLER_PROGRAM` instead; this one is still found, for jobs queued by earlier versions."""

LOCAL_CONTROLLER_PROGRAM = (
    "import sys, pathlib; from submitit.local.local import Controller; "
    "Controller(pathlib.Path(sys.argv[1])).run(max_retry=int(sys.argv[2]))"
)
"""The same controller, run as `python -c PROGRAM FOLDER MAX_STARTS`: submitit's module stops a job after six starts
(`Controller.run`'s `max_retry`), whatever requeues `max_num_timeout` allows. A program rather than an orch module,
so that it runs whatever code a run froze (checked on submitit 1.5.4)."""

SUBMITIT_TASK_MODULE = "submitit.core._submit"
"""The module that every task (rank) of a submitit job runs as, under either executor (checked on submitit 1.5.4)."""

LOCAL_REQUEUE_RETURN_CODE = 144
"""A task that exits with this code makes the LocalExecutor's controller start every task of the job again: how a hung
local job is requeued. submitit's `submitit.local.local.LOCAL_REQUEUE_RETURN_CODE`, written out since the core does not
import submitit (checked on submitit 1.5.4)."""


def sbatch_script(executor: SlurmExecutor) -> str:
    """The script that `executor.submit` would give sbatch, for the dry run. submitit has no public call for it:
    this uses the private `_make_submission_file_text` and `_submitit_command_str` (checked on submitit 1.5.4)."""
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")
