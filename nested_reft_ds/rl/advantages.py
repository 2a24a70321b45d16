"""Group-relative advantages from scalar rewards.

Rewards arrive flat with each prompt's samples contiguous: rows g*G .. g*G+G-1 are prompt g's G samples.
Every estimator returns one advantage per sequence ([B]); the loss broadcasts it over completion tokens.

Group statistics are computed in float64 on rewards shifted by the group's first reward. The shift makes a
group whose rewards are all equal exactly zero before any rounding, so its advantage is exactly 0 whatever the
reward values (in float32, the rounding error of the mean of eight rewards of 1.2, divided by std + eps, gives
every member an advantage of about 0.1).
"""
from __future__ import annotations

import torch

ADVANTAGE_KINDS = ("grpo", "dr_grpo", "rloo")


def _centred(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """r - group mean, [N, G] in float64, exactly 0 for a group of equal rewards."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 2 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the number of rewards "
                         f"({rewards.numel()})")
    r = rewards.double().view(-1, group_size)  # [N, G]
    shifted = r - r[:, :1]                     # the mean is shift-invariant; equal rewards become exact zeros
    return shifted - shifted.mean(dim=1, keepdim=True)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps), std with Bessel's correction (as torch.std, TRL, verl).

    rewards [B] -> [B] float32. A group whose rewards are all equal gets advantage exactly 0."""
    centred = _centred(rewards, group_size)  # [N, G]
    std = centred.std(dim=1, keepdim=True)
    return (centred / (std + eps)).reshape(-1).float()


def compute_advantages(rewards: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """Dispatch on `algorithm.advantage`: rewards [B] -> advantages [B] (float32).

    - grpo: (r - mean) / (std + eps)
    - dr_grpo: r - mean (Dr. GRPO drops the std division, which up-weights near-solved/near-failed groups)
    - rloo: r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean), the leave-one-out baseline (unbiased)
    """
    if kind == "grpo":
        return grpo_advantages(rewards, group_size)
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"advantage kind {kind!r} is not one of {', '.join(ADVANTAGE_KINDS)}")
    centred = _centred(rewards, group_size)  # [N, G]
    if kind == "rloo":
        centred = centred * (group_size / (group_size - 1))
    return centred.reshape(-1).float()
