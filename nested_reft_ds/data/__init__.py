"""Problem sources -> MathProblem lists (no tokenizer, no ranks)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .problem import MathProblem
from .synthetic import synthetic_problems
from .templates import format_prompt

if TYPE_CHECKING:  # config imports data (template names, step labels): the annotation only
    from ..config import DataConfig

__all__ = ["MathProblem", "format_prompt", "problems_from_config", "synthetic_problems"]


def problems_from_config(cfg: DataConfig, seed: int) -> tuple[list[MathProblem], list[MathProblem]]:
    """(train, held-out eval) problems for an experiment.

    Synthetic: two generator streams (train from `seed`, eval from `seed + 1`), so eval problems are fresh
    draws. Files / dataset ids: the first `eval_problems` rows are held out for evaluation, the rest train.
    """
    if cfg.source == "synthetic":
        knobs = dict(min_operand=cfg.min_operand, max_operand=cfg.max_operand, min_steps=cfg.min_steps,
                     max_steps=cfg.max_steps, step_continue_probability=cfg.step_continue_probability,
                     step_labels=cfg.step_labels, restate_steps=cfg.restate_steps)
        # Held-out problems are scored against true answers only, so the demonstrator's errors go to training.
        train = synthetic_problems(cfg.num_problems, seed, solution_error_rate=cfg.solution_error_rate, **knobs)
        held_out = synthetic_problems(cfg.eval_problems, seed + 1, **knobs) if cfg.eval_problems else []
        return train, held_out
    from .sources import load_problems  # `datasets` is imported only when a file source is used

    problems = load_problems(cfg.source, cfg.path, split=cfg.split, question_field=cfg.question_field,
                             answer_field=cfg.answer_field, answer_format=cfg.answer_format)
    if len(problems) <= cfg.eval_problems:
        raise ConfigError(f"data.path={cfg.path!r} has {len(problems)} problems, not more than "
                         f"data.eval_problems={cfg.eval_problems}; nothing would be left to train on")
    return problems[cfg.eval_problems:cfg.eval_problems + cfg.num_problems], problems[:cfg.eval_problems]
