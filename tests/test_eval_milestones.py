"""`orch eval --every K` without training: which committed steps are due, what counts as scored, and which K a run's
checkpoint cadence and retention allow (the follower itself runs end to end in tests/test_eval.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.core.config import CheckpointSpec
from orchestrator.core.errors import OrchError
from orchestrator.core.evals import (
    CheckpointEval,
    TaskScores,
    check_milestones,
    due_milestones,
    eval_file,
    scored_steps,
)


def task_scores(limit: int | None, asked: list[str]) -> TaskScores:
    return TaskScores(
        metrics={"acc": 0.5}, samples=limit, limit=limit, finished=1.0, device="cpu", lm_eval_version="0", asked=asked
    )


def write_scores(run_dir: Path, step: int, tasks: dict[str, TaskScores]) -> None:
    path = eval_file(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CheckpointEval(step=step, tasks=tasks).model_dump_json())


def test_due_milestones_are_the_unscored_multiples_and_the_final_step_oldest_first():
    committed = [40, 35, 30, 20, 13, 10]  # newest first, as committed_steps lists them; 13 and 35: stop saves
    assert due_milestones(committed, 10, 35, scored=set()) == [10, 20, 30, 35, 40]
    assert due_milestones(committed, 20, 35, scored={20}) == [35, 40]
    assert due_milestones(committed, 20, 100, scored=set()) == [20, 40]
    assert due_milestones([], 10, 20, scored=set()) == []


def test_a_step_counts_as_scored_only_when_every_task_has_a_score_of_the_same_limit(tmp_path: Path):
    write_scores(tmp_path, 10, {"czech_cloze": task_scores(5, ["czech_cloze"])})
    write_scores(tmp_path, 20, {"czech_cloze": task_scores(None, ["czech_cloze"])})
    write_scores(tmp_path, 30, {"a_1": task_scores(5, ["tag_a", "b"]), "b": task_scores(5, ["tag_a", "b"])})
    eval_file(tmp_path, 40).write_text('{"step": 40, "tasks": ')  # a damaged file: its step is scored again

    assert scored_steps(tmp_path, ["czech_cloze"], 5) == {10}
    assert scored_steps(tmp_path, ["czech_cloze"], None) == {20}
    assert scored_steps(tmp_path, ["tag_a"], 5) == {30}  # a tag is scored under its tasks' names
    assert scored_steps(tmp_path, ["tag_a", "czech_cloze"], 5) == set()
    assert scored_steps(tmp_path / "no-run", ["czech_cloze"], 5) == set()


def test_an_older_scores_file_without_asked_names_still_counts_its_tasks(tmp_path: Path):
    entry = task_scores(5, []).model_dump()
    del entry["asked"]
    eval_file(tmp_path, 10).parent.mkdir()
    eval_file(tmp_path, 10).write_text(json.dumps({"step": 10, "tasks": {"czech_cloze": entry}}))
    assert scored_steps(tmp_path, ["czech_cloze"], 5) == {10}


@pytest.mark.parametrize(
    ("every", "spec", "refusal"),
    [
        (0, {"every_steps": 10, "keep_every": 10}, "Option --every is 0. Allowed: a number of steps, 1 or more"),
        (15, {"every_steps": 10, "keep_every": 10}, "not a multiple of run r's checkpoint.every_steps (10)"),
        (10, {"every_steps": 10}, "checkpoint.keep_every is not set, so no milestone is kept for good"),
        (10, {"every_steps": 10, "keep_every": 20}, "only the multiples of checkpoint.keep_every (20) are kept"),
    ],
)
def test_every_is_refused_where_the_run_saves_no_checkpoint_or_retention_may_delete_it(every, spec, refusal):
    with pytest.raises(OrchError) as refused:
        check_milestones("r", CheckpointSpec(**spec), every)
    assert refusal in str(refused.value) and "--every" in str(refused.value)


def test_every_is_accepted_on_multiples_of_keep_every():
    for every in (20, 40):
        check_milestones("r", CheckpointSpec(every_steps=10, keep_every=20), every)


def test_a_follower_scores_the_due_milestones_in_step_order_leaves_a_deleted_one_and_ends_with_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from orchestrator.core.checkpoints import COMMIT_MARKER
    from orchestrator.core.rundir import Run
    from orchestrator.tools import evaluate_checkpoint
    from orchestrator.tools.export import CheckpointUnavailable

    run = Run(tmp_path / "run")
    info = {"run_id": "run", "created": 0, "profile": "local", "recipe": "tiny", "steps": 35, "stop_before_end_s": 0}
    (run.checkpoints_dir).mkdir(parents=True)
    (run.dir / "run.json").write_text(json.dumps(info))
    (run.dir / "jobs.json").write_text(json.dumps([{"job_id": "7", "executor": "local", "submitted": 0}]))
    completed = {"state": "completed", "step": 35, "steps": 35, "job_id": "7", "updated": 0}
    (run.dir / "progress.json").write_text(json.dumps(completed))
    for step in (5, 10, 20, 30, 35):
        (run.checkpoints_dir / f"step_{step:08d}").mkdir()
        (run.checkpoints_dir / f"step_{step:08d}" / COMMIT_MARKER).write_text("{}")
    write_scores(run.dir, 10, {"czech_cloze": task_scores(5, ["czech_cloze"])})  # scored by an earlier follower

    def scored_unless_deleted(run: Run, step: int, tasks: list[str], limit: int | None, *_) -> CheckpointEval:
        if step == 20:
            raise CheckpointUnavailable("The checkpoint of run run at step 20 was deleted while it was being read")
        return evaluate_checkpoint.record(run, step, {task: task_scores(limit, tasks) for task in tasks})

    monkeypatch.setattr(evaluate_checkpoint, "evaluate", scored_unless_deleted)
    handled = list(evaluate_checkpoint.follow_milestones(run, 10, ["czech_cloze"], 5, "cpu"))
    assert [(m.step, m.scores is not None) for m in handled] == [(20, False), (30, True), (35, True)]
    assert "was deleted while it was being read" in handled[0].problem
    assert scored_steps(run.dir, ["czech_cloze"], 5) == {10, 30, 35}
