import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.cli.show import plan_rows
from orchestrator.cli.submit import build_request, plan_warnings
from orchestrator.core.config import MixSource, Profile, Recipe
from orchestrator.core.corpus import SEED_EVAL_PASS, cannot_validate
from orchestrator.core.errors import OrchError
from orchestrator.core.estimate import measured, memory, peak_memory_gb
from orchestrator.core.files import file_sha256
from orchestrator.core.loading import load_profile, load_recipe
from orchestrator.core.plan import Plan, dividing_micro_batches, gradient_accumulation, make_plan, with_train
from orchestrator.core.preflight import data_warnings, source_uses
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


# --- what the plan says of the data ----------------------------------------------------------------------------------


def tokenizer_of(folder: Path, size: int) -> Path:
    """A tokenizer.json of `size` ids, as the plan reads it (as JSON)."""
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(size)}}}))
    return folder


def prepared_folder(folder: Path, tokenizer: Path, train_tokens: int, val_tokens: int) -> str:
    """What the plan reads of a folder made by `orch data prepare`: each split's index.json."""
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        (folder / split).mkdir(parents=True)
        tokenized = {"vocab_size": 300, "tokenizer": {"sha256": file_sha256(tokenizer / "tokenizer.json")}}
        (folder / split / "index.json").write_text(json.dumps({**tokenized, "tokens": tokens}))
    return str(folder)


def test_the_plan_of_the_czech_teams_corpus_shows_its_epochs_and_warns_of_them_of_no_val_and_of_the_tokenizer(
    tmp_path: Path,
):
    """200,000 steps of the seed recipe on a 17,793-token corpus (8 whole blocks of 2,048) with an empty val split
    and a 17,436-token tokenizer under a 64,000-row model: allowed, with three warnings."""
    tokenizer = tokenizer_of(tmp_path / "tok", 17_436)
    source = prepared_folder(tmp_path / "cs", tokenizer, 17_793, 0)
    recipe = tmp_path / "cs.yaml"
    recipe.write_text(f"extends: cstinyllama-1.2b\ndata:\n  source: {source}\n  tokenizer: {tokenizer}\n")
    request = build_request("karolina", str(recipe), 200_000, [{"slurm": {"account": "X"}}])
    assert ("data read", "17,793 train tokens (0 val), 12,800,000 epochs") in plan_rows(request)
    assert plan_warnings([request]) == [
        f"Warning: {recipe}: the run reads data.source {source} 12,800,000 times over (209.7 B tokens from 17,793 "
        "train tokens). Beyond about 4 epochs, repeated tokens add little and the model memorizes them: fewer "
        "--steps, or more data.",
        "Warning: cannot validate: the val split holds 0 tokens (0 whole blocks of 2,048), fewer than one evaluation "
        "pass of 64 blocks (8 ranks × micro batch 8), 131,072 tokens: no val_loss or val_perplexity is logged. Fix: "
        "prepare the data with a larger --val-fraction so that val holds at least 131,072 tokens (a .txt file "
        "without blank lines is one document: docs/data.md), or fewer ranks or a smaller train.micro_batch_size.",
        f"Warning: {recipe}: the tokenizer {tokenizer} (data.tokenizer) has 17,436 tokens, under 50% of "
        "model.vocab_size 64,000: 46,564 rows of the embedding and the output layer are never used. A tokenizer "
        "trained on too little text stops where nothing is left to merge; train it on more text (orch tokenizer "
        "train --vocab-size 64000), or set model.vocab_size nearer 17,436.",
    ]


def test_a_mixture_reads_each_source_by_its_weight_and_only_the_small_ones_are_warned_of(tmp_path: Path):
    """tiny on the local profile: 100 steps × 16 blocks of 64, three quarters from cs (600 blocks: 2 epochs), a
    quarter from en (80 blocks: 5 epochs, over MANY_EPOCHS), whose val split is under one pass of 2 × 4 blocks."""
    tokenizer = tokenizer_of(tmp_path / "tok", 300)  # above half of the model's 512 rows
    sources = {
        "cs": MixSource(path=prepared_folder(tmp_path / "cs", tokenizer, 600 * 64 + 63, 8 * 64), weight=3),
        "en": MixSource(path=prepared_folder(tmp_path / "en", tokenizer, 80 * 64, 7 * 64), weight=1),
    }
    tiny = load_recipe("tiny")[1]
    data = tiny.data.model_copy(update={"source": None, "sources": sources, "tokenizer": str(tokenizer)})
    recipe = tiny.model_copy(update={"data": data})
    plan = make_plan(load_profile("local")[1], recipe, 100)
    assert [(u.name, u.read_tokens, u.epochs) for u in source_uses(recipe, plan)] == [
        ("cs", 1200 * 64, 2.0),
        ("en", 400 * 64, 5.0),
    ]
    [epochs, validation] = data_warnings(recipe, "mix.yaml", plan)
    assert epochs.startswith(f"Warning: mix.yaml: the run reads source en ({sources['en'].path}) 5 times over (")
    assert validation.startswith(
        "Warning: cannot validate: source en's val split holds 448 tokens (7 whole blocks of 64), fewer than one "
        "evaluation pass of 8 blocks (2 ranks × micro batch 4), 512 tokens: no val_loss/en, and val_loss is the "
        "other sources' mean. Fix: "
    )


def test_an_eval_blocks_below_one_pass_is_named_as_what_keeps_a_run_from_validating():
    problem = cannot_validate({"": 10**6}, 4, 2, 4, 64)
    assert problem == (
        "cannot validate: eval.blocks is 4, fewer than one evaluation pass of 8 blocks (2 ranks × micro batch 4): "
        "no val_loss or val_perplexity is logged. Fix: eval.blocks of at least 8 in the recipe."
    )
    assert cannot_validate({"": 8 * 64}, 8, 2, 4, 64) is None


def test_prepare_compares_a_val_split_with_one_evaluation_pass_of_the_seed_recipe_on_one_karolina_node():
    plan = make_plan(load_profile("karolina")[1], seed_recipe(), 10)
    assert (plan.world_size, plan.micro_batch, plan.recipe.data.max_seq_len) == SEED_EVAL_PASS
