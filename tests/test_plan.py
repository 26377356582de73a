from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.cli.submit import build_request
from orchestrator.core.config import Profile, Recipe, load_profile, load_recipe
from orchestrator.core.errors import OrchError
from orchestrator.core.estimate import measured, memory, peak_memory_gb
from orchestrator.core.plan import Plan, dividing_micro_batches, gradient_accumulation, make_plan, with_train
from tests.conftest import orch


def test_accumulation_fills_the_global_batch_exactly():
    assert gradient_accumulation(512, 8, 64) == 1
    assert gradient_accumulation(512, 8, 8) == 8
    assert gradient_accumulation(16, 4, 2) == 2


def test_non_integral_accumulation_is_an_error_showing_the_numbers():
    with pytest.raises(OrchError) as err:
        gradient_accumulation(512, 8, 24)
    assert "512" in str(err.value) and "8 × world size 24 = 192" in str(err.value)


def test_plan_for_the_local_demo():
    _, profile = load_profile("local")
    _, recipe = load_recipe("tiny")
    plan = make_plan(profile, recipe, 20)
    assert (plan.world_size, plan.grad_accum, plan.tokens_per_step) == (2, 2, 16 * 64)
    assert plan.total_tokens == 20 * 16 * 64


def test_seed_recipe_is_the_seed_training_table():
    _, recipe = load_recipe("cstinyllama-1.2b")
    m, t = recipe.model, recipe.train
    assert (m.num_layers, m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads, m.vocab_size) == (
        22,
        2048,
        5632,
        32,
        4,
        64000,
    )
    assert (recipe.data.max_seq_len, t.global_batch_size, t.precision, t.attention, t.fsdp, t.grad_clip) == (
        2048,
        512,
        "bf16",
        "flash2",
        "shard_grad_op",
        1.0,
    )
    assert (recipe.optimizer.lr, recipe.optimizer.betas, recipe.optimizer.weight_decay) == (1e-4, (0.9, 0.95), 0.0)
    s = recipe.schedule
    assert (s.warmup_steps, s.total_steps, s.alpha) == (100, 200_000, 0.1)


# --- the memory model against measured peaks -------------------------------------------------------------------------

# NVIDIA H200, one rank, cstinyllama-1.2b at sequence 2048, global batch = micro batch (docs/performance.md, "The memory
# model"): variant as the doc names it, compile, activation checkpointing, micro batch, max_memory_allocated in GB.
MEASURED_PEAKS = [
    ("recipe: eager (its forward built a KV cache then)", False, False, 8, 47.5),
    ("eager, micro batch 16 (same)", False, False, 16, 79.3),
    ("compile=true, use_cache=False (today's code)", True, False, 8, 37.6),
    ("activation checkpointing, eager", False, True, 8, 17.6),
]
DOC = (Path(__file__).parents[1] / "docs" / "performance.md").read_text()


def seed_recipe(**train) -> Recipe:
    return with_train(load_recipe("cstinyllama-1.2b")[1], **train)


@pytest.mark.parametrize(("variant", "compiled", "checkpointing", "micro", "measured_gb"), MEASURED_PEAKS)
def test_memory_estimate_is_within_ten_percent_of_each_measured_peak(
    variant, compiled, checkpointing, micro, measured_gb
):
    recipe = seed_recipe(
        micro_batch_size=micro, global_batch_size=micro, compile=compiled, activation_checkpointing=checkpointing
    )
    estimate = memory(recipe, 1).allocated  # max_memory_allocated leaves out the reserve
    assert abs(estimate / measured_gb - 1) < 0.10
    assert f"| {variant} | {micro} | {measured_gb:.1f} | {estimate:.1f} | {estimate / measured_gb - 1:+.1%} |" in DOC
    assert measured("H200", compiled, checkpointing, micro).peak_allocated_gb == measured_gb


def test_accumulation_keeps_an_unsharded_fp32_gradient_buffer():
    one_step = memory(seed_recipe(micro_batch_size=8, global_batch_size=128, compile=True), 16)
    accumulating = memory(seed_recipe(micro_batch_size=8, global_batch_size=512, compile=True), 16)
    assert one_step.accumulation == 0 and accumulating.accumulation == pytest.approx(4 * 1.231, abs=0.01)
    assert accumulating.peak - one_step.peak == pytest.approx(accumulating.accumulation)


# --- auto: the train settings picked for the GPU ---------------------------------------------------------------------

AUTO_TRAIN = {"micro_batch_size": "auto", "compile": "auto", "activation_checkpointing": "auto"}


def karolina_with(gpu_memory_gb: float, gpu_model: str = "A100-SXM4-40GB", nodes: int = 1) -> Profile:
    _, profile = load_profile(
        "karolina", [{"nodes": nodes, "node": {"gpu_memory_gb": gpu_memory_gb, "gpu_model": gpu_model}}]
    )
    return profile


def settings(plan: Plan) -> tuple[int, bool, bool]:
    train = plan.recipe.train
    return train.micro_batch_size, train.compile, train.activation_checkpointing


