"""`orch export` on a real run: its checkpoints become Hugging Face directories that compute what training computed."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, pipeline
from typer.testing import CliRunner

from jobs.model import build_model
from orchestrator.cli.commands.model import app
from orchestrator.core.config import Recipe
from orchestrator.core.errors import OrchError
from orchestrator.core.loading import load_recipe
from tests.conftest import orch, status_json

pytestmark = pytest.mark.slow

PROMPT = "Nejznámějším českým spisovatelem "


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A real 4-step `tiny` run (2 gloo ranks) with checkpoints at steps 2 and 4; ORCH_HOME points at it."""
    root = tmp_path_factory.mktemp("export")
    _, tiny = load_recipe("tiny")
    recipe = tiny.model_dump(mode="json")
    recipe["checkpoint"]["every_steps"] = 2
    (root / "tiny-every-2.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ORCH_HOME", str(root / "orch-home"))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = orch(
            "submit", "--profile", "local", "--recipe", str(root / "tiny-every-2.yaml"), "--steps", "4", "--wait"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        yield {**status_json()[0], "root": root}


def export(*args: str | Path):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def training_model(run: dict, step: int) -> LlamaForCausalLM:
    """The training side's model with the checkpoint's full weights, read without a process group."""
    run_dir = Path(run["run_dir"])
    recipe = Recipe.model_validate(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    model = build_model(recipe.model, "sdpa")
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=run_dir / f"checkpoints/step_{step:08d}", no_dist=True)
    model.load_state_dict(state["model"])
    return model.eval()


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_export_of_the_latest_step_computes_the_training_models_logits(run, tmp_path: Path):
    result = export(run["run_id"], "--output", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    assert f"at step 4 to {tmp_path / 'hf'}" in " ".join(result.output.split())
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokens = tokenizer("Petr čte knihu v Praze. Jana píše dopis doma.", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(logits(exported, tokens), logits(training_model(run, 4), tokens), rtol=0, atol=1e-6)
    assert exported.config.vocab_size == 512
    assert exported.generation_config.eos_token_id == tokenizer.eos_token_id == exported.config.eos_token_id
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["pad_token_id"] == tokenizer.eos_token_id  # orch's tokenizers have no pad token: eos pads


def test_export_of_an_earlier_step_holds_that_steps_weights(run, tmp_path: Path):
    assert export(run["run_id"], "--step", "2", "--output", tmp_path / "hf").exit_code == 0
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    at_step_2, at_step_4 = training_model(run, 2).state_dict(), training_model(run, 4).state_dict()
    assert all(torch.equal(value, at_step_2[key]) for key, value in exported.items())
    assert not torch.equal(exported["lm_head.weight"], at_step_4["lm_head.weight"])


def test_model_card_usage_example_runs_on_an_export_on_cpu(run, tmp_path: Path):
    assert export(run["run_id"], "--output", tmp_path / "hf").exit_code == 0
    name = str(tmp_path / "hf")
    torch.manual_seed(0)

    config = transformers.AutoConfig.from_pretrained(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(name, config=config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    out = pipe(PROMPT, max_new_tokens=20, top_p=0.95, top_k=50, repetition_penalty=1.0, do_sample=True, use_cache=True)

    assert out[0]["generated_text"].startswith(PROMPT)


def test_export_refuses_an_unknown_run_and_a_step_without_checkpoint(run, tmp_path: Path):
    unknown = export("no-such-run", "--output", tmp_path / "a")
    assert isinstance(unknown.exception, OrchError) and "No run 'no-such-run'" in str(unknown.exception)
    missing = export(run["run_id"], "--step", "3", "--output", tmp_path / "b")
    assert isinstance(missing.exception, OrchError)
    assert "no checkpoint at step 3 (option --step). Available steps: 2, 4" in str(missing.exception)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_refuses_a_damaged_checkpoint(run, tmp_path: Path):
    copy = Path(run["run_dir"]).with_name(f"{run['run_id']}-copy")
    shutil.copytree(run["run_dir"], copy)
    shard = next((copy / "checkpoints/step_00000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    damaged = export(copy.name, "--output", tmp_path / "hf")
    assert isinstance(damaged.exception, OrchError)
    assert f"at step 4 is damaged ({shard.name} has" in str(damaged.exception)


def test_export_of_a_checkpoint_deleted_while_it_is_read_says_so(run, tmp_path: Path, monkeypatch):
    copy = Path(run["run_dir"]).with_name(f"{run['run_id']}-deleted")
    shutil.copytree(run["run_dir"], copy)
    read = dcp.load

    def deleted_by_retention_meanwhile(*args, **kwargs):
        shutil.rmtree(kwargs["checkpoint_id"])  # after the manifest was checked, before the shards are read
        return read(*args, **kwargs)

    monkeypatch.setattr(dcp, "load", deleted_by_retention_meanwhile)
    gone = export(copy.name, "--step", "2", "--output", tmp_path / "hf")
    assert isinstance(gone.exception, OrchError), gone.exception
    assert "at step 2 was deleted while it was being read" in str(gone.exception)
    assert "checkpoint.keep_last" in str(gone.exception)
