"""Group-relative advantages from scalar rewards.

Rewards arrive flat with each prompt's samples contiguous: rows g*G .. g*G+G-1 are prompt g's G samples.
Every estimator returns one advantage per sequence ([B]); the loss broadcasts it over completion tokens.
"""
from __future__ import annotations

import torch

ADVANTAGE_KINDS = ("grpo", "dr_grpo", "rloo")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 2 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the number of rewards "
                         f"({rewards.numel()})")
    return rewards.float().view(-1, group_size)  # [num_groups, G]


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps), std with Bessel's correction (as torch.std, TRL, verl).

    rewards [B] -> [B]. A group whose rewards are all equal has r - mean = 0 exactly, hence advantage 0.
    """
    r = _grouped(rewards, group_size)  # [N, G]
    centred = r - r.mean(dim=1, keepdim=True)
    return (centred / (r.std(dim=1, keepdim=True) + eps)).reshape(-1)


def compute_advantages(rewards: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """Dispatch on `algorithm.advantage`: rewards [B] -> advantages [B].

    - grpo: (r - mean) / (std + eps)
    - dr_grpo: r - mean (Dr. GRPO drops the std division, which up-weights near-solved/near-failed groups)
    - rloo: r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean), the leave-one-out baseline (unbiased)
    """
    if kind == "grpo":
        return grpo_advantages(rewards, group_size)
    r = _grouped(rewards, group_size)  # [N, G]
    centred = r - r.mean(dim=1, keepdim=True)
    if kind == "dr_grpo":
        return centred.reshape(-1)
    if kind == "rloo":
        return (centred * (group_size / (group_size - 1))).reshape(-1)
    raise ValueError(f"advantage kind {kind!r} is not one of {', '.join(ADVANTAGE_KINDS)}")
