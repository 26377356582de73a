"""The object submitit pickles. It stays light so the login-node side can pickle it without torch."""

from __future__ import annotations

from pathlib import Path


class TrainJob:
    """Runs the training loop of one run directory on every rank of the job."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def __call__(self) -> int:
        from jobs.train import run_training

        return run_training(self.run_dir)
