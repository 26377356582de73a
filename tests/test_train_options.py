"""The recipe's speed options train what the plain recipe trains: `compile`, `activation_checkpointing` and both,
on 2 gloo ranks with the job's own Trainer. A compiled step compiles once: the decoder layers share one graph (a KV
cache built in training would give each layer its own, until dynamo's recompile limit on a 22-layer model), and
later steps compile nothing new."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.compat import compiled_graphs, forget_compiled_graphs
from jobs.distributed import Ranks, launch
from jobs.entry import compile_caches_in
from jobs.train import Trainer
from orchestrator.core.config import Recipe
from orchestrator.core.loading import load_profile, load_recipe, merge_all, validate
from orchestrator.core.plan import batching
from orchestrator.tools.run_data import attach_data

pytestmark = pytest.mark.slow
STEPS = 4
VARIANTS = {
    "plain": {},
    "compile": {"compile": True},
    "activation_checkpointing": {"activation_checkpointing": True},
    "both": {"compile": True, "activation_checkpointing": True},
}


def train_variants(ranks: Ranks, recipes: dict[str, Recipe], data_dir: Path, output: Path) -> None:
    """Every variant for STEPS steps; rank 0 writes each one's losses and how many graphs dynamo compiled after the
    first step and after the last."""
    results = {}
    for name, recipe in recipes.items():
        forget_compiled_graphs()
        trainer = Trainer(recipe, batching(recipe.train, ranks.world), data_dir, ranks)
        losses, graphs = [], []
        for step in range(STEPS):
            losses.append(trainer.step(step).loss)
            graphs.append(compiled_graphs())
        results[name] = {"losses": losses, "graphs_after_first": graphs[0], "graphs_after_last": graphs[-1]}
    if ranks.rank == 0:
        output.write_text(json.dumps(results))


def test_compile_and_activation_checkpointing_train_the_plain_losses_without_recompiling(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    compile_caches_in(tmp_path / "run")  # as the job does, before its ranks import torch
    path, tiny = load_recipe("tiny")
    data_dir = tmp_path / "data"
    attach_data(tiny.data, tiny.model.vocab_size, tiny.train.seed, data_dir)
    recipes = {
        name: validate(path, Recipe, merge_all(tiny.model_dump(), [{"train": changes}]))
        for name, changes in VARIANTS.items()
    }
    _, local = load_profile("local")
    output = tmp_path / "results.json"
    launch(local.world_size, "cpu", local.launch.backend, train_variants, recipes, data_dir, output)
    results = json.loads(output.read_text())

    assert any((tmp_path / "run" / "cache" / "inductor").rglob("*.py"))  # compiled code went to the run, not $HOME
    plain = results["plain"]["losses"]
    assert plain[-1] < plain[0]
    # Recomputation repeats the same forward: the same numbers. Compiled kernels fuse and reorder float operations
    # (bf16 matmuls here), so their losses agree to 1e-2 relative, not bitwise.
    assert results["activation_checkpointing"]["losses"] == pytest.approx(plain, rel=1e-6)
    for name in ("compile", "both"):
        assert results[name]["losses"] == pytest.approx(plain, rel=1e-2), name
        compiled = results[name]
        assert 0 < compiled["graphs_after_first"] < tiny.model.num_layers, f"{name}: a graph per layer: {compiled}"
        assert compiled["graphs_after_last"] == compiled["graphs_after_first"], f"{name} recompiled: {compiled}"
