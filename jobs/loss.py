"""Next-token cross-entropy without the full logits: the output head runs on chunks of positions, each
chunk's logits are recomputed in backward instead of kept. At micro batch 8 × 2048 with a 64k vocabulary
the full fp32 logits alone would take 4.2 GB, and their gradient as much again."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM

from orchestrator.core.estimate import LOSS_CHUNK_TOKENS


def head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def causal_lm_loss(
    model: LlamaForCausalLM, tokens: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> torch.Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1]."""
    if model.config.tie_word_embeddings:  # the head shares the body's root: let the model compute its loss
        return model(input_ids=tokens, labels=tokens, use_cache=False).loss
    # Training needs no KV cache; building one every step also makes torch.compile recompile (its layers'
    # is_initialized flags change) until dynamo's recompile limit.
    hidden = model.model(input_ids=tokens, use_cache=False).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.size(-1))
    targets = tokens[:, 1:].reshape(-1)
    total = sum(
        checkpoint(head_loss, model.lm_head, h, t, use_reentrant=False)
        for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), strict=True)
    )
    return total / targets.numel()
