"""The policy-gradient loss: off-policy weight x decoupled PPO-clip surrogate, plus an optional reference KL.

Three policies are kept apart: beta sampled the tokens (behavior_logprobs), pi_prox is the full target at
rollout time (prox_logprobs, detached), pi_theta is being optimised (logprobs, with grad). The off-policy
weight w = f(pi_prox / beta) is detached and corrects for sampling from beta; the PPO trust region acts on
pi_theta / pi_prox only, so it clips optimisation drift and never the nested-model mismatch.
"""
from __future__ import annotations

import torch

from ..config import AlgorithmConfig
from .diagnostics import DiagnosticParts, finalize, merge, parts_from_tensors
from .kl import kl_estimate
from .weights import LOG_RATIO_CLAMP, importance_weight_parts

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def policy_loss_parts(
    logprobs: torch.Tensor,
    prox_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: AlgorithmConfig,
    *,
    num_global_tokens: float,
    num_global_seqs: float,
    ref_logprobs: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, DiagnosticParts]:
    """This micro-batch's share of the global loss, and its diagnostics as mergeable parts.

    logprobs [B, T] (pi_theta, with grad); prox_logprobs, behavior_logprobs, ref_logprobs [B, T] (detached);
    advantages [B] (one per sequence); mask [B, T] (1 on completion tokens). Token loss:
        l_t = -w_t * min(r_t A, clip(r_t, 1 - clip_eps_low, 1 + clip_eps_high) A) + kl_coef * KL_t,
        l_t = w_t * (-min(r_t A, clip(r_t, 1 - clip_eps_low, 1 + clip_eps_high) A) + kl_coef * KL_t),
    r_t = pi_theta / pi_prox, w_t from `importance_weights` with `cfg.correction`, KL_t the `cfg.kl_estimator`
    estimate (rl.kl) at the sampled token; the KL term is left out when `cfg.kl_in_reward` puts the penalty in
    the reward instead. The KL term carries the same off-policy weight as the policy-gradient term: its expected
    gradient is then the on-policy one (rl.kl states which divergence that follows), not one under beta.

    Normalisation contract: summing the returned losses over every micro-batch on every rank gives the global
    objective, so the counts are global (all-reduced by the caller):
      token_mean               sum_t l_t / num_global_tokens
      seq_mean_token_mean      sum_i mean_t l_it / num_global_seqs
      seq_mean_token_sum_norm  sum_t l_t / (num_global_seqs * max_completion_length)   (Dr. GRPO; default T)
    With `cfg.normalize_over="kept_tokens"` a token a masking correction (token_mis, seq_mis) drops leaves the
    loss's token set: the counts are then of kept tokens and of sequences with a kept token (`loss_token_mask`),
    and seq_mean_token_mean averages over each sequence's kept tokens. docs/estimators.md tabulates the forms.
    `group_size` is needed only for `cfg.self_normalize` (each prompt group must sit in one micro-batch).

    The parts (rl.diagnostics) hold the `importance_weight_parts` diagnostics plus those of the surrogate; merged
    over every micro-batch (and rank: engine.distributed.reduce_diagnostics) and finalized they give, over the
    global batch: every `importance_weights` statistic, plus clip_frac (tokens whose clipped branch is active),
    ppo_ratio_{mean,min,max} (pi_theta / pi_prox), pg_loss (mean token surrogate loss), kl_ref (when
    ref_logprobs is given) and nonfinite_logprobs_count (completion tokens with non-finite pi_theta log-probs;
    like nonfinite_count a total over the merged rows, not a mean).
    Completion tokens with a non-finite pi_theta, pi_prox or beta log-prob are excluded from the loss.
    """
    if cfg.loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg {cfg.loss_agg!r} is not one of {', '.join(LOSS_AGGREGATIONS)}")
    if logprobs.shape != mask.shape or advantages.shape != mask.shape[:1]:
        raise ValueError(f"expected logprobs/mask [B, T] and advantages [B], got {tuple(logprobs.shape)}, "
                         f"{tuple(mask.shape)}, {tuple(advantages.shape)}")
    if cfg.kl_coef > 0 and not cfg.kl_in_reward and ref_logprobs is None:
        raise ValueError(f"algorithm.kl_coef={cfg.kl_coef} > 0 needs ref_logprobs (a reference model)")

    weights, weight_parts = importance_weight_parts(
        prox_logprobs, behavior_logprobs, mask, correction=cfg.correction, cap=cfg.is_cap, low=cfg.mask_low,
        high=cfg.mask_high, self_normalize=cfg.self_normalize, group_size=group_size,
        geometric=cfg.seq_mis_geometric)                                           # [B, T], detached

    completion = mask > 0                                                          # [B, T]
    if cfg.normalize_over == "kept_tokens":
        completion = completion & (weights != 0)
    prox = prox_logprobs.detach().float()                                          # [B, T]
    # Padding may hold -inf/NaN log-probs: select before any arithmetic so no NaN reaches the backward pass.
    # A completion token with any non-finite log-prob is a corrupted sample and leaves the loss entirely.
    logp_finite = torch.isfinite(logprobs.detach())                                 # [B, T]
    ok = completion & logp_finite & torch.isfinite(prox) & torch.isfinite(behavior_logprobs.detach())
    logp = torch.where(ok, logprobs.float(), 0.0)                                   # [B, T]
    prox = torch.where(ok, prox, 0.0)                                              # [B, T]

    ratio = torch.exp((logp - prox).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))      # [B, T] pi_theta / pi_prox
    adv = advantages.detach().float()[:, None]                                     # [B, 1]
    low, high = 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high
    surrogate = torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)           # [B, T]
    pg_token = -weights * surrogate                                                # [B, T]
    token_loss = pg_token
    kl_token = None
    if ref_logprobs is not None:
        ref = ref_logprobs.detach().float()                                         # [B, T]
        ref_ok = ok & torch.isfinite(ref)
        # Where ref is unusable, feed logp itself (KL 0, finite gradient) rather than let NaN into the backward.
        ref = torch.where(ref_ok, ref, logp.detach())
        kl_token = torch.where(ref_ok, kl_estimate(logp, ref, cfg.kl_estimator), 0.0)  # [B, T]
        if cfg.kl_coef > 0 and not cfg.kl_in_reward:
            token_loss = token_loss + cfg.kl_coef * weights * kl_token
    token_loss = torch.where(ok, token_loss, 0.0)                                  # [B, T]

    if cfg.loss_agg == "token_mean":
        loss = token_loss.sum() / max(float(num_global_tokens), 1.0)
    elif cfg.loss_agg == "seq_mean_token_mean":
        per_seq = token_loss.sum(dim=1) / completion.sum(dim=1).clamp(min=1)        # [B]
        loss = per_seq.sum() / max(float(num_global_seqs), 1.0)
    else:
        length = max_completion_length if max_completion_length is not None else mask.shape[1]
        loss = token_loss.sum() / (max(float(num_global_seqs), 1.0) * length)

    with torch.no_grad():
        clipped = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))        # [B, T]
        sums = {
            "ok_n": ok.sum(), "clipped": (clipped & ok).sum(), "ppo_ratio": torch.where(ok, ratio, 0.0).double().sum(),
            "pg": torch.where(ok, pg_token, 0.0).double().sum(),
            "nonfinite_logprobs": ((mask > 0) & ~logp_finite).sum(),
        }
        if kl_token is not None:
            sums["kl_ref"] = kl_token.detach().double().sum()
        surrogate_parts = parts_from_tensors(sums, {"ppo_ratio": ratio.detach()[ok]}, {})
    return loss, merge([weight_parts, surrogate_parts])


