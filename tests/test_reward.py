"""Rewards: extraction, equivalence (hand-written cases and real benchmark rows), batching and statistics."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nested_reft_ds.reward import (
    BatchScores,
    Outcome,
    VerifierPool,
    compare_answers,
    extract_answer,
    has_boxed_answer,
    last_boxed,
    math_equal,
    score_batch,
    score_batch_with_stats,
)
from nested_reft_ds.reward.normalize import parse_number

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")


def _rows(name: str) -> list[dict]:
    with open(DATA_DIR / name / "test.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# (prediction, reference, expected)
EQUIVALENCE_CASES = [
    # integers, signs, thousands separators, leading zeros
    ("18", "18", True), ("18", "19", False), ("-7", "-7", True), ("-7", "7", False), ("+5", "5", True),
    ("1,080", "1080", True), ("1,450,000", "1450000", True), ("1,234", "1243", False), ("025", "25", True),
    ("1{,}000", "1000", True), ("1\\,000", "1000", True), ("32,\\!348", "32348", True), ("100", "1000", False),
    ("0", "0", True), ("0", "0.0", True), ("1000000", "10^6", True),
    # decimals and relative tolerance
    ("2.5", "2.5", True), ("2.50", "2.5", True), ("2", "2.5", False), ("2.5", "2", False), (".5", "0.5", True),
    ("0.1", "0.10000", True), ("3.14159", "3.14159", True), ("0.3333", "\\frac{1}{3}", True),
    ("0.33", "\\frac{1}{3}", False), ("2.0001", "2", True), ("2.01", "2", False), ("123456", "123457", False),
    ("1.84", "1.84", True), ("11.5", "11.50", True), ("-0.5", "0.5", False),
    # scientific notation
    ("1.5e3", "1500", True), ("1.5E3", "1500", True), ("1.5 \\times 10^{3}", "1500", True),
    ("1.5\\times10^3", "1500", True), ("1.5\\times10^{-3}", "0.0015", True), ("2.5 \\cdot 10^{2}", "250", True),
    ("1.5e3", "150", False), ("6.02 \\times 10^{23}", "6.02 \\times 10^{23}", True), ("10^{-3}", "0.001", True),
    # percentages
    ("25%", "25", True), ("25\\%", "25", True), ("25\\%", "0.25", True), ("25 percent", "25", True),
    ("12.5\\%", "12.5", True), ("25%", "26", False), ("0.25", "25", False), ("50%", "\\frac{1}{2}", True),
    # currency and units
    ("\\$18", "18", True), ("$18.00", "18", True), ("\\$1,234.50", "1234.5", True), ("18 dollars", "18", True),
    ("5 apples", "5", True), ("9 (apples)", "9", True), ("5\\text{ cm}", "5", True), ("5 \\mbox{ inches}", "5", True),
    ("12 square feet", "12", True), ("\\text{18 dollars}", "18", True), ("-\\$5", "-5", True), ("€20", "20", True),
    ("18 dollars", "17", False), ("5 apples", "6", False), ("3 pi", "3", False),
    # fractions and mixed numbers
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac{1}{2}", "1/2", True), ("\\tfrac12", "0.5", True), ("1/2", "2", False),
    ("\\frac{1}{2}", "2", False), ("2/4", "1/2", True), ("\\frac{-1}{2}", "-\\frac{1}{2}", True),
    ("-\\frac{1}{2}", "\\frac{1}{2}", False), ("3\\frac{1}{2}", "3.5", True), ("3 1/2", "7/2", True),
    ("3\\frac{1}{2}", "\\frac{7}{2}", True), ("3\\frac{1}{2}", "3", False), ("\\frac{14}{3}", "14/3", True),
    ("\\frac{5}{4}", "1.25", True), ("0.125", "\\frac18", True), ("\\frac{3}{4}", "\\frac{4}{3}", False),
    ("\\frac{1}{0}", "1", False),
    # radicals and pi
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True), ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True), ("3\\sqrt{13}", "\\sqrt{117}", True), ("\\sqrt{2}", "\\sqrt{3}", False),
    ("8\\sqrt{2}", "11.3137", True), ("\\sqrt{8}", "2.8", False), ("2\\pi", "6.283185", True),
    ("\\pi", "3.14159", True), ("3.14", "\\pi", False), ("\\frac{\\pi}{2}", "\\frac{\\pi}{3}", False),
    ("\\pi r^2", "r^2\\pi", True), ("\\sqrt[3]{8}", "2", True), ("4\\pi", "4", False),
    # symbolic expressions
    ("x^2+2x+1", "(x+1)^2", True), ("x^2+1", "(x+1)^2", False), ("2x+3", "3+2x", True), ("2x+3", "2x-3", False),
    ("\\frac{x}{2}", "0.5x", True), ("a(b+c)", "ab+ac", True), ("\\sin^2 x + \\cos^2 x", "1", True),
    ("2^{10}", "1024", True), ("\\log_2 8", "3", True), ("\\binom{5}{2}", "10", True), ("5!", "120", True),
    ("6-5i", "6 - 5i", True), ("6-5i", "6+5i", False), ("\\infty", "\\infty", True), ("-\\infty", "\\infty", False),
    ("e^{x}", "e^{x}", True),
    # equations
    ("x = 3", "3", True), ("3", "x = 3", True), ("x=3", "x = 3", True), ("x = 4", "3", False),
    ("y = 2x + 3", "2x+3", True), ("2x+3", "y=2x+3", True), ("x=3", "y=3", False), ("k = 5", "5", True),
    ("a=2, b=3", "a=2,b=3", True), ("a=3, b=2", "a=2,b=3", False), ("x \\le 5", "x \\leq 5", True),
    ("x<5", "x>5", False),
    # intervals and tuples are ordered; sets and solution lists are not
    ("(1,2)", "(2,1)", False), ("(1,2)", "(1, 2)", True), ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("(\\frac{\\pi}{2}, 3)", "\\left( 3, \\frac{\\pi}{2} \\right)", False), ("[1,2)", "[1,2)", True),
    ("[1,2)", "(1,2]", False), ("(-\\infty, 3)", "(-\\infty,3)", True), ("(-\\infty, 3]", "(-\\infty,3)", False),
    ("[-2,7]", "x \\in [-2,7]", True), ("\\{1,2\\}", "\\{2,1\\}", True), ("\\{1,2\\}", "\\{1,2,3\\}", False),
    ("1,2", "2,1", True), ("1, 2, 3", "1,2", False), ("(1,2,3)", "(1,2,3)", True), ("(1,2,3)", "(1,3,2)", False),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("\\begin{pmatrix}1\\\\3\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    # text, degrees, words
    ("\\text{Monday}", "Monday", True), ("\\text{Monday}", "\\text{Tuesday}", False), ("Yes", "yes", True),
    ("Yes", "No", False), ("Mrs. Hilt", "mrs hilt", True), ("Sara", "Sarah", False), ("\\text{even}", "\\text{odd}", False),
    ("90^\\circ", "90", True), ("90^{\\circ}", "90", True), ("30°", "30", True), ("45^\\circ", "90", False),
    ("\\frac{\\pi}{2}", "90^\\circ", False), ("\\boxed{18}", "18", True), ("$18$", "18", True), ("\\(18\\)", "18", True),
    ("18.", "18", True), ("\\left(1,2\\right)", "(1,2)", True),
    # choice letters without options: letters compare as letters
    ("C", "\\text{(C)}", True), ("(B)", "B", True), ("\\textbf{(B)}", "B", True), ("\\text{(A)}", "\\text{(B)}", False),
    ("B", "C", False),
    # infinity spelled out, as references often write it
    ("-\\infty", "-Infinity", True), ("\\infty", "infinity", True), ("(-\\infty, 2]", "(-Infinity, 2]", True),
    ("\\infty", "∞", True), ("\\infty", "-Infinity", False), ("5", "Infinity", False),
]


def test_equivalence_case_count():
    assert len(EQUIVALENCE_CASES) >= 150
    assert sum(not expected for _, _, expected in EQUIVALENCE_CASES) >= 50


@pytest.mark.parametrize("pred,ref,expected", EQUIVALENCE_CASES, ids=[f"{p}|{r}" for p, r, _ in EQUIVALENCE_CASES])
def test_math_equal(pred, ref, expected):
    assert math_equal(pred, ref) is expected


def test_batched_comparison_matches_single_calls():
    outcomes = compare_answers([(p, r) for p, r, _ in EQUIVALENCE_CASES])
    assert [o is Outcome.EQUAL for o in outcomes] == [expected for _, _, expected in EQUIVALENCE_CASES]


def test_relative_tolerance_is_configurable():
    assert math_equal("2.0001", "2")
    assert not math_equal("2.0001", "2", rel_tol=1e-6)
    assert math_equal("2.01", "2", rel_tol=0.01)
    assert not math_equal("101", "100", rel_tol=0.1)  # integers written exactly compare exactly
    with pytest.raises(ValueError, match="rel_tol"):
        math_equal("1", "1", rel_tol=-1)


CHOICES = {"A": "12", "B": "15", "C": "\\frac{1}{2}", "D": "\\sqrt{2}"}


@pytest.mark.parametrize("pred,ref,expected", [
    ("B", "15", True), ("(B)", "15", True), ("\\textbf{(B) }15", "15", True), ("A", "15", False),
    ("15", "B", True), ("12", "B", False), ("C", "0.5", True), ("D", "\\frac{2}{\\sqrt{2}}", True),
    ("B", "B", True), ("B", "(B)", True), ("A", "B", False), ("E", "15", False),
])
def test_choice_letters_compare_through_their_option(pred, ref, expected):
    assert math_equal(pred, ref, choices=CHOICES) is expected


def test_choices_as_a_list_are_lettered_in_order():
    assert math_equal("B", "15", choices=["12", "15"])
    assert not math_equal("A", "15", choices=["12", "15"])
    with pytest.raises(ValueError, match="mapping or a sequence"):
        math_equal("A", "15", choices="AB")


EXTRACTION_CASES = [
    ("So the answer is $\\boxed{18}$.", "18"),
    ("First \\boxed{3}, then correcting: \\boxed{4}", "4"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("nested \\boxed{\\frac{\\sqrt{3}}{\\sqrt{\\{2\\}}}} done", "\\frac{\\sqrt{3}}{\\sqrt{\\{2\\}}}"),
    ("\\fbox{7}", "7"),
    ("The answer is \\boxed 5.", "5"),
    ("\\boxed{\\boxed{12}}", "12"),
    ("\\boxed{\\text{(C)}}", "C"),
    ("\\boxed{9} and later \\boxed{10", "9"),  # the truncated last box is skipped
    ("\\boxed{}", None),
    ("Janet sells 9 eggs.\n#### 18", "18"),
    ("She makes $<<9*2=18>>18.\n#### 1,080\n", "1,080"),
    ("Therefore, the answer is 42.", "42"),
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
    ("**Answer:** 3.5", "3.5"),
    ("Final Answer: x = 7\nThanks", "x = 7"),
    ("the answer is (B).", "B"),
    ("Answer: B", "B"),
    ("We get 3 apples and 4 pears, so 7 fruits.", "7"),
    ("The price is 1,234.50 dollars in total", "1,234.50"),
    ("half of it: \\frac{1}{2}", "\\frac{1}{2}"),
    ("It takes 3 1/2 hours", "3 1/2"),
    ("no numbers here", None),
    ("", None),
    ("-5 is the temperature", "-5"),
    ("value 3.5.", "3.5"),
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_number_fallback_is_optional():
    assert extract_answer("so 7 fruits", last_number=False) is None
    assert extract_answer("\\boxed{7}", last_number=False) == "7"


def test_choice_letters_are_found_when_the_problem_has_options():
    text = "Comparing the options, (A) is too small and (C) fits.\n"
    assert extract_answer(text, choice_letters="ABCDE", last_number=False) == "C"
    assert extract_answer("Let me think.\n**D**", choice_letters="ABCD") == "D"
    assert extract_answer(text, last_number=False) is None


def test_extraction_is_linear_on_huge_and_adversarial_completions():
    import time

    adversarial = ["\\boxed{" * 20_000, "1," * 50_000, "(" * 100_000, "answer is " * 10_000, "\\boxed{1}" + "x" * 100_000]
    start = time.perf_counter()
    results = [extract_answer(text) for text in adversarial]
    assert time.perf_counter() - start < 2.0
    assert results[4] == "1"


def test_last_boxed_and_format_check():
    assert last_boxed("a \\boxed{1} b \\boxed{x^{2}} c") == "x^{2}"
    assert has_boxed_answer("\\boxed{5}")
    assert not has_boxed_answer("the answer is 5")
    assert not has_boxed_answer("\\boxed{5")


def test_score_batch_scores_and_statistics():
    completions = [
        "3 + 4 = 7, so \\boxed{7}",  # right, well formed
        "The answer is 7.",  # right, no box
        "\\boxed{8}",  # wrong, well formed
        "I don't know",  # no answer
        "\\boxed{\\frac{14}{2}}",  # right through sympy-free fraction path
        "\\boxed{\\sqrt{49}}",  # right through the sympy worker
    ]
    result = score_batch_with_stats(completions, ["7"] * 6, format_weight=0.1)
    assert isinstance(result, BatchScores)
    assert result.correct == [True, True, False, False, True, True]
    assert result.scores == pytest.approx([1.1, 1.0, 0.1, 0.0, 1.1, 1.1])
    assert result.answers[3] is None and result.num_no_answer == 1
    assert result.worker_comparisons == 1
    metrics = result.log_metrics()
    assert result.sample_accuracy == pytest.approx(4 / 6) and "reward/mean" in metrics
    assert metrics["reward/no_answer"] == 1.0
    assert metrics["reward/timeouts"] == 0.0
    assert score_batch(completions, ["7"] * 6) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_score_batch_counts_parse_failures_and_rejections():
    result = score_batch_with_stats(["\\boxed{\\frac{}{}}", "\\boxed{" + "1+" * 600 + "1}", "\\boxed{3}"],
                                    ["\\sqrt{2}", "1", "3"])
    assert result.outcomes == [Outcome.PARSE_FAILURE, Outcome.REJECTED, Outcome.EQUAL]
    assert result.log_metrics()["reward/parse_failures"] == 1.0
    assert result.log_metrics()["reward/rejected"] == 1.0


def test_score_batch_with_choices_and_input_validation():
    result = score_batch_with_stats(["The answer is (B).", "\\boxed{15}"], ["15", "B"],
                                    choices=[CHOICES, CHOICES])
    assert result.correct == [True, True]
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        score_batch(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="reference 0 is empty"):
        score_batch(["a"], [" "])
    with pytest.raises(ValueError, match="format_weight"):
        score_batch(["a"], ["1"], format_weight=-1.0)


def test_grade_school_answers_never_need_a_worker():
    # The RL hot path: integer answers in GRPO groups are decided in-process.
    completions = [f"... so she has \\boxed{{{n % 97:,}}} left. #### {n}" for n in range(2000)]
    references = [str(n % 97) for n in range(2000)]
    result = score_batch_with_stats(completions, references)
    assert result.worker_comparisons == 0
    assert all(result.correct)


@needs_data
def test_every_gsm8k_test_reference_parses_to_a_number():
    references = [row["answer"].rsplit("####", 1)[1].strip() for row in _rows("gsm8k")]
    assert len(references) == 1319
    assert [r for r in references if parse_number(r) is None] == []


@needs_data
def test_math500_solutions_box_their_reference_answer():
    rows = _rows("math500")
    extracted = [extract_answer(row["solution"]) for row in rows]
    outcomes = compare_answers([(e or "", row["answer"]) for e, row in zip(extracted, rows)])
    misses = [(e, row["answer"]) for e, row, o in zip(extracted, rows, outcomes) if o is not Outcome.EQUAL]
    print(f"MATH-500 misses ({len(misses)}):", misses)
    assert len(misses) <= len(rows) // 100


@needs_data
def test_math500_answers_are_not_equal_to_other_problems_answers():
    # Guards against a lenient verifier: distinct reference answers must not match.
    answers = [row["answer"] for row in _rows("math500")][:200]
    shifted = answers[7:] + answers[:7]
    outcomes = compare_answers(list(zip(answers, shifted)))
    false_matches = [(a, b) for a, b, o in zip(answers, shifted, outcomes) if o is Outcome.EQUAL]
    assert len(false_matches) <= 2, false_matches


@needs_data
def test_real_benchmark_rows_in_alternative_forms():
    svamp, asdiv, amc, aime = _rows("svamp"), _rows("asdiv"), _rows("amc23"), _rows("aime24")
    cases = [
        (f"{svamp[0]['Answer']:.1f}", "51", True),  # SVAMP float 51.0
        (f"\\${int(svamp[0]['Answer'])}", "51", True),
        (asdiv[0]["answer"], "9", True),  # "9 (apples)"
        (f"{int(amc[0]['answer'])} miles", "27", True),
        (aime[0]["answer"], "204", True),
        ("205", aime[0]["answer"], False),
        (asdiv[0]["answer"], "10", False),
    ]
    assert [math_equal(p, r) for p, r, _ in cases] == [e for _, _, e in cases]


def test_a_killed_worker_counts_as_an_error_and_is_replaced():
    import os
    import signal
    import threading

    with VerifierPool(1) as pool:
        pool.start()
        victim = pool._workers[0].process.pid
        threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()
        assert pool.compare([("10!!!!!!", "1")], timeout=5.0, rel_tol=1e-4) == [Outcome.ERROR]
        assert pool.compare([("\\sqrt{4}", "2")], timeout=5.0, rel_tol=1e-4) == [Outcome.EQUAL]
        assert pool._workers[0].process.pid != victim
