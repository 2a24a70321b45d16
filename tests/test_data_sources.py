"""Problem sources through `datasets`: built-in layouts on the shipped files, field mappings, row errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nested_reft_ds.data.problem import MathProblem
from nested_reft_ds.data.sources import BUILTIN_SOURCES, load_problems

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")

# source -> (rows in test.jsonl, first problem's answer, start of its question)
SHIPPED = {
    "gsm8k": (1319, "18", "Janet’s ducks lay 16 eggs per day."),
    "math500": (500, "\\left( 3, \\frac{\\pi}{2} \\right)", "Convert the point $(0,3)$"),
    "svamp": (1000, "51", "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack. "
                          "How much do you have to pay"),
    "aime24": (30, "204", "Every morning Aya goes for a $9$-kilometer-long walk"),
    "amc23": (40, "27", "Cities $A$ and $B$ are $45$ miles apart."),
    "asdiv": (2215, "9", "Seven red apples and two green apples are in the basket. How many apples"),
    "mawps": (2065, "43", "Joan found 70 seashells on the beach."),
}


@needs_data
@pytest.mark.parametrize("source", list(SHIPPED))
def test_builtin_source_loads_its_shipped_file(source):
    rows, first_answer, question_start = SHIPPED[source]
    problems = load_problems(source, str(DATA_DIR / source), split="test")
    assert len(problems) == rows
    assert all(isinstance(p, MathProblem) and p.question and p.answer for p in problems)
    assert problems[0].answer == first_answer
    assert problems[0].question.startswith(question_start)
    assert {p.source for p in problems} == {source}


@needs_data
def test_answer_normalisation_of_builtin_sources():
    gsm8k = load_problems("gsm8k", str(DATA_DIR / "gsm8k" / "test.jsonl"), split="test")
    assert "2125" in {p.answer for p in gsm8k}  # "#### 2,125" loses its thousands separator
    assert all("," not in p.answer for p in gsm8k)
    mawps = load_problems("mawps", str(DATA_DIR / "mawps"), split="test")
    assert "11.5" in {p.answer for p in mawps} and all(not p.answer.endswith(".0") for p in mawps)
    aime = load_problems("aime24", str(DATA_DIR / "aime24"), split="test")
    assert all(not p.answer.startswith("0") for p in aime)
    asdiv = load_problems("asdiv", str(DATA_DIR / "asdiv"), split="test")
    assert all("(" not in p.answer for p in asdiv[:50])
    assert "Mrs. Hilt" in {p.answer for p in asdiv}  # word answers are kept
    # A body ending in a comma continues into the question without a full stop.
    assert any(", how many" in p.question for p in asdiv)


@needs_data
def test_solutions_are_filled_where_the_source_has_them():
    gsm8k = load_problems("gsm8k", str(DATA_DIR / "gsm8k"), split="train", limit=3)
    assert gsm8k[0].solution.endswith("The final answer is $\\boxed{72}$.")
    assert "<<" not in gsm8k[0].solution and "####" not in gsm8k[0].solution
    math500 = load_problems("math500", str(DATA_DIR / "math500"), split="test", limit=2)
    assert "\\boxed" in math500[0].solution
    assert load_problems("svamp", str(DATA_DIR / "svamp"), split="test", limit=1)[0].solution is None


@needs_data
def test_limit_keeps_the_first_rows():
    problems = load_problems("gsm8k", str(DATA_DIR / "gsm8k"), split="train", limit=5)
    assert len(problems) == 5
    assert problems[0].question.startswith("Natalia sold clips")


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_json_source_with_field_mapping(tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", [
        {"q": "What is 2+2?", "a": "4", "solution": "2+2=4"},
        {"q": "What is 3*3?", "a": 9},
    ])
    problems = load_problems("json", path, question_field="q", answer_field="a")
    assert problems == [MathProblem("What is 2+2?", "4", path, "2+2=4"), MathProblem("What is 3*3?", "9", path, None)]


def test_json_source_with_gsm8k_answer_format(tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", [{"question": "q", "answer": "1,000 + 80 = <<1000+80=1080>>1080\n#### 1,080"}])
    (problem,) = load_problems("json", path, answer_format="gsm8k")
    assert problem.answer == "1080"
    assert problem.solution == "1,000 + 80 = 1080\nThe final answer is $\\boxed{1080}$."


def test_parquet_and_directory_paths(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"question": "q1", "answer": "1"}]).to_parquet(str(tmp_path / "test.parquet"))
    (problem,) = load_problems("json", str(tmp_path), split="test")
    assert problem.answer == "1" and problem.source.endswith("test.parquet")


def test_builtin_layout_can_be_overridden(tmp_path):
    path = _write_jsonl(tmp_path / "test.jsonl", [{"text": "Body.", "Question": "Q?", "Answer": 5.0}])
    (problem,) = load_problems("svamp", path, split="test", question_field="text")
    assert problem.question == "Body." and problem.answer == "5"


@pytest.mark.parametrize("rows,message", [
    ([{"question": "a", "answer": "1"}, {"question": "b"}], r"mine.jsonl, row 2: field 'answer' is missing or empty"),
    ([{"question": "a", "answer": "1"}, {"question": " ", "answer": "2"}], r"row 2: field 'question' is missing"),
    ([{"question": "a", "answer": ""}], r"row 1: field 'answer' is missing or empty"),
    ([{"prompt": "a", "answer": "1"}], r"no field 'question' for data source 'json' \(fields: \['prompt', 'answer'\]\)"),
])
def test_malformed_rows_name_the_file_and_row(tmp_path, rows, message):
    path = _write_jsonl(tmp_path / "mine.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        load_problems("json", path)


def test_gsm8k_row_without_marker_is_malformed(tmp_path):
    path = _write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "#### 3"}, {"question": "q", "answer": "3"}])
    with pytest.raises(ValueError, match=r"row 2: no answer in field 'answer' \(expected '#### <answer>'\)"):
        load_problems("gsm8k", path, split="test")


def test_invalid_json_line_is_reported(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl, line 2 \(not valid JSON\)"):
        load_problems("json", str(path))


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_problems("json", str(path))


def test_path_and_source_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a path"):
        load_problems("gsm8k")
    with pytest.raises(ValueError, match="does not exist"):
        load_problems("json", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"no test.jsonl"):
        load_problems("gsm8k", str(tmp_path), split="test")
    with pytest.raises(ValueError, match="unknown data source 'gsm9k'"):
        load_problems("gsm9k", "x.jsonl")
    with pytest.raises(ValueError, match="generated"):
        load_problems("synthetic")
    with pytest.raises(ValueError, match="limit"):
        load_problems("json", "x.jsonl", limit=0)


def test_every_config_source_except_synthetic_is_builtin():
    import typing

    from nested_reft_ds.config import DataConfig

    hints = typing.get_type_hints(DataConfig)
    config_sources = set(typing.get_args(hints["source"]))
    assert config_sources - {"synthetic", "json"} == set(BUILTIN_SOURCES)
