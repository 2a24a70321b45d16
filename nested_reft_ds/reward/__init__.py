"""Verifiable math rewards: final-answer extraction, time-bounded equivalence, batched scoring.

Pure Python (no torch, no DeepSpeed). Sympy work runs in persistent worker processes that are killed when a
comparison overruns its time limit, so a pathological completion cannot stall or exhaust a training step.

    result = score_batch_with_stats(completions, references, format_weight=0.1)
    rewards = result.scores                      # one float per completion
    log.update(result.log_metrics())             # reward/timeouts, reward/parse_failures, ...
"""
from .extract import extract_answer, has_boxed_answer, last_boxed
from .pool import Outcome, VerifierPool, WorkerStartError, default_pool
from .score import (
    DEFAULT_REL_TOL,
    DEFAULT_TIMEOUT,
    BatchScores,
    Choices,
    compare_answers,
    math_equal,
    score_batch,
    score_batch_with_stats,
    too_large_to_verify,
)

__all__ = [
    "DEFAULT_REL_TOL",
    "DEFAULT_TIMEOUT",
    "BatchScores",
    "Choices",
    "Outcome",
    "VerifierPool",
    "WorkerStartError",
    "compare_answers",
    "default_pool",
    "extract_answer",
    "has_boxed_answer",
    "last_boxed",
    "math_equal",
    "score_batch",
    "score_batch_with_stats",
    "too_large_to_verify",
]
