"""In-process answer normalisation and the fast path of `math_equal`.

Most RL rewards compare plain numbers ("18", "1,080", "$2.50", "25%", "\\frac{3}{4}", "3 1/2"). Those are
decided here with exact `Fraction` arithmetic, without sympy and without a worker round trip. Anything this
module cannot decide for certain (`fast_equal` returns None) goes to the sympy worker.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fractions import Fraction

# Larger exponents are left to the (time-bounded) worker: Fraction(10) ** 10**9 would hang this process.
MAX_EXPONENT = 300
# Longest digit run parsed in-process (Python refuses int(str) beyond 4300 digits).
MAX_DIGITS = 1000

_SPACING = re.compile(r"(?<!\\)\\[,;:!> ]|\\(?:q?quad|displaystyle|textstyle|left|right|big|Big|bigg|Bigg)(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])|\\circ(?![A-Za-z])")
# Infinity spelled out ("-Infinity", "infinity", "∞") is LaTeX's \infty, which the parsers know.
_INFINITY_WORD = re.compile(r"(?<![A-Za-z\\])(?:[Ii]nfinity|INFINITY)(?![A-Za-z])|∞")
_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*"
_CURRENCY = re.compile(r"^(-?)\s*(?:\\\$|\$|€|£|¥|₹|\\euro|\\pounds|USD\b|US\$|Rs\.?)\s*")
_PERCENT = re.compile(r"^(.*?)\s*(?:\\%|%|\s(?:percent|per cent|pct)\.?)$", re.DOTALL)
_ASSIGNMENT = re.compile(r"^([A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?\s*=\s*([^=]+)$")
_UNIT_WORDS = re.compile(r"^(.*?[\d}])\s+([A-Za-z][A-Za-z'’]+)\.?(?:\s+[A-Za-z'’]+\.?)*$")
# Words after a number that are mathematics, not a unit ("3 pi" is not 3).
_NOT_UNITS = frozenset({"pi", "sqrt", "root", "log", "ln", "sin", "cos", "tan", "exp", "mod", "and", "or", "plus",
                        "minus", "times", "over", "divided", "squared", "cubed", "to", "i", "e"})
_PAREN_UNIT = re.compile(r"^(.*?)\s*\((?:[A-Za-z][A-Za-z\s'’^0-9]*)\)$")
_TEXT_UNIT = re.compile(r"^(.*?)\s*" + _TEXT_CMD + r"\{\s*[A-Za-z][^{}]*\}$")

_DEC = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"
_SIGNED_DEC = re.compile(rf"[+-]?(?:{_DEC})")
_SCI = re.compile(rf"([+-]?)({_DEC})(?:[eE]([+-]?\d+)|\s*(?:\\times|\\cdot|\*|×)\s*10\s*\^\s*\{{?\s*([+-]?\d+)\s*\}}?)?")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac\s*(?:\{\s*([+-]?[\d.,]+)\s*\}|(\d))\s*(?:\{\s*([+-]?[\d.,]+)\s*\}|(\d))")
_SLASH = re.compile(rf"([+-]?)({_DEC})\s*/\s*({_DEC})")
_MIXED_LATEX = re.compile(r"([+-]?)(\d+)\s*\\[dt]?frac\s*\{(\d+)\}\s*\{(\d+)\}")
_MIXED_SLASH = re.compile(r"([+-]?)(\d+)\s+(\d+)\s*/\s*(\d+)")
_CHOICE = re.compile(r"^\(?([A-Z])\)?[.:]?$")
_CHOICE_WITH_CONTENT = re.compile(r"^\(([A-Z])\)\s*(.*)$", re.DOTALL)
_WORDS = re.compile(r"^[A-Za-z][A-Za-z .,'’:-]*$")


@dataclass(frozen=True)
class Number:
    """A parsed plain number. `exact` is False when it was written as a decimal or in scientific notation,
    i.e. possibly rounded, so it is compared with the relative tolerance."""

    value: Fraction
    exact: bool
    percent: bool = False


def _unwrap_command(text: str, command_pattern: str) -> str | None:
    """`\\cmd{X}` spanning the whole string -> "X" (balanced braces), else None."""
    if not text.startswith("\\"):
        return None
    match = re.match(command_pattern + r"\{", text)
    if not match:
        return None
    depth = 0
    for i in range(match.end() - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[match.end():i] if i == len(text) - 1 else None
    return None


@functools.lru_cache(maxsize=8192)  # GRPO groups repeat references and answers within a batch
def strip_answer(text: str) -> str:
    """Remove presentation that never changes an answer's value: surrounding math delimiters, a whole-string
    `\\boxed{}`/`\\text{}`, spacing commands, `\\left`/`\\right`, degree signs, `{,}`, a trailing full stop."""
    s = text.strip().replace("\u2212", "-").replace("\u2013", "-")
    while True:
        before = s
        for opening, closing in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) >= len(opening) + len(closing) and s.startswith(opening) and s.endswith(closing):
                s = s[len(opening):len(s) - len(closing)].strip()
        for command in (r"\\boxed\s*", r"\\fbox\s*", _TEXT_CMD):
            inner = _unwrap_command(s, command)
            if inner is not None:
                s = inner.strip()
        s = s.rstrip(".").strip()
        if s == before:
            break
    s = _SPACING.sub("", s)
    s = _DEGREES.sub("", s)
    s = _INFINITY_WORD.sub(r"\\infty", s)
    return s.replace("{,}", ",").strip()


def _fraction(digits: str) -> Fraction | None:
    if len(digits) > MAX_DIGITS or not _SIGNED_DEC.fullmatch(digits):
        return None
    return Fraction(digits.replace(",", ""))


def parse_number(text: str) -> Number | None:
    """Parse a plain number: integer (thousands separators allowed), decimal, scientific notation
    (`1.5e3`, `1.5 \\times 10^{3}`), fraction (`\\frac{a}{b}`, `\\dfrac`, `a/b`), mixed number
    (`3\\frac{1}{2}`, `3 1/2`), with optional currency sign, percent sign, `x =` prefix or trailing unit.
    Returns None for anything else (expressions, tuples, radicals, ...)."""
    s = strip_answer(text)
    percent = False
    match = _PERCENT.match(s)
    if match:
        s, percent = match.group(1).strip(), True
    for _ in range(2):  # "x = \$5 \text{ dollars}": units and prefixes may nest once
        assignment = _ASSIGNMENT.match(s)
        if assignment:
            s = assignment.group(2).strip()
        s = _CURRENCY.sub(r"\1", s)
        for unit in (_TEXT_UNIT, _PAREN_UNIT, _UNIT_WORDS):
            match = unit.match(s)
            if unit is _UNIT_WORDS and match and match.group(2).lower() in _NOT_UNITS:
                continue
            if match and match.group(1).strip():
                s = match.group(1).strip()
        s = strip_answer(s)
    number = _parse_plain_number(s)
    return None if number is None else Number(number.value, number.exact, percent)


def _parse_plain_number(s: str) -> Number | None:
    for pattern in (_MIXED_LATEX, _MIXED_SLASH):
        match = pattern.fullmatch(s)
        if match:
            sign = -1 if match.group(1) == "-" else 1
            whole, num, den = (int(match.group(i)) for i in (2, 3, 4))
            if den == 0 or len(s) > MAX_DIGITS:
                return None
            return Number(sign * (whole + Fraction(num, den)), exact=True)
    if re.search(r"\d\s+\d", s):  # "3 4" is a list, not 34
        return None
    match = _FRAC.fullmatch(s) or _SLASH.fullmatch(s)
    if match:
        sign = -1 if match.group(1) == "-" else 1
        if match.re is _FRAC:
            num_text, den_text = match.group(2) or match.group(3), match.group(4) or match.group(5)
        else:
            num_text, den_text = match.group(2), match.group(3)
        num, den = _fraction(num_text), _fraction(den_text)
        if num is None or den is None or den == 0:
            return None
        return Number(sign * num / den, exact="." not in num_text + den_text)
    match = _SCI.fullmatch(s)
    if match:
        mantissa = _fraction(match.group(2))
        exponent_text = match.group(3) or match.group(4)
        if mantissa is None:
            return None
        exponent = int(exponent_text) if exponent_text else 0
        if abs(exponent) > MAX_EXPONENT:
            return None
        sign = -1 if match.group(1) == "-" else 1
        return Number(sign * mantissa * Fraction(10) ** exponent,
                      exact=exponent_text is None and "." not in match.group(2))
    return None


def numbers_equal(pred: Number, ref: Number, rel_tol: float) -> bool:
    """Exact comparison when both are written exactly; relative tolerance when either is a decimal.
    A percentage matches both its own value and its value / 100 ("25%" == "25" == "0.25")."""
    pred_values = (pred.value, pred.value / 100) if pred.percent else (pred.value,)
    ref_values = (ref.value, ref.value / 100) if ref.percent else (ref.value,)
    for p in pred_values:
        for r in ref_values:
            if p == r:
                return True
            if not (pred.exact and ref.exact) and abs(p - r) <= Fraction(rel_tol) * max(abs(p), abs(r)):
                return True
    return False


def choice_letter(text: str) -> str | None:
    """"B", "(B)", "B)", "\\text{(B)}", "\\textbf{(B) }12" -> "B"; anything else -> None."""
    s = strip_answer(text)
    match = _CHOICE.match(s) or _CHOICE_WITH_CONTENT.match(s)
    if match:
        return match.group(1)
    inner = re.match(_TEXT_CMD + r"\{\s*\(([A-Z])\)\s*\}", s)
    return inner.group(1) if inner else None


def _plain_words(text: str) -> str | None:
    """Answers that are words ("Yes", "Mrs. Hilt", "\\text{Monday}") in comparable form, else None."""
    s = re.sub(_TEXT_CMD + r"\{([^{}]*)\}", r"\1", strip_answer(text)).strip()
    if not _WORDS.match(s) or not re.search(r"[A-Za-z]{3}", s):
        return None
    return re.sub(r"[\s.,'’:-]", "", s.lower())


def fast_equal(pred: str, ref: str, rel_tol: float) -> bool | None:
    """Decide `pred == ref` in-process when both are plain numbers, choice letters or words; None when sympy
    is needed. Never returns a wrong definite answer for inputs it does not fully understand."""
    if len(pred) > MAX_DIGITS or len(ref) > MAX_DIGITS:
        return None
    if strip_answer(pred) == strip_answer(ref):
        return True
    pred_assignment, ref_assignment = _ASSIGNMENT.match(strip_answer(pred)), _ASSIGNMENT.match(strip_answer(ref))
    if pred_assignment and ref_assignment and pred_assignment.group(1) != ref_assignment.group(1):
        return None  # "x = 1" vs "y = 1": the variable matters; let sympy decide
    pred_number, ref_number = parse_number(pred), parse_number(ref)
    if pred_number is not None and ref_number is not None:
        return numbers_equal(pred_number, ref_number, rel_tol)
    pred_letter, ref_letter = _CHOICE.match(strip_answer(pred)), _CHOICE.match(strip_answer(ref))
    if pred_letter and ref_letter:
        return pred_letter.group(1) == ref_letter.group(1)
    pred_words, ref_words = _plain_words(pred), _plain_words(ref)
    if pred_words is not None and ref_words is not None:
        return pred_words == ref_words
    return None
