"""Synthetic arithmetic word problems: the embedded default task (seeded, difficulty knobs, worked solutions).

A problem is a short story of 1..k steps over a running count ("Ann has 7 pens. Ann gets 5 more. ..."),
answered by a number. Each problem carries a worked solution in the format the reward expects
("7+5=12. \\boxed{12}"), which the SFT warm-up teaches before RL.
"""
from __future__ import annotations

import random
import string

from ..errors import ConfigError
from .problem import MathProblem

NAMES = ("Ann", "Ben", "Cat", "Dan", "Eve", "Tom", "Sam", "Lia")
ITEMS = ("apples", "pens", "cards", "coins", "books", "shells")
STEP_LABELS = string.ascii_lowercase


def synthetic_problems(count: int, seed: int, *, min_operand: int = 1, max_operand: int = 20,
                       min_steps: int = 1, max_steps: int = 2, step_continue_probability: float | None = None,
                       solution_error_rate: float = 0.0, step_labels: bool = False,
                       restate_steps: bool = False) -> list[MathProblem]:
    """`count` problems drawn from a generator seeded by `seed` (same seed, same problems, on any machine).

    Difficulty: operands in [min_operand, max_operand], between min_steps and max_steps additions or
    subtractions; a subtraction never takes the count below zero. The number of steps is uniform in that range,
    or, with `step_continue_probability` q, min_steps plus a geometric count (each further step with probability q)
    capped at max_steps: long-tailed chains, most short and a few long, the length profile of math solutions.
    `solution_error_rate`: the fraction of worked
    solutions whose last step is off by one ("7+5=13. \\boxed{13}"), an imperfect demonstrator for the SFT
    warm-up; `answer` is always the true one. The problems themselves do not depend on it.
    `step_labels`: each step's sentence and its line of the worked solution carry the same letter ("(b) Ann gets 5
    more." / "(b) 7+5=12."), so finding the next step's operand is a lookup by label instead of counting sentences,
    which a small model trained from scratch does not learn on long chains (docs/results/compare_long.md).
    `restate_steps`: the worked solution opens with the question's first sentence and each of its lines repeats its
    step's sentence before the arithmetic ("Ann has 7 pens. (b) Ann gets 5 more: 7+5=12."), so every number a line
    needs is either copied verbatim from the question or a few tokens back in the solution itself. Questions,
    answers and the demonstrator's mistakes are the same as without.
    """
    if count < 1 or not 0 <= min_operand <= max_operand or not 1 <= min_steps <= max_steps:
        raise ConfigError(f"invalid synthetic task: count={count}, operands=[{min_operand}, {max_operand}], "
                         f"steps=[{min_steps}, {max_steps}]")
    if step_continue_probability is not None and not 0.0 <= step_continue_probability < 1.0:
        raise ConfigError(f"invalid synthetic task: step_continue_probability={step_continue_probability} "
                         "(expected [0, 1))")
    if step_labels and max_steps > len(STEP_LABELS):
        raise ConfigError(f"invalid synthetic task: step_labels needs max_steps <= {len(STEP_LABELS)}, got {max_steps}")
    if not 0.0 <= solution_error_rate <= 1.0:
        raise ConfigError(f"invalid synthetic task: solution_error_rate={solution_error_rate} (expected [0, 1])")
    rng = random.Random(f"nested-reft-synthetic:{seed}")
    mistakes = random.Random(f"nested-reft-synthetic-mistakes:{seed}")  # separate stream: same problems
    problems = []
    for _ in range(count):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        total = rng.randint(min_operand, max_operand)
        sentences = [f"{name} has {total} {item}."]
        work = [sentences[0]] if restate_steps else []
        for index in range(_num_steps(rng, min_steps, max_steps, step_continue_probability)):
            label = f"({STEP_LABELS[index]}) " if step_labels else ""
            amount = rng.randint(min_operand, max_operand)
            if rng.random() < 0.5 or amount > total:
                step, arithmetic = f"{name} gets {amount} more", f"{total}+{amount}={total + amount}."
                total += amount
            else:
                step, arithmetic = f"{name} gives away {amount}", f"{total}-{amount}={total - amount}."
                total -= amount
            sentences.append(f"{label}{step}.")
            work.append(f"{label}{step}: {arithmetic}" if restate_steps else f"{label}{arithmetic}")
        sentences.append(f"How many {item} does {name} have?")
        shown = total
        if mistakes.random() < solution_error_rate:
            shown = total + 1
            work[-1] = work[-1][:work[-1].index("=") + 1] + f"{shown}."
        problems.append(MathProblem(question=" ".join(sentences), answer=str(total), source="synthetic",
                                    solution=" ".join(work) + f" \\boxed{{{shown}}}"))
    return problems


def _num_steps(rng: random.Random, min_steps: int, max_steps: int, continue_probability: float | None) -> int:
    if continue_probability is None:
        return rng.randint(min_steps, max_steps)
    steps = min_steps
    while steps < max_steps and rng.random() < continue_probability:
        steps += 1
    return steps
