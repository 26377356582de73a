"""Smoke tests of the benchmarks: they run and measure what they say they measure (no timings are asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli.commands.bench import default_variants, variant_recipe
from orchestrator.core.errors import OrchError
from orchestrator.core.loading import load_recipe
from tests.conftest import ROOT


def test_default_variants_change_one_setting_of_the_recipe_at_a_time():
    _, recipe = load_recipe("tiny")  # flash2 asked for, which runs as SDPA without flash-attn: nothing to compare
    expected = ["recipe", "compile=true", "activation_checkpointing=true", "micro_batch_size=8"]
    assert default_variants(recipe, 2, gpu=False) == expected  # micro batch 16 × 2 ranks exceeds the global 16


def test_variants_are_checked_like_recipes():
    path, recipe = load_recipe("tiny")
    changed = variant_recipe(path, recipe, "micro_batch_size=8,train.compile=true", 2)
    assert (changed.train.micro_batch_size, changed.train.compile) == (8, True)
    assert variant_recipe(path, recipe, "recipe", 2) == recipe
    with pytest.raises(OrchError, match="unknown field 'train.micro_batch'"):
        variant_recipe(path, recipe, "micro_batch=8", 2)
    with pytest.raises(OrchError, match="not a multiple"):
        variant_recipe(path, recipe, "micro_batch_size=16", 2)
    with pytest.raises(OrchError, match="FIELD=VALUE"):
        variant_recipe(path, recipe, "compile", 2)


def test_bench_trains_the_tiny_recipe_on_cpu_ranks_and_prints_the_table_last():
    command = "from orchestrator.cli.commands.bench import app; app()"
    args = ["--profile", "local", "--recipe", "tiny", "--steps", "2", "--warmup", "0", "--variants", "recipe"]
    done = subprocess.run([sys.executable, "-c", command, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 cpu rank(s), gloo" in done.stdout
    table = done.stdout[done.stdout.index("tokens/s per rank") :]
    assert "recipe" in table and "sdpa" in table and "4 × 2" in table  # 16 = micro batch 4 × 2 ranks × 2
    assert done.stdout.rstrip().endswith("┘")


def test_gpu_script_dry_run_checks_the_environment_and_prints_the_command():
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert "-m orchestrator bench --profile karolina --recipe cstinyllama-1.2b" in last
    assert "--ranks 1 --global-batch 8" in last and "--variants micro_batch_size=16,global_batch_size=16" in last


@pytest.mark.slow
def test_minimal_loop_computes_the_losses_of_orchs_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from bench.overhead import prepare_recipe, run_minimal, run_orch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # run_minimal sets the local profile's value in this process
    recipe_file, recipe = prepare_recipe(tmp_path)
    orch = run_orch(recipe_file, 3, tmp_path / "orch-home")
    minimal = run_minimal(recipe, 3, tmp_path)
    assert [r["step"] for r in minimal["records"]] == [r["step"] for r in orch["records"]] == [1, 2, 3]
    losses = [r["loss"] for r in orch["records"]]
    assert [r["loss"] for r in minimal["records"]] == pytest.approx(losses, rel=1e-5)
    assert losses[2] < losses[0]


@pytest.mark.slow
def test_orch_bench_and_a_submitted_run_train_the_same_first_losses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from bench.overhead import prepare_recipe, run_orch
    from jobs.bench import available_ranks, run_benchmark
    from orchestrator.core.loading import load_profile

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the local profile's setting, which its job gets
    recipe_file, recipe = prepare_recipe(tmp_path)
    submitted = [r["loss"] for r in run_orch(recipe_file, 3, tmp_path / "orch-home")["records"]]
    where = available_ranks(load_profile("local")[1])
    [benched] = run_benchmark([("recipe", recipe)], where, steps=3, warmup=0, data_dir=Path(recipe.data.source))
    assert benched["losses"] == submitted
