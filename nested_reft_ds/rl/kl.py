"""Per-token KL estimators (Schulman, "Approximating KL divergence", 2020).

Both estimate KL(p || q) from tokens sampled from p, given log p and log q at those tokens. With
r = q / p: k1 = -log r (unbiased, can be negative per token), k3 = (r - 1) - log r (unbiased, always >= 0,
lower variance when p and q are close).
"""
from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k3")

# exp(±20) stays finite in float32 and far beyond any ratio a working run produces.
_LOG_CLAMP = 20.0


def kl_k1(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log q per token; same shape as the inputs."""
    return logp - logq


def kl_k3(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log q - log p) - 1 - (log q - log p) per token; same shape as the inputs."""
    log_r = (logq - logp).clamp(-_LOG_CLAMP, _LOG_CLAMP)
    return torch.expm1(log_r) - log_r


def kl_estimate(logp: torch.Tensor, logq: torch.Tensor, estimator: str) -> torch.Tensor:
    """Dispatch on `algorithm.kl_estimator` ("k1" | "k3")."""
    if estimator == "k1":
        return kl_k1(logp, logq)
    if estimator == "k3":
        return kl_k3(logp, logq)
    raise ValueError(f"kl_estimator {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")
