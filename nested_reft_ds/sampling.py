"""Token sampling whose randomness belongs to the token, not to the batch.

Every sampled token reads one uniform number derived from (seed, row key, position) by a counter-based hash, and
turns it into a token by inverting the CDF of the row's sampling distribution. A row therefore samples the same
tokens whatever else is in its batch: dropping finished rows mid-decode (compaction), sharing one prompt prefill
between a group's samples, re-sharding the batch over another number of ranks, or resuming, change nothing.
One shared `torch.Generator` stream would hand each row different numbers as soon as the batch changes shape.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # < 2**27: a 32-bit value times it fits in int64, so the hash never overflows


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche mix of 32-bit values held in int64 (xor-shift-multiply, two rounds)."""
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIER) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIER) & _MASK32
    return x ^ (x >> 16)


def _absorb(state: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """Fold a non-negative 64-bit value into a 32-bit hash state, low word then high word."""
    value = torch.as_tensor(value, dtype=torch.int64, device=state.device)
    state = _mix32(state ^ (value & _MASK32))
    return _mix32(((state + 0x9E3779B9) & _MASK32) ^ ((value >> 32) & _MASK32))


def keyed_uniforms(seed: int, row_keys: torch.Tensor, position: int) -> torch.Tensor:
    """One uniform number in [0, 1) per row [B] (float64), a pure function of (seed, row key, position).

    `seed` and `row_keys` (int64, >= 0) name the draw; `position` is the index of the token in the completion."""
    if seed < 0 or position < 0 or bool((row_keys < 0).any()):
        raise ValueError(f"seed, row keys and position must be >= 0, got {seed}, min key {int(row_keys.min())}, "
                         f"{position}")
    state = torch.zeros_like(row_keys, dtype=torch.int64)
    state = _absorb(_absorb(_absorb(state, seed), row_keys), position)
    high = _mix32((state + 0x7F4A7C15) & _MASK32)  # a second, independent word from the same state
    return (high.double() + state.double() / 2.0**32) / 2.0**32


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probabilities of the distribution actually sampled from: softmax(logits / T) restricted to the top-p
    nucleus and renormalised. logits [B, V] -> [B, V] float32 (-inf outside the nucleus)."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return logprobs
    sorted_logprobs, order = logprobs.sort(dim=-1, descending=True)
    # Drop a token when the mass strictly before it already reaches top_p (the top token always stays).
    mass_before = sorted_logprobs.exp().cumsum(-1) - sorted_logprobs.exp()
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)


def sample_tokens(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Tokens [B] drawn from the rows of `logprobs` [B, V] by inverse CDF at `uniforms` [B].

    The CDF is accumulated in float64 and the target kept strictly below its total, so a token of probability
    zero is never selected: it adds nothing to the CDF, and the search takes the first index strictly above."""
    cdf = logprobs.double().exp().cumsum(dim=-1)  # [B, V]
    total = cdf[:, -1]
    target = torch.minimum(uniforms.to(cdf.device) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)


def keyed_uniform_table(seed: int, row_keys: torch.Tensor, num_positions: int) -> torch.Tensor:
    """[B, T] float64: entry (r, t) is `keyed_uniforms(seed, row_keys, t)[r]`, bit for bit, for t < `num_positions`.

    One pass of the hash over every (row, position) pair, instead of one pass per decode step."""
    if seed < 0 or num_positions < 0 or bool((row_keys < 0).any()):
        raise ValueError(f"seed, row keys and num_positions must be >= 0, got {seed}, min key "
                         f"{int(row_keys.min())}, {num_positions}")
    state = torch.zeros_like(row_keys, dtype=torch.int64)
    state = _absorb(_absorb(state, seed), row_keys)[:, None]  # [B, 1]
    positions = torch.arange(num_positions, dtype=torch.int64, device=row_keys.device)[None, :]  # [1, T]
    state = _absorb(state, positions)  # [B, T]
    high = _mix32((state + 0x7F4A7C15) & _MASK32)
    return (high.double() + state.double() / 2.0**32) / 2.0**32


def speculative_verify(target_logprobs: torch.Tensor, draft_logprobs: torch.Tensor, drafts: torch.Tensor,
                       accept_uniforms: torch.Tensor, resample_uniforms: torch.Tensor,
                       greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative sampling rule for a batch of rows, each with g drafted tokens.

    `target_logprobs` [B, g+1, V]: the target's sampling distribution (`sampling_logprobs`) at the g drafted
    positions and the one after them; `draft_logprobs` [B, g, V]: the drafter's, from which `drafts` [B, g] were
    sampled; `accept_uniforms` [B, g] and `resample_uniforms` [B, g+1]: independent uniforms in [0, 1), one per
    position. Returns (accepted [B]: how many leading drafts are kept, next_token [B]: the token at position
    `accepted`).

    Draft i is kept when u_i < p_i(d_i) / q_i(d_i) and every earlier one was; at the first rejected position the
    token is drawn from norm(max(0, p - q)), and when all g are kept a bonus token is drawn from p_{g+1}. Every
    position's token is then distributed as p's (Leviathan et al. 2023, Chen et al. 2023), whatever q is, as long
    as q is the distribution the draft was really sampled from. `greedy`: a draft is kept when it is p's argmax,
    and the next token is p's argmax (the full model's greedy decode)."""
    if draft_logprobs.dim() != 3:
        raise ValueError(f"speculative_verify: draft log-probs must be [B, g, V], got {list(draft_logprobs.shape)}")
    rows, g, vocab = draft_logprobs.shape[0], draft_logprobs.shape[1], draft_logprobs.shape[2]
    if list(target_logprobs.shape) != [rows, g + 1, vocab] or list(drafts.shape) != [rows, g]:
        raise ValueError(f"speculative_verify: target {list(target_logprobs.shape)}, draft "
                         f"{list(draft_logprobs.shape)} and drafts {list(drafts.shape)} do not agree")
    if greedy:
        keep = drafts == target_logprobs[:, :g].argmax(-1)
    else:
        target_of_draft = target_logprobs[:, :g].gather(-1, drafts[..., None]).squeeze(-1).double()
        draft_of_draft = draft_logprobs.gather(-1, drafts[..., None]).squeeze(-1).double()
        keep = accept_uniforms.to(target_of_draft.device) < (target_of_draft - draft_of_draft).exp()
    accepted = keep.long().cumprod(-1).sum(-1)  # [B] leading drafts kept
    at = accepted[:, None, None].expand(rows, 1, vocab)
    target_next = target_logprobs.gather(1, at).squeeze(1)  # [B, V] p at the first undecided position
    if greedy:
        return accepted, target_next.argmax(-1)
    # At a rejection: the residual max(0, p - q); after g acceptances (the gathered q is then a dummy): p itself.
    draft_next = draft_logprobs.gather(1, at.clamp(max=g - 1)).squeeze(1)
    residual = (target_next.double().exp() - draft_next.double().exp()).clamp(min=0)
    rejected = (accepted < g)[:, None]
    # A rejection has a residual of positive mass (it needs p(d) < q(d) somewhere); an all-zero one is float noise.
    use_target = ~rejected | (residual.sum(-1, keepdim=True) <= 0)
    weights = torch.where(use_target, target_next.double().exp(), residual)
    uniforms = resample_uniforms.to(weights.device).gather(1, accepted[:, None]).squeeze(1)
    return accepted, sample_tokens(weights.log(), uniforms)
