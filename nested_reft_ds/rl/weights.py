"""Off-policy correction weights for behaviour (nested) samples, and their diagnostics.

Notation: rho_t = pi_prox(y_t | h_t) / beta(y_t | h_t) per completion token, rho = prod_t rho_t per sequence.
Everything is computed in log space: a per-token ratio of 1.1 is ~14,000 over 100 tokens, so products
saturate float32 long before they are interesting. Log-ratios are clamped to +-LOG_RATIO_CLAMP before exp.

A token whose log-ratio is NaN/inf (e.g. -inf - -inf from a masked-out vocabulary entry) is never
propagated: it gets weight 0 and is counted; under a sequence-level correction its whole sequence gets 0
because the sequence ratio is undefined.
"""
from __future__ import annotations

import torch

from .diagnostics import DiagnosticParts, finalize, parts_from_tensors

CORRECTIONS = ("none", "seq_is", "token_tis", "token_mis", "seq_mis")
SEQUENCE_CORRECTIONS = ("seq_is", "seq_mis")

# exp(20) ~ 4.9e8: squares and batch sums stay finite in float32; a real run that reaches it is broken anyway.
LOG_RATIO_CLAMP = 20.0

def importance_weight_parts(
    prox_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    correction: str,
    cap: float | None = None,
    low: float | None = None,
    high: float | None = None,
    self_normalize: bool = False,
    group_size: int | None = None,
    geometric: bool = True,
) -> tuple[torch.Tensor, DiagnosticParts]:
    """Detached per-token off-policy weights [B, T] and their diagnostics as mergeable parts.

    prox_logprobs, behavior_logprobs [B, T]: log pi_prox and log beta of the sampled tokens; mask [B, T]
    (1 on completion tokens, 0 elsewhere). Tokens with mask 0 always get weight 0.

    correction:
      none       w = 1 (treats behaviour samples as on-policy; biased when beta != pi)
      seq_is     w = rho, or min(rho, cap); with `self_normalize`, rescaled so the valid sequences of each
                 prompt group (contiguous rows of `group_size`) have mean weight 1. Uncapped: unbiased.
      token_tis  w_t = min(rho_t, cap) (cap None: plain per-token ratio)
      token_mis  w_t = rho_t if low <= rho_t <= high else 0 (masked IS, IcePop-style)
      seq_mis    s = exp(mean_t log rho_t) if `geometric` else rho; w = s if low <= s <= high else 0, on every
                 token of the sequence (the geometric form is the length-normalised ratio GSPO uses)
    Sequence-level weights are repeated on each completion token of the sequence.

    The parts finalize (rl.diagnostics.finalize) to these statistics, exact over whatever rows are merged:
      ratio_tok_{mean,min,max,p10,p50,p90}  raw rho_t over valid completion tokens, before truncation
      ratio_seq_{mean,min,max,p10,p50,p90}  raw rho over valid sequences, before truncation
      log_ratio_seq_{mean,min,max}          log rho (does not saturate)
      frac_truncated, frac_masked           in the correction's unit: sequences for seq_*, else tokens
      ess                                   ESS/N of the weights used, same unit (1 under `none`: read the raw ones)
      ess_tok_raw, ess_seq_raw              ESS/N of the untruncated rho_t / rho (the unit is in the name)
      chi2_tok, chi2_seq                    E[rho_t^2] - 1 and E[rho^2] - 1 of the untruncated ratios (verl's
                                            chi2_token / chi2_seq; the raw ESS/N is mean^2 / (1 + chi2))
      accept                                mean_t min(1, rho_t): the per-token acceptance rate speculative sampling
                                            with the behaviour as drafter and pi_prox as verifier would have
      kl_behavior_k1, kl_behavior_k3        KL(beta || pi_prox) per token from the sampled tokens
      weight_mean                           mean weight over completion tokens
      nonfinite_count, nonfinite_frac       completion tokens whose ratio was NaN/inf (weight forced to 0):
                                            total count, fraction of completion tokens
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction {correction!r} is not one of {', '.join(CORRECTIONS)}")
    if correction in ("token_mis", "seq_mis") and (low is None or high is None):
        raise ValueError(f"correction={correction!r} needs the band low/high, got low={low!r} high={high!r}")
    if self_normalize and correction != "seq_is":
        raise ValueError(f"self_normalize=True applies to correction='seq_is' only, got {correction!r}")
    if self_normalize and (group_size is None or group_size < 1 or mask.shape[0] % group_size != 0):
        raise ValueError(f"self_normalize=True needs group_size dividing the batch ({mask.shape[0]} rows), "
                         f"got group_size={group_size!r}")
    if not prox_logprobs.shape == behavior_logprobs.shape == mask.shape:
        raise ValueError(f"shape mismatch: prox {tuple(prox_logprobs.shape)}, behavior "
                         f"{tuple(behavior_logprobs.shape)}, mask {tuple(mask.shape)}")

    with torch.no_grad():
        completion = mask > 0                                                          # [B, T]
        raw = prox_logprobs.detach().float() - behavior_logprobs.detach().float()      # [B, T]
        bad = completion & ~torch.isfinite(raw)                                        # [B, T]
        valid = completion & ~bad                                                      # [B, T]
        log_ratio = torch.where(valid, raw, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
        ratio = torch.exp(log_ratio)                                                   # [B, T]
        n_tok = valid.sum(dim=1)                                                       # [B]
        seq_valid = (n_tok > 0) & ~bad.any(dim=1)                                      # [B]
        seq_log_ratio = log_ratio.sum(dim=1)                                           # [B]
        seq_ratio = torch.exp(seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B]

        # The correction's unit: sequences [B] for seq_*, tokens [B, T] otherwise.
        unit_valid = seq_valid if correction in SEQUENCE_CORRECTIONS else valid
        truncated = torch.zeros_like(unit_valid)
        dropped = torch.zeros_like(unit_valid)
        if correction == "none":
            w_unit = torch.ones_like(ratio)
        elif correction == "token_tis":
            truncated = ratio > cap if cap is not None else truncated
            w_unit = ratio.clamp(max=cap) if cap is not None else ratio
        elif correction == "token_mis":
            dropped = (ratio < low) | (ratio > high)
            w_unit = torch.where(dropped, 0.0, ratio)
        elif correction == "seq_is":
            truncated = seq_ratio > cap if cap is not None else truncated
            w_unit = seq_ratio.clamp(max=cap) if cap is not None else seq_ratio        # [B]
            if self_normalize:
                w_g = torch.where(seq_valid, w_unit, 0.0).view(-1, group_size)          # [N, G]
                n_g = seq_valid.view(-1, group_size).sum(dim=1, keepdim=True)           # [N, 1]
                total = w_g.sum(dim=1, keepdim=True)
                w_unit = torch.where(total > 0, w_g * n_g / total.clamp_min(1e-30), 0.0).reshape(-1)
        else:  # seq_mis
            stat = torch.exp(seq_log_ratio / n_tok.clamp(min=1)) if geometric else seq_ratio  # [B]
            dropped = (stat < low) | (stat > high)
            w_unit = torch.where(dropped, 0.0, stat)                                   # [B]

        w_unit = torch.where(unit_valid, w_unit, 0.0)                                  # [B] or [B, T]
        weights = torch.where(valid, w_unit[:, None] if w_unit.dim() == 1 else w_unit, 0.0)  # [B, T]
        # Diagnostics as additive sums (float64), extremes and quantile values: exact once merged over rows.
        tok_values, seq_values = ratio[valid], seq_ratio[seq_valid]                    # [n_valid], [n_seq]
        tok_ratio, seq_r = tok_values.double(), seq_values.double()
        tok_lr = log_ratio[valid].double()                                             # [n_valid]
        seq_lr = seq_log_ratio[seq_valid]                                              # [n_seq]
        unit_w = w_unit[unit_valid].double()                                           # [n_unit]
        sums = {
            "tok_n": valid.sum(), "tok_ratio": tok_ratio.sum(), "tok_ratio_sq": (tok_ratio * tok_ratio).sum(),
            "tok_log_ratio": tok_lr.sum(), "tok_k3": (torch.expm1(tok_lr) - tok_lr).sum(),
            "tok_accept": tok_ratio.clamp(max=1.0).sum(),
            "seq_n": seq_valid.sum(), "seq_ratio": seq_r.sum(), "seq_ratio_sq": (seq_r * seq_r).sum(),
            "seq_log_ratio": seq_lr.double().sum(),
            "unit_n": unit_valid.sum(), "unit_w": unit_w.sum(), "unit_w_sq": (unit_w * unit_w).sum(),
            "unit_truncated": truncated[unit_valid].sum(), "unit_masked": dropped[unit_valid].sum(),
            "completion_n": completion.sum(), "weight": weights.double().sum(), "nonfinite": bad.sum(),
        }
        extremes = {"ratio_tok": tok_values, "ratio_seq": seq_values, "log_ratio_seq": seq_lr}
        parts = parts_from_tensors(sums, extremes, {"ratio_tok": tok_values, "ratio_seq": seq_values})
    return weights, parts


def importance_weights(
    prox_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    correction: str,
    cap: float | None = None,
    low: float | None = None,
    high: float | None = None,
    self_normalize: bool = False,
    group_size: int | None = None,
    geometric: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`importance_weight_parts` with its diagnostics finalized for this batch alone: (weights [B, T], stats).

    To report statistics over several micro-batches or ranks, merge the parts instead of averaging these stats
    (rl.diagnostics.merge / finalize, engine.distributed.reduce_diagnostics)."""
    weights, parts = importance_weight_parts(
        prox_logprobs, behavior_logprobs, mask, correction=correction, cap=cap, low=low, high=high,
        self_normalize=self_normalize, group_size=group_size, geometric=geometric)
    return weights, finalize(parts)