def loss_token_mask(prox_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor,
                    cfg: AlgorithmConfig, *, group_size: int | None = None) -> torch.Tensor:
    """The completion tokens [B, T] (bool) the loss aggregation counts under `cfg.normalize_over`: every completion
    token, or ("kept_tokens") those whose off-policy weight is non-zero. The caller all-reduces their count (and
    that of sequences holding one) into `num_global_tokens` / `num_global_seqs` before the update."""
    if cfg.normalize_over == "completion_tokens":
        return mask > 0
    weights, _ = importance_weight_parts(
        prox_logprobs, behavior_logprobs, mask, correction=cfg.correction, cap=cfg.is_cap, low=cfg.mask_low,
        high=cfg.mask_high, self_normalize=cfg.self_normalize, group_size=group_size,
        geometric=cfg.seq_mis_geometric)
    return (mask > 0) & (weights != 0)


def policy_loss(
    logprobs: torch.Tensor,
    prox_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: AlgorithmConfig,
    *,
    num_global_tokens: float,
    num_global_seqs: float,
    ref_logprobs: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`policy_loss_parts` with its diagnostics finalized for this micro-batch alone: (loss, metrics).

    Metrics of one micro-batch only: to report a step, merge the parts of every micro-batch and rank instead of
    averaging these (ESS, quantiles and ratios of sums are not additive)."""
    loss, parts = policy_loss_parts(
        logprobs, prox_logprobs, behavior_logprobs, advantages, mask, cfg, num_global_tokens=num_global_tokens,
        num_global_seqs=num_global_seqs, ref_logprobs=ref_logprobs, max_completion_length=max_completion_length,
        group_size=group_size)
    return loss, finalize(parts)
