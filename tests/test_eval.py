"""`orch eval`: a trained run's checkpoint scored with lm-evaluation-harness on the local czech_cloze task, offline; the
scores in the run directory and in the run's MLflow run; the refusals; the Slurm job chained after training."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import orch, submitted_run_id

# Each test starts a training run or needs lm-eval, which is in the eval extra, not in .venv-lowest's pins.
pytestmark = pytest.mark.slow


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An ORCH_HOME in which nothing may reach the Hugging Face hub."""
    orch_home = tmp_path_factory.mktemp("eval") / "orch-home"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ORCH_HOME", str(orch_home))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_DATASETS_OFFLINE", "1")
        yield orch_home


@pytest.fixture(scope="module")
def trained(home: Path) -> Path:
    """The run directory of the tiny recipe trained 10 steps on the local profile (one checkpoint, at step 10)."""
    run_id = submitted_run_id(orch("submit", "--steps", "10", "--wait"))
    return home / "runs" / run_id


@pytest.fixture(scope="module")
def slurm_run(home: Path) -> Path:
    """A run of the local-slurm profile whose training job 4242 is queued: as `orch submit` records it, but never
    given to Slurm (the dry run below asks no scheduler), and without any checkpoint yet."""
    from orchestrator.cli.submit import dump
    from orchestrator.core.config import load_profile, load_recipe
    from orchestrator.core.rundir import create_run

    _, profile = load_profile("local-slurm")
    _, recipe = load_recipe("tiny")
    info = {"profile": "local-slurm", "recipe": "tiny", "steps": 10, "stop_before_end_s": 30}
    run = create_run("tiny-eval-slurm", info, dump(profile), dump(recipe))
    run.add_job("4242", "slurm")
    return run.dir


def test_eval_scores_the_checkpoint_into_the_run_directory_and_its_mlflow_run(home: Path, trained: Path):
    import mlflow

    result = orch("eval", trained.name, "--tasks", "czech_cloze", "--limit", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    scores = json.loads((trained / "evals" / "step_10.json").read_text())
    task = scores["tasks"]["czech_cloze"]
    assert scores["step"] == 10 and task["samples"] == 20 and task["limit"] == 20 and task["device"] == "cpu"
    assert 0 <= task["metrics"]["acc"] <= 1
    assert files_under(trained / "evals") == ["sent", "sent/step_10.json", "step_10.json"]  # no exported model left

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    mlflow_run = json.loads((trained / "mlflow.json").read_text())["run_id"]
    history = client.get_metric_history(mlflow_run, "eval/czech_cloze/acc")
    assert [(m.step, m.value) for m in history] == [(10, task["metrics"]["acc"])]

    # `orch sync` is the sender for spooling profiles: it sends what evals/sent/ does not record, once in MLflow
    (trained / "evals" / "sent" / "step_10.json").unlink()
    assert orch("sync", trained.name).returncode == 0
    assert (trained / "evals" / "sent" / "step_10.json").is_file()
    assert len(client.get_metric_history(mlflow_run, "eval/czech_cloze/acc")) == 1


def test_a_task_or_step_that_does_not_exist_and_a_run_without_checkpoints_are_refused_with_nothing_written(
    trained: Path, slurm_run: Path
):
    before = files_under(trained)

    unknown = orch("eval", trained.name, "--tasks", "czech_cloze,no_such_task")
    assert unknown.returncode == 2
    assert "'no_such_task'" in unknown.stderr and "evals/tasks/: czech_cloze" in unknown.stderr

    not_committed = orch("eval", trained.name, "--tasks", "czech_cloze", "--step", "7")
    assert not_committed.returncode == 2 and "no checkpoint at step 7" in not_committed.stderr
    assert "Available steps: 10" in not_committed.stderr

    none_yet = orch("eval", slurm_run.name, "--tasks", "czech_cloze")
    assert none_yet.returncode == 2 and "has no checkpoint yet" in none_yet.stderr

    assert files_under(trained) == before and not (slurm_run / "evals").exists()
    for refused in (unknown, not_committed, none_yet):
        assert "Traceback" not in refused.stderr


def test_after_training_makes_the_eval_job_a_slurm_dependency_of_the_training_job(trained: Path, slurm_run: Path):
    dry = orch("eval", slurm_run.name, "--tasks", "czech_cloze", "--after-training", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "#SBATCH --dependency=afterok:4242" in dry.stdout and "#SBATCH --kill-on-invalid-dep=yes" in dry.stdout
    assert "#SBATCH --ntasks-per-node=1" in dry.stdout
    assert not (slurm_run / "evals").exists()

    local = orch("eval", trained.name, "--tasks", "czech_cloze", "--after-training", "--profile", "local-slurm")
    assert local.returncode == 2 and "runs under the local executor" in local.stderr
