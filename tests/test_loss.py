"""The chunked next-token loss (jobs/loss.py) against the loss transformers computes from the full logits."""

from __future__ import annotations

import pytest
import torch

from jobs.loss import causal_lm_loss
from tests.conftest import tiny_llama

TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))  # 16 predicted positions


def loss_and_gradients(model: torch.nn.Module, loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_tokens", [1, 5, 16, 4096])  # one position each, uneven chunks, exact, one chunk
def test_the_chunked_loss_and_its_gradients_are_those_of_the_full_logits(chunk_tokens: int):
    model = tiny_llama()
    expected, expected_grads = loss_and_gradients(model, model(input_ids=TOKENS, labels=TOKENS).loss)
    loss, grads = loss_and_gradients(model, causal_lm_loss(model, TOKENS, chunk_tokens))
    torch.testing.assert_close(loss, expected)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)


def test_the_head_never_sees_more_positions_than_a_chunk_and_runs_again_in_backward():
    model, seen = tiny_llama(), []
    model.lm_head.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0].shape[0]))
    causal_lm_loss(model, TOKENS, chunk_tokens=5).backward()
    assert seen[:4] == [5, 5, 5, 1] and sorted(seen[4:]) == [1, 5, 5, 5]  # then each chunk again, for its gradient


def test_with_a_tied_head_the_loss_is_the_models_own():
    model = tiny_llama(tie_word_embeddings=True)
    expected, expected_grads = loss_and_gradients(model, model(input_ids=TOKENS, labels=TOKENS).loss)
    loss, grads = loss_and_gradients(model, causal_lm_loss(model, TOKENS, chunk_tokens=5))
    assert torch.equal(loss, expected)
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name
