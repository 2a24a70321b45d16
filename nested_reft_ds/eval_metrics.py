"""Evaluation metrics, pure: unbiased pass@k, majority vote over equivalent answers, and additive eval totals.

`EvalSums` is the reduction contract of data-parallel evaluation: sums from shards add up to the sums of the
whole, so ranks all-reduce `as_list()` and rebuild with `from_list()`.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from .reward import DEFAULT_REL_TOL, DEFAULT_TIMEOUT, Outcome, VerifierPool, compare_answers

def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased estimator of pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), in the numerically stable
    product form. The probability that at least one of k samples drawn without replacement is correct."""
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct must be in [0, num_samples={num_samples}], got {num_correct}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in [1, num_samples={num_samples}], got {k}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(num_samples - num_correct + 1, num_samples + 1))


def reported_ks(num_samples: int) -> list[int]:
    """The k of pass@k in reports: powers of two below n, and n itself."""
    ks = [1 << i for i in range(num_samples.bit_length()) if 1 << i < num_samples]
    return ks + [num_samples]


def cluster_answers(answers: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, rel_tol: float = DEFAULT_REL_TOL,
                    pool: VerifierPool | None = None) -> list[int]:
    """A cluster id per answer, numbered in order of first appearance: an answer joins the first cluster
    whose first member it is `math_equal` to ("6", "6.0" and "\\frac{12}{2}" share a cluster)."""
    representatives: list[str] = []
    ids = []
    for answer in answers:
        outcomes = compare_answers([(answer, rep) for rep in representatives], timeout=timeout, rel_tol=rel_tol,
                                   pool=pool) if representatives else []
        match = next((i for i, outcome in enumerate(outcomes) if outcome is Outcome.EQUAL), None)
        if match is None:
            representatives.append(answer)
            match = len(representatives) - 1
        ids.append(match)
    return ids


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool], k: int | None = None, *,
                  timeout: float = DEFAULT_TIMEOUT, rel_tol: float = DEFAULT_REL_TOL,
                  pool: VerifierPool | None = None) -> tuple[str | None, bool]:
    """(majority answer, whether it is correct) over the first `k` samples (default all).

    Samples without an answer do not vote. All correct answers are one cluster (each equals the reference);
    wrong answers are clustered with `cluster_answers`. The largest cluster wins; a tie goes to the cluster
    whose first vote came first. No votes: (None, False).
    """
    votes = [(i, a, c) for i, (a, c) in enumerate(zip(answers[:k], correct[:k])) if a is not None]
    if not votes:
        return None, False
    wrong = [(i, a) for i, a, c in votes if not c]
    if len(votes) - len(wrong) > len(wrong):  # no cluster of wrong answers can outvote the correct ones
        return next(a for _, a, c in votes if c), True
    wrong_ids = cluster_answers([a for _, a in wrong], timeout=timeout, rel_tol=rel_tol, pool=pool) if wrong else []
    label_of = {i: ("wrong", cluster) for (i, _), cluster in zip(wrong, wrong_ids)}
    labels = [label_of.get(i, ("correct", 0)) for i, _, _ in votes]
    sizes = Counter(labels)
    first_position = {}
    for position, label in enumerate(labels):
        first_position.setdefault(label, position)
    winner = max(sizes, key=lambda label: (sizes[label], -first_position[label]))
    return votes[first_position[winner]][1], winner[0] == "correct"


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int | None = None, **options) -> bool:
    """Whether the majority answer of the first `k` samples is correct (see `majority_vote`)."""
    return majority_vote(answers, correct, k, **options)[1]


@dataclass
class EvalSums:
    """Additive totals for one benchmark; `metrics()` turns them into rates. Sums from shards add up to the
    sums of the whole (the reduction contract for data-parallel evaluation)."""

    samples_per_problem: int
    problems: int = 0
    samples: int = 0
    pass_at_k: dict[int, float] = field(default_factory=dict)  # k -> sum over problems of pass@k
    majority_correct: int = 0
    completion_tokens: int = 0
    truncated: int = 0  # completions that hit max_new_tokens without EOS
    no_answer: int = 0
    timeouts: int = 0
    generation_seconds: float = 0.0
    kl_sum: float = 0.0  # sum over completion tokens of log beta - log pi
    kl_tokens: int = 0  # tokens the KL was measured on (0: not measured)

    def __post_init__(self) -> None:
        for k in reported_ks(self.samples_per_problem):
            self.pass_at_k.setdefault(k, 0.0)

    def _fields(self) -> list[str]:
        return ["problems", "samples", "majority_correct", "completion_tokens", "truncated", "no_answer", "timeouts",
                "generation_seconds", "kl_sum", "kl_tokens"]

    def as_list(self) -> list[float]:
        """Values in a fixed order, for an element-wise all-reduce."""
        ks = reported_ks(self.samples_per_problem)
        return [float(getattr(self, name)) for name in self._fields()] + [self.pass_at_k[k] for k in ks]

    @classmethod
    def from_list(cls, samples_per_problem: int, values: Sequence[float]) -> EvalSums:
        sums = cls(samples_per_problem)
        names = sums._fields()
        for name, value in zip(names, values):
            setattr(sums, name, value if name in ("generation_seconds", "kl_sum") else round(value))
        sums.pass_at_k = dict(zip(reported_ks(samples_per_problem), values[len(names):]))
        return sums

    def __add__(self, other: EvalSums) -> EvalSums:
        if other.samples_per_problem != self.samples_per_problem:
            raise ValueError(f"cannot add sums over {self.samples_per_problem} and {other.samples_per_problem} "
                             "samples per problem")
        return EvalSums.from_list(self.samples_per_problem, [a + b for a, b in zip(self.as_list(), other.as_list())])

    def metrics(self) -> dict[str, float]:
        problems, samples = max(self.problems, 1), max(self.samples, 1)
        out = {f"pass@{k}": total / problems for k, total in self.pass_at_k.items()}
        out.update({
            f"maj@{self.samples_per_problem}": self.majority_correct / problems,
            "mean_completion_tokens": self.completion_tokens / samples,
            "truncated_rate": self.truncated / samples,
            "no_answer_rate": self.no_answer / samples,
            "reward_timeouts": float(self.timeouts),
            "tokens_per_s": self.completion_tokens / self.generation_seconds if self.generation_seconds else 0.0,
            "problems": float(self.problems),
            "samples": float(self.samples),
        })
        if self.kl_tokens:
            out["kl_behavior_target"] = self.kl_sum / self.kl_tokens
        return out