def test_auto_compiles_at_the_largest_micro_batch_that_fits_a_big_card():
    profile = karolina_with(141, "H200")
    plan = make_plan(profile, seed_recipe(**AUTO_TRAIN), 10)
    assert settings(plan) == (32, True, False)
    larger = seed_recipe(micro_batch_size=64, compile=True, activation_checkpointing=False)
    assert plan.peak_memory_gb <= 0.9 * 141 < peak_memory_gb(larger, 8)
    assert plan.choice.startswith("auto: the fastest setting that fits 126.9 GB") and "micro batch 64" in plan.choice


def test_auto_on_karolina_compiles_micro_batch_eight():
    plan = make_plan(karolina_with(40, nodes=2), seed_recipe(**AUTO_TRAIN), 10)
    assert settings(plan) == (8, True, False) and plan.grad_accum == 4 and 30 < plan.peak_memory_gb <= 36


def test_auto_falls_back_to_activation_checkpointing_on_a_small_card():
    plan = make_plan(karolina_with(16), seed_recipe(**AUTO_TRAIN), 10)
    assert settings(plan) == (1, True, True) and plan.peak_memory_gb <= 0.9 * 16
    without = seed_recipe(micro_batch_size=1, compile=True, activation_checkpointing=False)
    assert peak_memory_gb(without, 8) > 0.9 * 16


def test_nothing_fits_is_refused_with_what_was_tried_and_the_options_that_fit():
    recipe = seed_recipe(**{**AUTO_TRAIN, "activation_checkpointing": False})
    with pytest.raises(OrchError) as err:
        make_plan(karolina_with(16), recipe, 10, "recipes/mine.yaml")
    message = str(err.value)
    for text in (
        "recipes/mine.yaml: no train setting",
        "Tried micro batch 64, 32, 16, 8, 4, 2, 1",
        "Options that fit: train.activation_checkpointing: auto (",
        "train.fsdp: full_shard (",
        "--nodes 4 (",
    ):
        assert text in message
    with pytest.raises(OrchError, match="No single change fits"):
        make_plan(karolina_with(8), seed_recipe(**AUTO_TRAIN), 10)


def test_explicit_values_are_left_as_they_are():
    recipe = seed_recipe(micro_batch_size=8, compile=False, activation_checkpointing=False)
    plan = make_plan(karolina_with(40), recipe, 10)  # above the card: preflight's check_memory refuses it, as before
    assert plan.recipe == recipe and plan.choice == "as the recipe sets them" and plan.peak_memory_gb > 40
    _, local = load_profile("local")
    _, tiny = load_recipe("tiny")
    assert make_plan(local, tiny, 10).recipe == tiny


def test_auto_without_a_gpu_is_the_plain_setting():
    _, local = load_profile("local")
    _, tiny = load_recipe("tiny")
    plan = make_plan(local, with_train(tiny, **AUTO_TRAIN), 10)
    assert settings(plan) == (4, False, False) and plan.grad_accum == 2 and plan.choice.startswith("auto without a GPU")


def test_expected_mfu_is_measured_on_h200_and_the_profiles_assumption_elsewhere():
    measured_setting = seed_recipe(micro_batch_size=16, compile=True, activation_checkpointing=False)
    h200 = make_plan(karolina_with(141, "H200"), measured_setting, 10)
    assert (h200.mfu, h200.mfu_source) == (0.492, "measured on one H200")
    a100 = make_plan(karolina_with(40, nodes=2), seed_recipe(**AUTO_TRAIN), 10)
    assert a100.mfu == 0.45 and "not measured on A100-SXM4-40GB" in a100.mfu_source


def test_the_run_and_its_job_train_the_decided_values():
    request = build_request("karolina", None, 200_000, [{"slurm": {"account": "X"}}])
    assert request.recipe == request.plan.recipe and request.recipe.train.compile is True  # dumped as recipe.yaml
    again = make_plan(request.profile, request.recipe, 200_000)  # what jobs/train.py plans from the run's recipe
    assert again.recipe == request.recipe and again.choice == "as the recipe sets them"


def test_dry_run_on_karolina_shows_the_choice(orch_home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    result = orch("submit", "--profile", "karolina", "--account", "OPEN-00-00", "--steps", "200000", "--dry-run")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "train settings" in line)
    assert "micro batch 8, compile on, activation checkpointing off (auto: the fastest setting that fits 36.0 GB" in row
    memory_row = next(line for line in result.stdout.splitlines() if "peak memory per GPU" in line)
    assert "35.9 GB of 40 GB (weights + momentum 1.2, gathered 2.5, accumulation 4.9, activations 21.6" in memory_row
    assert not (orch_home / "runs").exists()


@given(global_batch=st.integers(1, 5000), world_size=st.integers(1, 64))
def test_dividing_micro_batches_are_exactly_those_giving_a_whole_accumulation(global_batch: int, world_size: int):
    expected = [m for m in range(1, global_batch + 1) if global_batch % (m * world_size) == 0]
    assert dividing_micro_batches(global_batch, world_size) == expected


def test_a_huge_global_batch_gets_its_dividing_micro_batches_from_its_divisors():
    assert dividing_micro_batches(300_000_001, 2) == []  # odd: no micro batch divides at 2 ranks
    assert dividing_micro_batches(2 * 10**8, 8)[-3:] == [6_250_000, 12_500_000, 25_000_000]
