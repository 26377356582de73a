"""The model: a transformers Llama decoder, sharded with FSDP2 (the same code on CPU/gloo and GPU/NCCL)."""

from __future__ import annotations

import logging

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.config import ModelSpec

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


def build_model(spec: ModelSpec, attention: str) -> LlamaForCausalLM:
    """From a local Hugging Face directory when the recipe names one, else freshly initialised."""
    if spec.init_from:
        return LlamaForCausalLM.from_pretrained(spec.init_from, attn_implementation=attention, dtype=torch.float32)
    config = LlamaConfig(
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
    return LlamaForCausalLM(config)


def shard(model: LlamaForCausalLM, strategy: str, precision: str) -> LlamaForCausalLM:
    """FSDP2 per decoder layer and at the root. SHARD_GRAD_OP keeps the gathered parameters after forward."""
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else torch.float32, reduce_dtype=torch.float32
    )
    reshard = strategy == "full_shard"
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, reshard_after_forward=reshard, mp_policy=policy)
    return model
