"""Final-answer extraction from model completions.

Every scan here is linear in the completion length (no backtracking-prone regexes over the whole text), so a
100 kB completion costs milliseconds in the calling process.
"""
from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
MAX_BOX_CANDIDATES = 8
_GSM8K_MARKER = "####"
# "The answer is 5", "Final answer: 5", "**Answer:** 5", "the final answer is $5$. I hope it is correct."
_ANSWER_MARKER = re.compile(r"\banswer\b[*\s]*(?:is\b|:|=)[*:\s]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n|\bI hope\b")
_INLINE_MATH = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)")
_LAST_NUMBER = re.compile(
    r"-?\\[dt]?frac\{-?\d+\}\{\d+\}|-?\d+\s+\d+/\d+(?!\d)"
    r"|-?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?%?")
_MARKDOWN = re.compile(r"^[*_\s]+|[*_\s]+$")


def _balanced_argument(text: str, start: int) -> str | None:
    """The brace-balanced `{...}` argument beginning at `text[start]` (without the braces), or None."""
    if start >= len(text) or text[start] != "{":
        return None
    depth, i = 0, start
    while i < len(text):
        char = text[i]
        if char == "\\":  # "\{", "\}" and "\\\\" are escapes, not braces
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None  # unbalanced: the completion was cut off inside the box


def _box_content(text: str, position: int, command: str) -> str | None:
    """Content of the box command at `text[position]`: `\\boxed{...}` or `\\boxed 5`; None if incomplete."""
    after = position + len(command)
    if after < len(text) and text[after].isalpha():
        return None  # "\\boxedfoo" is a different command
    while after < len(text) and text[after] == " ":
        after += 1
    if after < len(text) and text[after] == "{":
        return _balanced_argument(text, after)
    return re.match(r"[^\s$]*", text[after:]).group(0).rstrip(".,;")  # "\\boxed 5." ends a sentence


def last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty `\\boxed{...}` / `\\fbox{...}` (nested braces allowed;
    `\\boxed 5` without braces too). `\\boxed{\\boxed{5}}` unwraps to "5"."""
    positions = sorted((i, command) for command in _BOX_COMMANDS for i in _find_all(text, command))
    # Each candidate costs a scan to the end of the text; bounding the candidates keeps a completion full of
    # unclosed boxes linear.
    for position, command in reversed(positions[-MAX_BOX_CANDIDATES:]):
        content = _box_content(text, position, command)
        if content is None or not content.strip():
            continue
        content = content.strip()
        for _ in range(MAX_BOX_CANDIDATES):
            inner_command = next((c for c in _BOX_COMMANDS if content.startswith(c)), None)
            inner = _box_content(content, 0, inner_command) if inner_command else None
            if inner is None or not inner.strip() or len(inner) + len(inner_command) + 2 < len(content):
                break  # not a box spanning the whole content
            content = inner.strip()
        return content
    return None


def _find_all(text: str, needle: str) -> list[int]:
    positions, start = [], text.find(needle)
    while start != -1:
        positions.append(start)
        start = text.find(needle, start + 1)
    return positions


def _clean_span(span: str) -> str:
    """Trim a free-text answer span: markdown emphasis, math delimiters, a trailing full stop."""
    span = _MARKDOWN.sub("", span.strip())
    math = _INLINE_MATH.search(span)
    if math:
        span = math.group(1) or math.group(2)
    return _MARKDOWN.sub("", span).rstrip(".").strip()


def _after_answer_marker(text: str) -> str | None:
    last = None
    for last in _ANSWER_MARKER.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end():last.end() + 500]
    end = _SENTENCE_END.search(rest)
    span = _clean_span(rest[:end.start()] if end else rest)
    return span or None


def _choice_from_text(text: str, letters: str) -> str | None:
    """The last "(B)"-style letter, or a final line that is only a letter ("B", "**B**", "B.")."""
    final_line = _MARKDOWN.sub("", text.rstrip().rsplit("\n", 1)[-1])
    match = re.fullmatch(r"\(?([A-Z])\)?\.?", final_line)
    if match and match.group(1) in letters:
        return match.group(1)
    found = None
    for found in re.finditer(r"\(([A-Z])\)", text):
        pass
    return found.group(1) if found and found.group(1) in letters else None


def _normalize_choice(answer: str) -> str:
    """"(B)", "B)", "\\text{(B)}", "\\textbf{(B)}" -> "B"; other answers unchanged."""
    match = re.fullmatch(r"(?:\\text(?:bf)?\{)?\s*\(?([A-Z])\)?\s*\}?[.:]?", answer.strip())
    return match.group(1) if match else answer


def extract_answer(text: str, *, last_number: bool = True, choice_letters: str | None = None) -> str | None:
    """The final answer stated in `text`, or None when it states none.

    In order of preference: the last complete `\\boxed{}`/`\\fbox{}`; GSM8K's `#### x`; "the answer is x" /
    "Answer: x"; with `choice_letters` (e.g. "ABCDE") a multiple-choice letter such as "(C)"; and, when
    `last_number` is true, the last number in the text. A lone choice letter is returned as the bare letter.
    """
    if not text:
        return None
    answer = last_boxed(text)
    if answer is None and _GSM8K_MARKER in text:
        answer = _clean_span(text[text.rfind(_GSM8K_MARKER) + len(_GSM8K_MARKER):].split("\n", 1)[0]) or None
    if answer is None:
        answer = _after_answer_marker(text)
    if answer is None and choice_letters:
        answer = _choice_from_text(text, choice_letters)
    if answer is None and last_number:
        found = None
        for found in _LAST_NUMBER.finditer(text):
            pass
        answer = found.group(0).rstrip(",") if found else None
    return None if answer is None else _normalize_choice(answer)


def has_boxed_answer(text: str) -> bool:
    """Format check for the optional format reward: a complete, non-empty `\\boxed{}` is present."""
    return last_boxed(text) is not None
