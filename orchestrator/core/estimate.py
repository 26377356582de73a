"""Model arithmetic for planning, from the recipe alone (no torch): parameters, FLOPs per token, peak memory per
rank, and the measured speed of each train setting. The constants and their fit are in docs/performance.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.core.config import ModelSpec, Recipe

GB = 1e9
LOSS_CHUNK_TOKENS = 4096  # positions whose logits exist at once (jobs.loss)

# Saved activations per token × layer × hidden size, in bytes, and the loss chunk's bytes per logit: one least-squares
# fit (numpy.linalg.lstsq, in GB) to the four measured H200 peaks below (cstinyllama-1.2b, one rank, no accumulation).
# A count of the tensors a Llama block keeps for backward gives about 45 eager and 31 compiled (compile fuses RMSNorm
# and SiLU × up).
EAGER_ACTIVATION_BYTES = 42.8
COMPILED_ACTIVATION_BYTES = 29.2
RECOMPUTED_ACTIVATION_BYTES = 2  # activation checkpointing keeps each block's bf16 input (exact, not fitted)
LOSS_BYTES_PER_LOGIT = 14.3  # one loss chunk recomputed in backward: fp32 log-probabilities and their gradients
RUNTIME_RESERVE_GB = 2.0  # CUDA context and NCCL buffers, outside the allocator's count: assumed, not measured


@dataclass(frozen=True)
class Measured:
    """One training step setting measured with `orch bench` on one GPU (cstinyllama-1.2b, sequence 2048, SDPA)."""

    gpu: str
    compile: bool
    activation_checkpointing: bool
    micro_batch: int
    tokens_per_s: int
    mfu: float  # of the GPU's dense bf16 peak
    peak_allocated_gb: float | None  # torch.cuda.max_memory_allocated; None: not measured


# NVIDIA H200, torch 2.11 (CUDA 13.0), transformers 5.17, one rank (world size 1, accumulation 1), 989 TFLOP/s peak.
# The eager rows ran while the training forward still built a KV cache (the code no longer does; docs/performance.md
# says why that changes them little). Nothing is measured on A100 yet: profiles keep their own expected_mfu there.
MEASURED = (
    Measured("H200", False, False, 8, 44_969, 0.350, 47.5),
    Measured("H200", False, False, 16, 48_228, 0.376, 79.3),
    Measured("H200", True, False, 8, 59_052, 0.460, 37.6),
    Measured("H200", True, False, 16, 63_130, 0.492, None),
    Measured("H200", False, True, 8, 36_949, 0.288, 17.6),
)


def measured(gpu_model: str | None, compile: bool, activation_checkpointing: bool, micro_batch: int) -> Measured | None:
    """The row measured for this setting on a GPU whose model name contains the measured one (e.g. 'H200'), if any."""
    for row in MEASURED:
        setting = (row.compile, row.activation_checkpointing, row.micro_batch)
        if row.gpu.lower() in (gpu_model or "").lower() and setting == (compile, activation_checkpointing, micro_batch):
            return row
    return None


def h200_mfu(compile: bool, activation_checkpointing: bool, micro_batch: int) -> float:
    return measured("H200", compile, activation_checkpointing, micro_batch).mfu


# Expected-throughput factors, ratios of the H200 rows' MFU: compile (compiled / eager at micro batch 8), activation
# checkpointing (its recomputed forward), and each doubling of the micro batch (geometric mean of 8 -> 16, eager and
# compiled). They rank train settings; tokens/s estimates use measured MFU or the profile's expected_mfu.
COMPILE_SPEEDUP = h200_mfu(True, False, 8) / h200_mfu(False, False, 8)
CHECKPOINTING_SPEEDUP = h200_mfu(False, True, 8) / h200_mfu(False, False, 8)
MICRO_DOUBLING_SPEEDUP = math.sqrt(
    h200_mfu(False, False, 16) / h200_mfu(False, False, 8) * h200_mfu(True, False, 16) / h200_mfu(True, False, 8)
)


def throughput_factor(compile: bool, activation_checkpointing: bool, micro_batch: int) -> float:
    """Expected tokens/s relative to eager, no checkpointing, micro batch 8 (beyond micro 8-16: extrapolated)."""
    factor = (COMPILE_SPEEDUP if compile else 1.0) * (CHECKPOINTING_SPEEDUP if activation_checkpointing else 1.0)
    return factor * MICRO_DOUBLING_SPEEDUP ** math.log2(micro_batch / 8)


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


@dataclass(frozen=True)
class Memory:
    """Peak memory of one rank under FSDP2 with LionW, by term (GB). The peak is at the start of backward (every
    activation saved, one loss chunk recomputed) or, for small activations, at the optimizer step (the sharded fp32
    gradients exist, activations and gathered parameters are gone)."""

    weights_and_momentum: float  # sharded fp32 master weights and Lion momentum, 8 bytes/param / ranks
    gradients: float  # sharded fp32 gradients, 4 bytes/param / ranks: after backward, set to None at each step
    gathered: float  # parameters gathered in the compute dtype: all (shard_grad_op) or the head and two blocks
    accumulation: float  # FSDP2's unsharded fp32 gradients while gradient sync is off (accumulation > 1)
    activations: float  # saved for backward: eager, compiled or only the block inputs (checkpointing)
    transient: float  # one loss chunk in backward, or one block recomputed (checkpointing), whichever is larger
    reserve: float = RUNTIME_RESERVE_GB

    def terms(self) -> dict[str, float]:
        """The terms of the peak (the start of backward, or the optimizer step where that is larger), by name."""
        backward = {
            "weights + momentum": self.weights_and_momentum,
            "gathered": self.gathered,
            "accumulation": self.accumulation,
            "activations": self.activations,
            "loss/recompute": self.transient,
        }
        step = {"weights + momentum": self.weights_and_momentum, "gradients": self.gradients}
        return max(backward, step, key=lambda terms: sum(terms.values()))

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated reports."""
        return sum(self.terms().values())

    @property
    def peak(self) -> float:
        return self.allocated + self.reserve


