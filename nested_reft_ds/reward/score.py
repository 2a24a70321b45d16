"""Answer equivalence and batched reward scoring.

Each comparison first tries the in-process fast path (plain numbers, choice letters, words); only what it
cannot decide goes to a sympy worker process, with a hard time limit. Identical (prediction, reference)
pairs within one call are compared once: a GRPO group often repeats the same answer many times.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

from .extract import extract_answer, has_boxed_answer
from .normalize import choice_letter, fast_equal, strip_answer
from .pool import Outcome, VerifierPool, default_pool

DEFAULT_TIMEOUT = 5.0
DEFAULT_REL_TOL = 1e-4
# Answers beyond these limits are rejected before parsing: no real final answer is this long or deep, and
# parsers recurse on nesting.
MAX_ANSWER_CHARS = 1000
MAX_NESTING = 30

# Multiple-choice options: {"A": "12", "B": "15"} or ["12", "15"] (lettered A, B, ... in order).
Choices = Union[Mapping[str, str], Sequence[str]]


def _choice_map(choices: Choices) -> dict[str, str]:
    if isinstance(choices, Mapping):
        return {str(letter).strip().strip("()").upper(): str(content) for letter, content in choices.items()}
    if isinstance(choices, str):
        raise ValueError(f"choices must be a mapping or a sequence of option texts, got the string {choices!r}")
    return {chr(ord("A") + i): str(content) for i, content in enumerate(choices)}


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")}]":
            depth -= 1
    return deepest


def too_large_to_verify(answer: str) -> bool:
    """Whether the verifier rejects `answer` unread (too long or too deeply nested): as a reference, nothing can
    match it."""
    return len(answer) > MAX_ANSWER_CHARS or _nesting_depth(answer) > MAX_NESTING


def _compare(pairs: Sequence[tuple[str, str]], *, timeout: float, rel_tol: float,
             choices: Sequence[Choices | None] | None, pool: VerifierPool | None) -> tuple[list[Outcome], int]:
    """Outcomes for (prediction, reference) pairs, and how many distinct pairs needed a worker."""
    if rel_tol < 0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")
    outcomes: list[Outcome | None] = [None] * len(pairs)
    for_workers: dict[tuple[str, str], list[int]] = {}
    for i, (pred, ref) in enumerate(pairs):
        if too_large_to_verify(pred) or too_large_to_verify(ref):
            outcomes[i] = Outcome.REJECTED
            continue
        options = _choice_map(choices[i]) if choices is not None and choices[i] else {}
        pred_letter, ref_letter = choice_letter(pred), choice_letter(ref)
        if pred_letter in options and ref_letter in options:
            outcomes[i] = Outcome.EQUAL if pred_letter == ref_letter else Outcome.NOT_EQUAL
            continue
        pred = options.get(pred_letter, pred)  # a letter answer is compared through its option's content
        ref = options.get(ref_letter, ref)
        decided = fast_equal(pred, ref, rel_tol)
        if decided is not None:
            outcomes[i] = Outcome.EQUAL if decided else Outcome.NOT_EQUAL
        else:
            for_workers.setdefault((strip_answer(pred), strip_answer(ref)), []).append(i)
    if for_workers:
        worker_outcomes = (pool or default_pool()).compare(list(for_workers), timeout=timeout, rel_tol=rel_tol)
        for indices, outcome in zip(for_workers.values(), worker_outcomes):
            for i in indices:
                outcomes[i] = outcome
    return outcomes, len(for_workers)  # type: ignore[return-value]  # every slot is filled


def compare_answers(pairs: Sequence[tuple[str, str]], *, timeout: float = DEFAULT_TIMEOUT,
                    rel_tol: float = DEFAULT_REL_TOL, choices: Sequence[Choices | None] | None = None,
                    pool: VerifierPool | None = None) -> list[Outcome]:
    """`Outcome` of each (prediction, reference) pair, compared in parallel; `choices[i]` are the options
    of pair i's problem (or None). Each comparison is bounded by `timeout` seconds."""
    return _compare(pairs, timeout=timeout, rel_tol=rel_tol, choices=choices, pool=pool)[0]


