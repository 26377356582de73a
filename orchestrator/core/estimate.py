"""Model arithmetic for planning, from the recipe alone (no torch): parameters, FLOPs per token, peak memory."""

from __future__ import annotations

from orchestrator.core.config import ModelSpec, Recipe

GB = 1e9
RUNTIME_OVERHEAD_GB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation
ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN = 34  # bf16 saved activations of a Llama block without recomputation
LOSS_CHUNK_TOKENS = 4096  # positions whose logits exist at once (jobs.loss)


def parameter_count(spec: ModelSpec) -> dict[str, int]:
    """Parameters by part: the input embedding, the transformer blocks, the output head."""
    head_dim = spec.hidden_size // spec.num_heads
    attention = 2 * spec.hidden_size * spec.hidden_size + 2 * spec.hidden_size * spec.num_kv_heads * head_dim
    mlp = 3 * spec.hidden_size * spec.intermediate_size
    block = attention + mlp + 2 * spec.hidden_size
    return {
        "embedding": spec.vocab_size * spec.hidden_size,
        "blocks": spec.num_layers * block + spec.hidden_size,
        "head": spec.vocab_size * spec.hidden_size,
    }


def flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Training FLOPs per token: 6 × matmul parameters (blocks and head; the embedding is a lookup)
    plus 12 × layers × hidden × sequence for attention scores and values (forward + backward)."""
    params = parameter_count(spec)
    return 6 * (params["blocks"] + params["head"]) + 12 * spec.num_layers * spec.hidden_size * seq_len


def peak_memory_gb(recipe: Recipe, world_size: int) -> float:
    """Peak accelerator memory per rank under FSDP2 with bf16 compute and LionW.

    Sharded fp32 master weights, gradients and Lion momentum (12 bytes/param / ranks); bf16 parameters
    gathered for compute (all of them with shard_grad_op, two blocks at a time with full_shard); saved
    activations of one micro batch (or, with activation checkpointing, block inputs and one block's); the loss
    on logits computed in chunks (one chunk's fp32 logits and their gradient);
    and a fixed runtime overhead.
    """
    spec, train = recipe.model, recipe.train
    params = parameter_count(spec)
    total = sum(params.values())
    bytes_per_param = 2 if train.precision == "bf16" else 4
    gathered = total if train.fsdp == "shard_grad_op" else 2 * params["blocks"] / spec.num_layers + params["head"]
    tokens = train.micro_batch_size * recipe.data.max_seq_len
    per_layer = ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN * tokens * spec.hidden_size
    if train.activation_checkpointing:  # each block's bf16 input is kept, one block's activations at a time
        activations = 2 * tokens * spec.hidden_size * spec.num_layers + per_layer
    else:
        activations = per_layer * spec.num_layers
    loss_chunk = 4 * 2 * min(tokens, LOSS_CHUNK_TOKENS) * spec.vocab_size
    return (12 * total / world_size + bytes_per_param * gathered + activations + loss_chunk) / GB + RUNTIME_OVERHEAD_GB
