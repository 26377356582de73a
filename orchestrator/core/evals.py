"""Downstream evaluations of a run's checkpoints (`orch eval`, docs/eval.md): the files they leave in the run
directory, and the local lm-evaluation-harness tasks that ship in evals/tasks/.

`evals/step_K.json` holds the scores of the checkpoint at step K, one entry per task (a later evaluation of the same
task replaces it); its one writer is `orch eval` (in its own process or in the job it queued). `evals/sent/step_K.json`
records which of them MLflow has; its writer is whoever sends the run's metrics to the store, by the same rule as
mlflow.json: `orch eval` itself where the run's profile has `job_tracking: direct`, else `orch sync`.
"""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.core.config import PROJECT_ROOT
from orchestrator.core.runfiles import RunFile

EVALS = "evals"
TASKS_DIR = PROJECT_ROOT / "evals" / "tasks"
EVAL_FILE = re.compile(r"^step_([0-9]+)\.json$")
TASK_LINE = re.compile(r"^task:\s*([^\s#]+)", re.MULTILINE)


class TaskScores(RunFile):
    """One task's scores for one checkpoint."""

    metrics: dict[str, float]  # lm-eval's "acc,none" as "acc", "exact_match,strict-match" as "exact_match/strict-match"
    samples: int | None  # documents scored (after --limit); None for a group of tasks
    limit: int | None  # --limit, where given: the score is of the first `limit` documents only
    finished: float  # when lm-eval returned; the metrics' timestamp in MLflow
    device: str
    lm_eval_version: str
    job_id: str | None = None  # the eval job that scored it; None: the `orch eval` process itself


class CheckpointEval(RunFile):
    """evals/step_K.json."""

    step: int
    tasks: dict[str, TaskScores]


class EvalsSent(RunFile):
    """evals/sent/step_K.json: the scores of step_K.json that the MLflow run has, by task and `finished` time."""

    mlflow_run_id: str
    finished: dict[str, float]


def eval_file(run_dir: Path, step: int) -> Path:
    return run_dir / EVALS / f"step_{step}.json"


def sent_file(run_dir: Path, step: int) -> Path:
    return run_dir / EVALS / "sent" / f"step_{step}.json"


def eval_files(run_dir: Path) -> dict[int, Path]:
    """The run's evals/step_K.json files by step, oldest step first."""
    found = {int(m[1]): p for p in (run_dir / EVALS).glob("step_*.json") if (m := EVAL_FILE.match(p.name))}
    return dict(sorted(found.items()))


def metric_key(task: str, metric: str) -> str:
    """The MLflow key of a task's metric; characters MLflow refuses in a key become '_'."""
    return re.sub(r"[^\w\-./ ]", "_", f"eval/{task}/{metric}")


def local_tasks() -> list[str]:
    """The names of the tasks in evals/tasks/ (each YAML file's `task:`), read without lm-eval."""
    names = {m for path in TASKS_DIR.rglob("*.yaml") for m in TASK_LINE.findall(path.read_text(encoding="utf-8"))}
    return sorted(names)