def math_equal(pred: str | None, ref: str, timeout: float = DEFAULT_TIMEOUT, *, rel_tol: float = DEFAULT_REL_TOL,
               choices: Choices | None = None, pool: VerifierPool | None = None) -> bool:
    """Whether the answer `pred` is mathematically equivalent to the reference answer `ref`.

    Numbers compare exactly when both are written exactly (integers, fractions) and within relative tolerance
    `rel_tol` when either is a decimal. With `choices`, a choice letter matches its option's content.
    False when `pred` is None, on timeout (`timeout` seconds, enforced by killing the worker), when either
    side cannot be parsed, and for inputs over the size limits. The timeout bounds the comparison itself; the
    first call that needs sympy in a process also waits for a worker to start (about half a second).
    """
    if pred is None:
        return False
    outcome = compare_answers([(pred, ref)], timeout=timeout, rel_tol=rel_tol,
                              choices=None if choices is None else [choices], pool=pool)[0]
    return outcome is Outcome.EQUAL


@dataclass(frozen=True)
class BatchScores:
    """Rewards for one batch, with what the step log needs to see how they were obtained."""

    scores: list[float]
    correct: list[bool]
    answers: list[str | None]  # extracted answers; None where the completion states none
    well_formed: list[bool]  # has a complete, non-empty \boxed{}
    outcomes: list[Outcome | None]  # None where no answer was extracted
    worker_comparisons: int  # distinct pairs the fast path could not decide
    seconds: float

    def count(self, outcome: Outcome) -> int:
        return sum(o is outcome for o in self.outcomes)

    @property
    def sample_accuracy(self) -> float:
        """Fraction of the scored completions whose answer is correct."""
        return sum(self.correct) / max(len(self.correct), 1)

    @property
    def num_no_answer(self) -> int:
        return sum(a is None for a in self.answers)

    def log_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        n = max(len(self.scores), 1)
        return {
            f"{prefix}mean": sum(self.scores) / n,
            f"{prefix}well_formed": sum(self.well_formed) / n,
            f"{prefix}no_answer": float(self.num_no_answer),
            f"{prefix}timeouts": float(self.count(Outcome.TIMEOUT)),
            f"{prefix}parse_failures": float(self.count(Outcome.PARSE_FAILURE)),
            f"{prefix}errors": float(self.count(Outcome.ERROR)),
            f"{prefix}rejected": float(self.count(Outcome.REJECTED)),
            f"{prefix}worker_comparisons": float(self.worker_comparisons),
            f"{prefix}seconds": self.seconds,
        }


def score_batch_with_stats(completions: Sequence[str], references: Sequence[str], *,
                           timeout: float = DEFAULT_TIMEOUT, rel_tol: float = DEFAULT_REL_TOL,
                           format_weight: float = 0.0, last_number: bool = True,
                           choices: Sequence[Choices | None] | None = None,
                           pool: VerifierPool | None = None) -> BatchScores:
    """Score each completion against its reference: 1.0 when its extracted final answer is equivalent,
    else 0.0, plus `format_weight` when it has a well-formed `\\boxed{}` answer (right or wrong).

    `last_number` enables extraction's last-number fallback; `choices[i]` are the options of completion i's
    problem (or None). One call runs all undecided comparisons in parallel on `pool` (default: the
    process-wide pool), each bounded by `timeout` seconds.
    """
    if len(completions) != len(references):
        raise ValueError(f"got {len(completions)} completions but {len(references)} references")
    if choices is not None and len(choices) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(choices)} choices entries")
    if format_weight < 0:
        raise ValueError(f"format_weight must be >= 0, got {format_weight}")
    for i, reference in enumerate(references):
        if reference is None or not str(reference).strip():
            raise ValueError(f"reference {i} is empty")
    start = time.perf_counter()
    answers = [extract_answer(text, last_number=last_number,
                              choice_letters="".join(_choice_map(choices[i])) if choices and choices[i] else None)
               for i, text in enumerate(completions)]
    answered = [i for i, answer in enumerate(answers) if answer is not None]
    outcomes: list[Outcome | None] = [None] * len(completions)
    compared, worker_comparisons = _compare(
        [(answers[i], str(references[i])) for i in answered], timeout=timeout, rel_tol=rel_tol,
        choices=None if choices is None else [choices[i] for i in answered], pool=pool)
    for i, outcome in zip(answered, compared):
        outcomes[i] = outcome
    correct = [outcome is Outcome.EQUAL for outcome in outcomes]
    well_formed = [has_boxed_answer(text) for text in completions]
    scores = [float(c) + format_weight * float(f) for c, f in zip(correct, well_formed)]
    return BatchScores(scores=scores, correct=correct, answers=answers, well_formed=well_formed, outcomes=outcomes,
                       worker_comparisons=worker_comparisons, seconds=time.perf_counter() - start)


def score_batch(completions: Sequence[str], references: Sequence[str], **options) -> list[float]:
    """One reward per completion; see `score_batch_with_stats` for the options and the statistics."""
    return score_batch_with_stats(completions, references, **options).scores
