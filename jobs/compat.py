"""Every private or version-dependent API of torch, transformers and accelerate that the training job and the model
tools rely on, in one place; submitit's are in orchestrator/core/compat.py. tests/test_compat.py checks each of them
against the installed libraries, so that an upgrade that changes one fails there first. Each wrapper imports its
library itself: a caller loads only what it uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide PartialState once its process group is destroyed: otherwise the next
    `start_process_group` in this process reuses the dead state and starts no group. Private
    `PartialState._reset_state` (checked on accelerate 1.5.0 and 1.15.0)."""
    from accelerate import PartialState

    PartialState._reset_state()


def materialise_rotary(model: torch.nn.Module, device: torch.device | str) -> None:
    """Rotary frequencies are non-persistent buffers, in no checkpoint: compute them for a model built on meta.
    Relies on LlamaRotaryEmbedding being built from the config alone and keeping its frequencies in the buffers
    `inv_freq` and `original_inv_freq` (checked on transformers 5.0.0 and 5.24.0)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for module in model.modules():
        if isinstance(module, LlamaRotaryEmbedding):
            with torch.device(device):
                fresh = LlamaRotaryEmbedding(module.config)
            module.inv_freq, module.original_inv_freq = fresh.inv_freq, fresh.original_inv_freq


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant checkpointing of each decoder layer. transformers 5.23 renamed `gradient_checkpointing_enable`
    (and its keyword argument) to `activation_checkpointing_enable`; earlier releases have only the old names
    (checked on transformers 5.0.0 and 5.24.0)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_last_lr(scheduler: torch.optim.lr_scheduler.LRScheduler, rates: list[float]) -> None:
    """What `scheduler.get_last_lr()` returns until its next `step()`, for a scheduler that set its groups' rates
    itself. torch has no public setter: this writes the private `_last_lr` (checked on torch 2.13.0)."""
    scheduler._last_lr = rates


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a byte-level BPE vocabulary. Only
    transformers' internal `convert_slow_tokenizer` module has it (checked on transformers 5.0.0 and 5.24.0)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def compiled_graphs() -> int:
    """How many distinct graphs dynamo has compiled since `forget_compiled_graphs`: how a test sees a recompilation.
    Private `torch._dynamo.utils.counters` (checked on torch 2.13.0)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def forget_compiled_graphs() -> None:
    """Drop dynamo's compiled code and its counts (`torch.compiler.reset` keeps the counts)."""
    import torch
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()
