"""Pure-PyTorch RL math: advantages, per-token log-probs, off-policy weights, policy loss, KL estimators.

Nothing here imports DeepSpeed or torch.distributed: counts that span ranks (`num_global_tokens`) arrive
as numbers, and metrics are per micro-batch for the caller to reduce.
"""
from .advantages import ADVANTAGE_KINDS, compute_advantages, grpo_advantages
from .kl import KL_ESTIMATORS, kl_estimate, kl_k1, kl_k3
from .logprobs import token_logprobs
from .losses import LOSS_AGGREGATIONS, policy_loss
from .weights import CORRECTIONS, LOG_RATIO_CLAMP, importance_weights

__all__ = [
    "ADVANTAGE_KINDS", "CORRECTIONS", "KL_ESTIMATORS", "LOG_RATIO_CLAMP", "LOSS_AGGREGATIONS",
    "compute_advantages", "grpo_advantages", "importance_weights", "kl_estimate", "kl_k1", "kl_k3",
    "policy_loss", "token_logprobs",
]
