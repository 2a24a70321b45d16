"""Per-token log-probabilities of chosen tokens: the one definition rollout, training and eval share."""
from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`, in float32.

    logits [B, T, V] (any float dtype), tokens [B, T] -> [B, T]. Computed as gathered logit minus logsumexp so
    no [B, T, V] log-softmax tensor is materialised beyond the float32 copy of the logits.
    """
    scaled = logits.float() / temperature
    picked = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)
