"""Per-token log-probabilities of chosen tokens: the one definition rollout, training and eval share."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# Elements of the float32 [rows, positions, V] temporaries one chunk may hold: 2**24 is 64 MiB.
CHUNK_ELEMENTS = 2**24


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = logits.float() / temperature
    picked = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, *,
                  chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """`token_logprobs(head(hidden), tokens)` without the whole [B, T, V] logits: the output head runs a chunk of
    positions at a time, recomputed in backward (activation checkpointing), so logits, their float32 copies and
    their gradient exist for one chunk at a time. hidden [B, T, H] (final-norm outputs), tokens [B, T] -> [B, T]."""
    rows, positions, _ = hidden.shape
    per_chunk = max(1, chunk_elements // max(rows * head.out_features, 1))
    keep_graph = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))

    def chunk(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _token_logprobs(head(h), t, temperature)

    parts = []
    for start in range(0, positions, per_chunk):
        piece = slice(start, start + per_chunk)
        if keep_graph:
            parts.append(checkpoint(chunk, hidden[:, piece], tokens[:, piece], use_reentrant=False))
        else:
            parts.append(chunk(hidden[:, piece], tokens[:, piece]))
    return torch.cat(parts, dim=1) if parts else hidden.new_zeros(rows, 0, dtype=torch.float32)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, *,
                   chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`, in float32.

    logits [B, T, V] (any float dtype), tokens [B, T] -> [B, T]. Computed as gathered logit minus logsumexp, a
    chunk of positions at a time, so the float32 temporaries never exceed `chunk_elements` (about
    B x T x V x 4 bytes unchunked: 0.6 GB per 1,000 positions at V = 151,936). With grad, each chunk is
    recomputed in backward instead of kept (activation checkpointing), so the saved tensors stay one chunk too.
    """
    rows, positions, vocab = logits.shape
    per_chunk = max(1, chunk_elements // max(rows * vocab, 1))
    if positions <= per_chunk:
        return _token_logprobs(logits, tokens, temperature)
    keep_graph = torch.is_grad_enabled() and logits.requires_grad
    parts = []
    for start in range(0, positions, per_chunk):
        piece = slice(start, start + per_chunk)
        if keep_graph:
            parts.append(checkpoint(_token_logprobs, logits[:, piece], tokens[:, piece], temperature,
                                    use_reentrant=False))
        else:
            parts.append(_token_logprobs(logits[:, piece], tokens[:, piece], temperature))
    return torch.cat(parts, dim=1)
