"""The model: a transformers Llama decoder, sharded with FSDP2 (the same code on CPU/gloo and GPU/NCCL)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from jobs.compat import enable_activation_checkpointing, materialise_rotary
from orchestrator.core.config import ModelSpec
from orchestrator.core.files import library_writes

log = logging.getLogger(__name__)


def attention_implementation(requested: str, device: torch.device) -> str:
    """flash-attn 2 where it is installed and a GPU runs; otherwise PyTorch SDPA (its own flash kernel on GPU)."""
    if requested != "flash2":
        return requested
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        log.warning("attention 'flash2' asked for, flash-attn is not installed: using PyTorch SDPA")
        return "sdpa"
    if device.type != "cuda":
        log.warning("attention 'flash2' needs a GPU: using PyTorch SDPA on %s", device.type)
        return "sdpa"
    return "flash_attention_2"


def model_config(spec: ModelSpec, attention: str) -> LlamaConfig:
    """The architecture: the `init_from` directory's own config when the recipe names one, else the recipe's."""
    if spec.init_from:
        return LlamaConfig.from_pretrained(spec.init_from, attn_implementation=attention)
    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=False,
        attn_implementation=attention,
    )


def build_model(spec: ModelSpec, attention: str) -> LlamaForCausalLM:
    """From a local Hugging Face directory when the recipe names one, else freshly initialised."""
    if spec.init_from:
        return LlamaForCausalLM.from_pretrained(spec.init_from, attn_implementation=attention, dtype=torch.float32)
    return LlamaForCausalLM(model_config(spec, attention))


def build_empty_model(config: LlamaConfig, device: torch.device | str) -> LlamaForCausalLM:
    """The model's structure without initialising weights (they are loaded next); rotary frequencies are real."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device=device)
    materialise_rotary(model, device)
    return model


def shard(
    model: LlamaForCausalLM, strategy: str, precision: str, *, recompute: bool = False, compile: bool = False
) -> LlamaForCausalLM:
    """FSDP2 per decoder layer, then the body and the output head as two roots (a tied head stays with the
    body in one root). SHARD_GRAD_OP keeps the gathered parameters after forward.

    A separate head lets the loss run it chunk by chunk (`jobs.loss`) without the full logits. `recompute`
    keeps only each block's input for backward (activation checkpointing); `compile` compiles each block."""
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else torch.float32, reduce_dtype=torch.float32
    )
    reshard = strategy == "full_shard"
    if recompute:
        enable_activation_checkpointing(model)
    for layer in model.model.layers:
        if compile:
            layer.compile()
        fully_shard(layer, reshard_after_forward=reshard, mp_policy=policy)
    if model.config.tie_word_embeddings:
        fully_shard(model, reshard_after_forward=reshard, mp_policy=policy)
    else:
        fully_shard(model.model, reshard_after_forward=reshard, mp_policy=policy)
        fully_shard(model.lm_head, reshard_after_forward=reshard, mp_policy=policy)
    return model


def set_gradient_sync(model: LlamaForCausalLM, enabled: bool) -> None:
    """Reduce-scatter gradients only on the last micro-batch of an optimizer step."""
    roots = [model] if model.config.tie_word_embeddings else [model.model, model.lm_head]
    for root in roots:
        root.set_requires_gradient_sync(enabled)


def build_sharded_model(
    spec: ModelSpec,
    attention: str,
    strategy: str,
    precision: str,
    device: torch.device,
    *,
    recompute: bool = False,
    compile: bool = False,
) -> LlamaForCausalLM:
    """This rank's shards of the model, in an initialised process group.

    From scratch every rank initialises the full model from the same seed and keeps its shards. From
    `init_from` only rank 0 reads the weights (one full copy per node, not one per rank); the others build
    the sharded structure on the meta device and receive their shards from rank 0.
    """
    if not spec.init_from:
        return shard(build_model(spec, attention).to(device), strategy, precision, recompute=recompute, compile=compile)
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config(spec, attention))
    shard(model, strategy, precision, recompute=recompute, compile=compile)
    model.to_empty(device=device)
    full_state = build_model(spec, attention).state_dict() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    materialise_rotary(model, device)
    return model


def save_hf_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, output: Path) -> None:
    """A Hugging Face model directory whose config and generation config name the tokenizer's special tokens. A
    tokenizer without a pad token (orch's own have none) pads with its eos, as `generate` would on its own after a
    warning; without the id, generation_config.json would name no pad token at all."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}
    for key, value in ids.items():
        setattr(model.config, key, value)
    model.generation_config = GenerationConfig(**ids)
    with library_writes(output):
        model.save_pretrained(output)
        tokenizer.save_pretrained(output)
