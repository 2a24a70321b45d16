"""Pure-PyTorch RL math: advantages, per-token log-probs, off-policy weights, policy loss, KL estimators.

Nothing here imports DeepSpeed or torch.distributed: counts that span ranks (`num_global_tokens`) arrive
as numbers, and diagnostics come as mergeable `DiagnosticParts` (rl.diagnostics) for the caller to merge over
micro-batches and reduce over ranks (engine.distributed.reduce_diagnostics) before `finalize`.
"""
from .advantages import ADVANTAGE_KINDS, compute_advantages, grpo_advantages
from .diagnostics import DiagnosticParts, finalize, merge
from .kl import KL_ESTIMATORS, kl_estimate, kl_k1, kl_k2, kl_k3
from .logprobs import token_logprobs
from .losses import LOSS_AGGREGATIONS, loss_token_mask, policy_loss, policy_loss_parts
from .weights import CORRECTIONS, LOG_RATIO_CLAMP, importance_weight_parts, importance_weights

__all__ = [
    "ADVANTAGE_KINDS", "CORRECTIONS", "KL_ESTIMATORS", "LOG_RATIO_CLAMP", "LOSS_AGGREGATIONS", "DiagnosticParts",
    "compute_advantages", "finalize", "grpo_advantages", "importance_weight_parts", "importance_weights",
    "kl_estimate", "kl_k1", "kl_k2", "kl_k3", "loss_token_mask", "merge", "policy_loss", "policy_loss_parts", "token_logprobs",
]
