"""The one record every data source produces."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MathProblem:
    """A math problem with a verifiable final answer.

    `question` is the raw problem text (no template applied); `answer` is the reference final answer as a
    string (e.g. "42", "\\frac{1}{2}"); `source` names where it came from ("synthetic", "gsm8k", a file path).
    `solution` is an optional worked solution used for SFT warm-up (None when the source has none).
    """

    question: str
    answer: str
    source: str
    solution: str | None = None
