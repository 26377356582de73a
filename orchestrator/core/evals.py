"""Downstream evaluations of a run's checkpoints (`orch eval`, docs/eval.md): the files they leave in the run
directory, and the local lm-evaluation-harness tasks that ship in evals/tasks/.

`evals/step_K.json` holds the scores of the checkpoint at step K, one entry per task (a later evaluation of the same
task replaces it); its one writer is `orch eval` (in its own process or in the job it queued). `evals/sent/step_K.json`
records which of them MLflow has; its writer is whoever sends the run's metrics to the store, by the same rule as
mlflow.json: `orch eval` itself where the run's profile has `job_tracking: direct`, else `orch sync`.

`orch eval --every K` follows a run and scores its milestones (steps that are multiples of K, and the final step) as
they commit; which of them are due is decided here, from the committed steps and the scores evals/ holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from orchestrator.core.config import PROJECT_ROOT, CheckpointSpec
from orchestrator.core.errors import OrchError
from orchestrator.core.runfiles import DamagedFile, RunFile, read_model

EVALS = "evals"
TASKS_DIR = PROJECT_ROOT / "evals" / "tasks"
EVAL_FILE = re.compile(r"^step_([0-9]+)\.json$")
# the model an evaluation of step K exports and scores, a temporary folder in evals/ (`files.temporary_folder`)
EXPORT_PREFIX = ".step_{step}.model-"
EXPORTS = EXPORT_PREFIX.format(step="*") + "*"
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
    asked: list[str] = []  # the --tasks names of that evaluation: a tag's tasks are scored under their own names


class CheckpointEval(RunFile):
    """evals/step_K.json."""

    step: int
    tasks: dict[str, TaskScores]

    def covers(self, tasks: Iterable[str], limit: int | None) -> bool:
        """Whether every one of `tasks` has a score of the same `limit` (a score of the first N documents compares
        only with another of N): by its own name, or as a name its evaluation was asked for (a tag, a group)."""
        return all(
            any(score.limit == limit and name in (task, *score.asked) for task, score in self.tasks.items())
            for name in tasks
        )


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


def scored_steps(run_dir: Path, tasks: Iterable[str], limit: int | None) -> set[int]:
    """The steps whose evals/step_K.json scores every one of `tasks` at `limit`; a damaged file scores none (the
    next evaluation of its step replaces it)."""
    tasks = list(tasks)
    scored = set()
    for step, path in eval_files(run_dir).items():
        try:
            scores = read_model(path, CheckpointEval)
        except DamagedFile:
            continue
        if scores is not None and scores.covers(tasks, limit):
            scored.add(step)
    return scored


def due_milestones(committed: Iterable[int], every: int, final_step: int, scored: set[int]) -> list[int]:
    """The committed steps that `orch eval --every` scores next, oldest first: multiples of `every` and the run's
    final step, unless already scored."""
    return sorted(s for s in committed if (s % every == 0 or s == final_step) and s not in scored)


def check_milestones(run_id: str, spec: CheckpointSpec, every: int) -> None:
    """Refuse an `--every` whose milestones the run never saves, or that retention may delete before they are
    scored: retention keeps the newest `keep_last` checkpoints and, for good, the multiples of `keep_every`."""
    if every < 1:
        raise OrchError(
            f"Option --every is {every}. Allowed: a number of steps, 1 or more, that is a multiple of run {run_id}'s "
            f"checkpoint.every_steps ({spec.every_steps})."
        )
    if every % spec.every_steps:
        below = every // spec.every_steps * spec.every_steps
        nearest = ", ".join(str(k) for k in (below, below + spec.every_steps) if k)
        raise OrchError(
            f"Option --every is {every}, which is not a multiple of run {run_id}'s checkpoint.every_steps "
            f"({spec.every_steps}): the run saves no checkpoint at most of those steps. Allowed: a multiple of "
            f"{spec.every_steps}, e.g. {nearest}."
        )
    if spec.keep_every is None or every % spec.keep_every:
        kept = (
            f"only the multiples of checkpoint.keep_every ({spec.keep_every}) are kept for good"
            if spec.keep_every
            else "checkpoint.keep_every is not set, so no milestone is kept for good"
        )
        raise OrchError(
            f"Option --every is {every}, but run {run_id}'s retention may delete those checkpoints before they are "
            f"scored: it keeps the newest {spec.keep_last} (checkpoint.keep_last) and {kept}. Allowed: a multiple of "
            f"keep_every{f' ({spec.keep_every})' if spec.keep_every else ''}. A run to be followed this way is "
            "submitted with the milestones it keeps, e.g. `orch submit ... --set "
            f"recipe.checkpoint.keep_every={every}`; score this run's checkpoints one at a time with "
            f"`orch eval {run_id} --step K --tasks ...`."
        )
