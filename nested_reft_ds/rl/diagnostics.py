"""Estimator diagnostics as mergeable parts, so that every statistic is exact over the global batch.

ESS/N = (sum w)^2 / (N sum w^2), a quantile or a mean is not additive: averaging per-micro-batch (or per-rank)
values makes the reported number depend on micro_batch_size and world size. A batch's diagnostics are kept as
`DiagnosticParts` instead:
  sums    additive numerators and denominators (sum w, sum w^2, counts, KL sums, ...), kept in float64
  mins    running minima, maxs running maxima (identity +inf / -inf for an empty set)
  values  detached 1-D float32 tensors whose quantiles are reported (valid per-token and per-sequence ratios)
`merge` combines parts of disjoint row sets (micro-batches, ranks) and `finalize` turns parts into metrics, so
finalize(merge(parts of the pieces)) == finalize(parts of the whole batch) up to float64 rounding of the sums.
The cross-rank reduction lives in engine.distributed.reduce_diagnostics (this module is pure torch).

Sums keys written by rl.weights.importance_weight_parts (for the correction's "unit": sequences for seq_*,
else tokens):
  tok_n, tok_ratio, tok_ratio_sq, tok_log_ratio, tok_k3,  valid completion tokens: count, sum rho_t, sum rho_t^2,
  tok_accept                                               sum log rho_t, sum (rho_t - 1 - log rho_t),
                                                           sum min(1, rho_t)
  seq_n, seq_ratio, seq_ratio_sq, seq_log_ratio           valid sequences: count, sum rho, sum rho^2, sum log rho
  unit_n, unit_w, unit_w_sq, unit_truncated, unit_masked  valid units: count, sum w, sum w^2, truncated, masked
  completion_n, weight, nonfinite                         completion tokens, sum of token weights, NaN/inf ratios
and by rl.losses.policy_loss_parts:
  ok_n, clipped, ppo_ratio, pg, nonfinite_logprobs, kl_ref (only with a reference)
mins/maxs keys: ratio_tok, ratio_seq, log_ratio_seq, ppo_ratio. values keys: ratio_tok, ratio_seq.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

QUANTILES = (0.1, 0.5, 0.9)


@dataclass
class DiagnosticParts:
    """Mergeable diagnostics of a set of rows; see the module docstring for the keys."""
    sums: dict[str, float] = field(default_factory=dict)
    mins: dict[str, float] = field(default_factory=dict)
    maxs: dict[str, float] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)


def parts_from_tensors(sums: dict[str, torch.Tensor], extremes: dict[str, torch.Tensor],
                       values: dict[str, torch.Tensor]) -> DiagnosticParts:
    """DiagnosticParts from 0-d tensor sums and 1-D tensors whose min/max (`extremes`) or quantiles (`values`)
    are reported, with one device->host transfer. Sums are accumulated in float64."""
    stacked = [v.double() for v in sums.values()]
    names = list(extremes)
    for name in names:
        x = extremes[name].detach()
        if x.numel():
            stacked += [x.min().double(), x.max().double()]
    host = torch.stack(stacked).tolist() if stacked else []
    parts = DiagnosticParts(sums=dict(zip(sums, host[:len(sums)])))
    rest = iter(host[len(sums):])
    for name in names:
        if extremes[name].numel():
            parts.mins[name], parts.maxs[name] = next(rest), next(rest)
        else:
            parts.mins[name], parts.maxs[name] = math.inf, -math.inf
    parts.values = {name: v.detach().float().reshape(-1) for name, v in values.items()}
    return parts


def merge(parts_list: list[DiagnosticParts]) -> DiagnosticParts:
    """The parts of the union of disjoint row sets: sums added, min of mins, max of maxs, values concatenated."""
    out = DiagnosticParts()
    for parts in parts_list:
        for key, v in parts.sums.items():
            out.sums[key] = out.sums.get(key, 0.0) + v
        for key, v in parts.mins.items():
            out.mins[key] = min(out.mins.get(key, math.inf), v)
        for key, v in parts.maxs.items():
            out.maxs[key] = max(out.maxs.get(key, -math.inf), v)
    for key in dict.fromkeys(k for parts in parts_list for k in parts.values):
        pieces = [parts.values[key] for parts in parts_list if key in parts.values]
        device = pieces[0].device
        out.values[key] = torch.cat([p.to(device) for p in pieces])
    return out


def quantiles(x: torch.Tensor, qs: tuple[float, ...] = QUANTILES) -> list[float]:
    """Linear-interpolation quantiles of a non-empty 1-D tensor (as torch.quantile, without its size limit)."""
    s = torch.sort(x.reshape(-1)).values
    n = s.numel()
    positions = [q * (n - 1) for q in qs]
    index = [i for pos in positions for i in (int(pos), min(int(pos) + 1, n - 1))]
    picked = s[torch.tensor(index, device=s.device)].double().tolist()
    return [lo + (hi - lo) * (pos - int(pos)) for pos, lo, hi in zip(positions, picked[0::2], picked[1::2])]


def ess(sum_w: float, sum_w2: float, n: float) -> float:
    """Normalised effective sample size (sum w)^2 / (N sum w^2); 1 for an empty set, 0 when all weights are 0."""
    if n == 0:
        return 1.0
    return sum_w * sum_w / (n * sum_w2) if sum_w2 > 0 else 0.0


def _summary(parts: DiagnosticParts, name: str, count: float, total: float, neutral: float,
             with_quantiles: bool = True) -> dict[str, float]:
    """{name}_{mean,min,max} (+ p10/p50/p90 from values[name]); `neutral` for every entry when count is 0."""
    keys = ["mean", "min", "max"] + ([f"p{round(q * 100)}" for q in QUANTILES] if with_quantiles else [])
    if count == 0:
        return {f"{name}_{k}": float(neutral) for k in keys}
    out = [total / count, parts.mins[name], parts.maxs[name]]
    if with_quantiles:
        out += quantiles(parts.values[name])
    return {f"{name}_{k}": float(v) for k, v in zip(keys, out)}


def finalize(parts: DiagnosticParts) -> dict[str, float]:
    """The reported metrics (python floats) of the rows `parts` describes.

    From importance-weight parts: ratio_tok_{mean,min,max,p10,p50,p90}, ratio_seq_{...}, log_ratio_seq_{mean,min,
    max}, frac_truncated, frac_masked, ess, ess_tok_raw, ess_seq_raw, chi2_tok, chi2_seq, accept, kl_behavior_k1,
    kl_behavior_k3,
    weight_mean, nonfinite_count, nonfinite_frac; from policy-loss parts also clip_frac, ppo_ratio_{mean,min,max},
    pg_loss, nonfinite_logprobs_count and kl_ref (with a reference). Empty sets give the neutral values (ratios 1,
    log-ratios / fractions / KL / chi-square 0, ESS and accept 1). nonfinite_count and nonfinite_logprobs_count are totals over the rows.
    """
    s = parts.sums
    out: dict[str, float] = {}
    if "tok_n" in s:
        out.update(_summary(parts, "ratio_tok", s["tok_n"], s["tok_ratio"], 1.0))
        out.update(_summary(parts, "ratio_seq", s["seq_n"], s["seq_ratio"], 1.0))
        out.update(_summary(parts, "log_ratio_seq", s["seq_n"], s["seq_log_ratio"], 0.0, with_quantiles=False))
        unit_n, tok_n, completion_n = s["unit_n"], s["tok_n"], max(s["completion_n"], 1.0)
        out["frac_truncated"] = s["unit_truncated"] / unit_n if unit_n else 0.0
        out["frac_masked"] = s["unit_masked"] / unit_n if unit_n else 0.0
        out["ess"] = ess(s["unit_w"], s["unit_w_sq"], unit_n)
        out["ess_tok_raw"] = ess(s["tok_ratio"], s["tok_ratio_sq"], tok_n)
        out["ess_seq_raw"] = ess(s["seq_ratio"], s["seq_ratio_sq"], s["seq_n"])
        out["chi2_tok"] = s["tok_ratio_sq"] / tok_n - 1.0 if tok_n else 0.0
        out["chi2_seq"] = s["seq_ratio_sq"] / s["seq_n"] - 1.0 if s["seq_n"] else 0.0
        out["accept"] = s["tok_accept"] / tok_n if tok_n else 1.0
        out["kl_behavior_k1"] = -s["tok_log_ratio"] / tok_n if tok_n else 0.0
        # k3 for KL(beta || pi) with samples from beta: (rho - 1) - log rho.
        out["kl_behavior_k3"] = s["tok_k3"] / tok_n if tok_n else 0.0
        out["weight_mean"] = s["weight"] / completion_n
        out["nonfinite_count"] = s["nonfinite"]
        out["nonfinite_frac"] = s["nonfinite"] / completion_n
    if "ok_n" in s:
        n_ok = max(s["ok_n"], 1.0)
        out["clip_frac"] = s["clipped"] / n_ok
        out["ppo_ratio_mean"] = s["ppo_ratio"] / n_ok
        out["ppo_ratio_min"] = parts.mins["ppo_ratio"] if s["ok_n"] else 1.0
        out["ppo_ratio_max"] = parts.maxs["ppo_ratio"] if s["ok_n"] else 1.0
        out["pg_loss"] = s["pg"] / n_ok
        out["nonfinite_logprobs_count"] = s["nonfinite_logprobs"]
        if "kl_ref" in s:
            out["kl_ref"] = s["kl_ref"] / n_ok
    return {k: float(v) for k, v in out.items()}
