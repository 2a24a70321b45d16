"""Per-token KL estimators (Schulman, "Approximating KL divergence", 2020), and the divergence each one's
gradient follows.

Given log p and log q at tokens sampled from p, with log r = log q - log p:
    k1 = -log r                 value: unbiased for KL(p || q); can be negative per token
    k2 = (log r)^2 / 2          value: biased (second order in log r), always >= 0
    k3 = (r - 1) - log r        value: unbiased for KL(p || q), always >= 0, low variance when p ~ q

As a loss term with p = pi_theta and q = pi_ref, the samples are fixed, so only the pathwise gradient flows:
    grad k1 = grad log p                  E_p[.] = 0: no expected gradient, only noise
    grad k2 = -log r * grad log p         E_p[.] = grad KL(pi_theta || pi_ref)   (reverse KL, what kl_coef means)
    grad k3 = (1 - r) * grad log p        E_p[.] = grad KL(pi_ref || pi_theta)   (forward KL)
In the reward (`algorithm.kl_in_reward`) the penalty reaches the policy through the score function instead,
E_p[k grad log p], and only k1 gives grad KL(pi_theta || pi_ref) there. config.AlgorithmConfig refuses the
combinations whose gradient is not a KL's: k1 in the loss, k2 or k3 in the reward.
"""
from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")

# exp(±20) stays finite in float32 and far beyond any ratio a working run produces.
_LOG_CLAMP = 20.0


def kl_k1(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log q per token; same shape as the inputs."""
    return logp - logq


def kl_k2(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """k2 = (log p - log q)^2 / 2 per token; same shape as the inputs."""
    return 0.5 * (logp - logq).square()


def kl_k3(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log q - log p) - 1 - (log q - log p) per token; same shape as the inputs."""
    log_r = (logq - logp).clamp(-_LOG_CLAMP, _LOG_CLAMP)
    return torch.expm1(log_r) - log_r


def kl_estimate(logp: torch.Tensor, logq: torch.Tensor, estimator: str) -> torch.Tensor:
    """Dispatch on `algorithm.kl_estimator` ("k1" | "k2" | "k3")."""
    if estimator == "k1":
        return kl_k1(logp, logq)
    if estimator == "k2":
        return kl_k2(logp, logq)
    if estimator == "k3":
        return kl_k3(logp, logq)
    raise ValueError(f"kl_estimator {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")
