"""Chunked token log-probs: the same values and gradients as one pass, with temporaries bounded per chunk."""
from __future__ import annotations

import torch

from nested_reft_ds.rl.logprobs import token_logprobs


def _reference(logits, tokens, temperature):
    return torch.log_softmax(logits.double() / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def test_chunked_log_probs_and_gradients_equal_the_single_pass():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 37, 50, generator=g, dtype=torch.float64).float().requires_grad_()
    tokens = torch.randint(0, 50, (3, 37), generator=g)
    weights = torch.randn(3, 37, generator=g)
    whole = token_logprobs(logits, tokens, 0.7)
    (grad_whole,) = torch.autograd.grad((whole * weights).sum(), logits)
    chunked = token_logprobs(logits, tokens, 0.7, chunk_elements=3 * 50 * 4)  # 4 positions per chunk: 10 chunks
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), logits)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_chunked, grad_whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(whole.double(), _reference(logits.detach(), tokens, 0.7), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(logits, tokens, 0.7, chunk_elements=1), whole.detach(), atol=1e-6,
                                   rtol=0)


def test_bf16_logits_are_scored_in_float32():
    logits = torch.randn(2, 5, 11).bfloat16()
    tokens = torch.randint(0, 11, (2, 5))
    out = token_logprobs(logits, tokens, chunk_elements=22)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(logits.float(), tokens, 1.0), atol=1e-5, rtol=0)
