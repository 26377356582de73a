"""Export: one checkpoint of a run as a Hugging Face model directory.

It runs where the run directory is readable, on a login node too: no GPU and no process group, because
torch.distributed.checkpoint reads every rank's shard into full tensors in one process.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.core import checkpoints
from orchestrator.core.config import Recipe
from orchestrator.core.errors import OrchError
from orchestrator.core.loading import validate
from orchestrator.core.rundir import Run, get_run
from orchestrator.core.yamlio import read_yaml

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM


class CheckpointUnavailable(OrchError):
    """A checkpoint that was committed when it was chosen is damaged, or has been deleted since (retention)."""


def tokenizer_dir(run: Run) -> Path:
    """The tokenizer the run's data was tokenized with, as the training job saved it beside the packed data."""
    return run.data_dir / "tokenizer"


def choose_step(run: Run, step: int | None, purpose: str = "export") -> int:
    """The asked step if it has a committed checkpoint; by default the one `latest.json` names, else the newest.
    `purpose` is what the refusals say the step was for (export, evaluate)."""
    steps = sorted(checkpoints.committed_steps(run.checkpoints_dir))
    if not steps:
        raise OrchError(f"Run {run.id} has no checkpoint yet (none in {run.checkpoints_dir}); nothing to {purpose}.")
    if step is None:
        latest = checkpoints.committed_step(run.checkpoints_dir)
        return latest if latest in steps else steps[-1]
    if step not in steps:
        raise OrchError(
            f"Run {run.id} has no checkpoint at step {step} (option --step). Available steps: "
            f"{', '.join(map(str, steps))}; leave --step out to {purpose} the latest."
        )
    return step


def load_checkpoint(run: Run, step: int) -> LlamaForCausalLM:
    """The full model of one checkpoint whose files match their manifest, on the CPU, in float32 as trained."""
    import torch.distributed.checkpoint as dcp

    from jobs.model import build_empty_model, model_config

    recipe_path = run.dir / "recipe.yaml"
    spec = validate(recipe_path, Recipe, read_yaml(recipe_path)).model
    if spec.init_from and not (Path(spec.init_from) / "config.json").is_file():
        raise OrchError(
            f"{recipe_path}: field 'model.init_from' names {spec.init_from!r}, which has no config.json; the "
            "export takes the architecture from it. Make that model directory readable here."
        )
    folder = checkpoints.step_dir(run.checkpoints_dir, step)
    try:
        problem = checkpoints.damage(folder)
        if problem is None:
            model = build_empty_model(model_config(spec, "sdpa"), "cpu")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({"model": model.state_dict()}, checkpoint_id=folder, no_dist=True)
            return model
    except (Exception, dcp.CheckpointException):  # torch's is a BaseException
        if not checkpoints.lost_files(folder):
            raise
    else:
        if (folder / checkpoints.COMMIT_MARKER).is_file():
            raise CheckpointUnavailable(
                f"The checkpoint of run {run.id} at step {step} is damaged ({problem}); export another step."
            )
    keep = run.recipe().checkpoint
    raise CheckpointUnavailable(
        f"The checkpoint of run {run.id} at step {step} was deleted while it was being read (its folder no longer "
        f"holds the files its commit marker lists): retention keeps only the newest {keep.keep_last} checkpoints "
        f"(checkpoint.keep_last) and the multiples of checkpoint.keep_every ({keep.keep_every or 'not set'}) while the "
        "run trains. Export another step, e.g. the latest."
    ) from None


def export(run_id: str, step: int | None, output: Path) -> int:
    """Write the checkpoint of `step` (default: the latest) of a run to `output`; returns the step exported."""
    return export_run(get_run(run_id), step, output)


def export_run(run: Run, step: int | None, output: Path) -> int:
    """`export` for a run found by its directory (a job has no run store to look it up in)."""
    from transformers import AutoTokenizer

    from jobs.model import save_hf_model

    chosen = choose_step(run, step)
    tokenizer_path = tokenizer_dir(run)
    if not tokenizer_path.is_dir():
        raise OrchError(f"Run {run.id} has no tokenizer at {tokenizer_path}; its data was never prepared.")
    save_hf_model(load_checkpoint(run, chosen), AutoTokenizer.from_pretrained(tokenizer_path), output)
    return chosen
