"""`orch eval`: a run followed while it trains (`--every`), its milestones scored as they commit, and a trained run's
checkpoint scored, with lm-evaluation-harness on the local czech_cloze task, offline; the scores in the run directory
and in the run's MLflow run; the refusals; the Slurm jobs chained after (or following) training."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import module_home, orch, status_json, submitted_run_id

# Each test starts a training run or needs lm-eval, which is in the eval extra, not in .venv-lowest's pins.
pytestmark = pytest.mark.slow


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An ORCH_HOME in which nothing may reach the Hugging Face hub."""
    with module_home(tmp_path_factory, "eval", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1") as orch_home:
        yield orch_home


@dataclass(frozen=True)
class Followed:
    run_dir: Path
    started_during_training: bool  # the run had not completed when `orch eval --every` started
    result: subprocess.CompletedProcess[str]  # of `orch eval --every`
    scores: dict[int, dict]  # evals/step_K.json as the follower left them (later tests score step 20 again)


@pytest.fixture(scope="module")
def followed(home: Path) -> Followed:
    """The tiny recipe trained 20 steps on the local profile (checkpoints at steps 10 and 20, kept for good), submitted
    without waiting, and `orch eval --every 10` started at once, following the run while it trains."""
    run_id = submitted_run_id(orch("submit", "--steps", "20", "--set", "recipe.checkpoint.keep_every=10"))
    run_dir = home / "runs" / run_id
    progress = run_dir / "progress.json"
    training = not progress.is_file() or json.loads(progress.read_text())["state"] != "completed"
    result = orch("eval", run_id, "--tasks", "czech_cloze", "--every", "10", "--limit", "5")
    scores = {int(p.stem.removeprefix("step_")): json.loads(p.read_text()) for p in run_dir.glob("evals/step_*.json")}
    return Followed(run_dir, training, result, scores)


@pytest.fixture(scope="module")
def trained(followed: Followed) -> Path:
    """The followed run's directory once it has completed: committed checkpoints at steps 10 and 20."""
    return followed.run_dir


@pytest.fixture(scope="module")
def slurm_run(home: Path) -> Path:
    """A run of the local-slurm profile whose training job 4242 is queued: as `orch submit` records it, but never
    given to Slurm (the dry runs below ask no scheduler), and without any checkpoint yet; its recipe keeps every
    20th step."""
    from orchestrator.cli.submit import dump
    from orchestrator.core.loading import load_profile, load_recipe, parse_override
    from orchestrator.core.rundir import create_run

    _, profile = load_profile("local-slurm")
    _, recipe = load_recipe("tiny", [parse_override("recipe.checkpoint.keep_every=20")])
    info = {"profile": "local-slurm", "recipe": "tiny", "steps": 10, "stop_before_end_s": 30}
    run = create_run("tiny-eval-slurm", info, dump(profile), dump(recipe))
    run.add_job("4242", "slurm")
    return run.dir


def eval_history(home: Path, run_dir: Path) -> list[tuple[int, float]]:
    """The run's MLflow history of eval/czech_cloze/acc, as (step, value)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    mlflow_run = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    return sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run, "eval/czech_cloze/acc"))


def test_every_scores_each_milestone_as_it_commits_and_ends_when_the_run_has_completed(home: Path, followed: Followed):
    assert followed.started_during_training
    assert followed.result.returncode == 0, followed.result.stdout + followed.result.stderr
    assert status_json(followed.run_dir.name)["state"] == "completed"
    assert sorted(followed.scores) == [10, 20]
    for step, scores in followed.scores.items():
        task = scores["tasks"]["czech_cloze"]
        assert scores["step"] == step and task["limit"] == task["samples"] == 5 and task["asked"] == ["czech_cloze"]
        assert (step, task["metrics"]["acc"]) in eval_history(home, followed.run_dir)
    assert {step for step, _ in eval_history(home, followed.run_dir)} == {10, 20}
    assert "its milestones are scored (now: 10, 20)" in followed.result.stdout

    again = orch("eval", followed.run_dir.name, "--tasks", "czech_cloze", "--every", "10", "--limit", "5")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "its milestones are scored (now: none)" in again.stdout  # evals/ says both are scored: nothing is redone


def test_eval_scores_the_checkpoint_into_the_run_directory_and_its_mlflow_run(home: Path, trained: Path):
    result = orch("eval", trained.name, "--tasks", "czech_cloze", "--limit", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    scores = json.loads((trained / "evals" / "step_20.json").read_text())
    task = scores["tasks"]["czech_cloze"]
    assert scores["step"] == 20 and task["samples"] == 20 and task["limit"] == 20 and task["device"] == "cpu"
    assert 0 <= task["metrics"]["acc"] <= 1
    sent, scored = ["sent/step_10.json", "sent/step_20.json"], ["step_10.json", "step_20.json"]
    assert files_under(trained / "evals") == ["sent", *sent, *scored]  # no exported model left
    history = eval_history(home, trained)
    assert (20, task["metrics"]["acc"]) in history

    # `orch sync` is the sender for spooling profiles: it sends what evals/sent/ does not record, once in MLflow
    (trained / "evals" / "sent" / "step_20.json").unlink()
    assert orch("sync", trained.name).returncode == 0
    assert (trained / "evals" / "sent" / "step_20.json").is_file()
    assert eval_history(home, trained) == history


def test_a_task_or_step_that_does_not_exist_and_a_run_without_checkpoints_are_refused_with_nothing_written(
    trained: Path, slurm_run: Path
):
    before = files_under(trained)

    unknown = orch("eval", trained.name, "--tasks", "czech_cloze,no_such_task")
    assert unknown.returncode == 2
    assert "'no_such_task'" in unknown.stderr and "evals/tasks/: czech_cloze" in unknown.stderr

    not_committed = orch("eval", trained.name, "--tasks", "czech_cloze", "--step", "7")
    assert not_committed.returncode == 2 and "no checkpoint at step 7" in not_committed.stderr
    assert "Available steps: 10, 20" in not_committed.stderr

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


def test_every_is_refused_with_step_after_training_a_step_without_checkpoints_or_an_unknown_task(
    trained: Path, slurm_run: Path
):
    before = files_under(trained)
    refusals = {
        ("--every", "0"): "Option --every is 0. Allowed: a number of steps, 1 or more",
        ("--every", "15"): "not a multiple of run",
        ("--every", "10", "--step", "10"): "Options --every 10 and --step 10 exclude each other",
        ("--every", "10", "--after-training"): "Options --every 10 and --after-training exclude each other",
        ("--every", "10", "--tasks", "no_such_task"): "'no_such_task', which is neither a local task",
        ("--every", "10", "--profile", "local-slurm", "--dry-run"): "runs under the local executor on this machine",
    }
    for options, refusal in refusals.items():
        tasks = () if "--tasks" in options else ("--tasks", "czech_cloze")
        refused = orch("eval", trained.name, *tasks, *options)
        assert refused.returncode == 2 and refusal in refused.stderr, (options, refused.stderr)
        assert "Traceback" not in refused.stderr
    assert files_under(trained) == before

    kept_every_20 = orch("eval", slurm_run.name, "--tasks", "czech_cloze", "--every", "10")
    assert kept_every_20.returncode == 2
    assert "only the multiples of checkpoint.keep_every (20) are kept for good" in kept_every_20.stderr


def test_every_with_a_slurm_profile_queues_one_job_that_starts_once_training_has_started(slurm_run: Path):
    every_20 = ("--tasks", "czech_cloze", "--every", "20")
    dry = orch("eval", slurm_run.name, *every_20, "--profile", "local-slurm", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "#SBATCH --dependency=after:4242" in dry.stdout and "#SBATCH --kill-on-invalid-dep=yes" in dry.stdout
    assert "#SBATCH --ntasks-per-node=1" in dry.stdout and "#SBATCH --time=30" in dry.stdout  # the profile's limit
    assert "each checkpoint at a multiple of step 20 and the final one as it commits" in dry.stdout
    assert "This job holds 1 process for the rest of the training" in dry.stdout  # what it costs, and the cheaper way
    assert f"orch eval {slurm_run.name} --tasks czech_cloze --step K --profile local-slurm" in dry.stdout
    assert not (slurm_run / "evals").exists()
