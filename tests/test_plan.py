import pytest

from orchestrator.core.config import load_profile, load_recipe
from orchestrator.core.errors import OrchError
from orchestrator.core.plan import gradient_accumulation, make_plan


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