def memory(recipe: Recipe, world_size: int) -> Memory:
    """The memory terms of a recipe with concrete train settings (no `auto`) at `world_size` ranks. Activations
    were measured in bf16; fp32 compute keeps twice the bytes."""
    spec, train = recipe.model, recipe.train
    params = parameter_count(spec)
    total = sum(params.values())
    compute_bytes = 2 if train.precision == "bf16" else 4
    rate = (COMPILED_ACTIVATION_BYTES if train.compile else EAGER_ACTIVATION_BYTES) * compute_bytes / 2
    # full_shard at the start of backward: the output head (the loss runs it first) and about two blocks
    gathered = total if train.fsdp == "shard_grad_op" else params["head"] + 2 * params["blocks"] / spec.num_layers
    accumulating = train.global_batch_size > train.micro_batch_size * world_size
    tokens = train.micro_batch_size * recipe.data.max_seq_len
    block = rate * tokens * spec.hidden_size
    loss = LOSS_BYTES_PER_LOGIT * min(tokens, LOSS_CHUNK_TOKENS) * spec.vocab_size
    if train.activation_checkpointing:
        activations = RECOMPUTED_ACTIVATION_BYTES * compute_bytes / 2 * tokens * spec.hidden_size * spec.num_layers
        transient = max(loss, block)
    else:
        activations, transient = block * spec.num_layers, loss
    return Memory(
        weights_and_momentum=8 * total / world_size / GB,
        gradients=4 * total / world_size / GB,
        gathered=compute_bytes * gathered / GB,
        accumulation=4 * total / GB if accumulating else 0.0,
        activations=activations / GB,
        transient=transient / GB,
    )


def peak_memory_gb(recipe: Recipe, world_size: int) -> float:
    """Peak accelerator memory per rank: the allocator's peak and the runtime reserve."""
    return memory(recipe, world_size).peak
