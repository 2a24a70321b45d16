"""Problem sources loaded through `datasets`: built-in benchmark layouts and user JSON/parquet files.

`path` may be a local JSONL/JSON/parquet/CSV file, a directory holding `<split>.jsonl` (or .json/.parquet),
or a Hugging Face hub dataset id (optionally `id:config`, e.g. `openai/gsm8k:main`) where there is network.
Every row is validated: a missing or empty field raises ValueError naming the file and the 1-based row.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets

from ..errors import ConfigError
from .problem import MathProblem

AnswerFormat = Literal["plain", "gsm8k", "number", "strip_unit"]
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class SourceLayout:
    """Where a source keeps its fields. Several question fields are joined into one question text."""

    question_fields: tuple[str, ...]
    answer_field: str
    answer_format: AnswerFormat
    solution_field: str | None = None


BUILTIN_SOURCES: dict[str, SourceLayout] = {
    "gsm8k": SourceLayout(("question",), "answer", "gsm8k"),
    "math500": SourceLayout(("problem",), "answer", "plain", solution_field="solution"),
    "svamp": SourceLayout(("Body", "Question"), "Answer", "number"),
    "aime24": SourceLayout(("problem",), "answer", "number", solution_field="solution"),
    "amc23": SourceLayout(("problem",), "answer", "number"),
    "asdiv": SourceLayout(("body", "question"), "answer", "strip_unit"),
    "mawps": SourceLayout(("input",), "target", "number"),
}


def _join_question(parts: list[str]) -> str:
    """SVAMP/ASDiv split a problem into body and question; a body without final punctuation gets a full stop
    ("... on each pack" + "How much ..."), one ending in a comma is continued ("... bucket," + "how many ...")."""
    text = ""
    for part in (p.strip() for p in parts):
        if text and text[-1].isalnum():
            text += "."
        text = f"{text} {part}" if text else part
    return text


def _canonical_number(value: Any) -> str:
    """27.0 -> "27", 1.84 -> "1.84", "025" -> "25"; other strings unchanged (stripped)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    return str(int(text)) if re.fullmatch(r"[+-]?\d+", text) else text


def _gsm8k_parts(text: str) -> tuple[str, str] | None:
    """GSM8K's "rationale\\n#### 1,080" -> (rationale without calculator annotations, "1080")."""
    if "####" not in text:
        return None
    rationale, answer = text.rsplit("####", 1)
    return _GSM8K_CALCULATOR.sub("", rationale).strip(), answer.strip().replace(",", "")


def _reference_answer(value: Any, answer_format: AnswerFormat) -> str:
    if answer_format == "gsm8k":
        parts = _gsm8k_parts(str(value))
        return parts[1] if parts else ""
    if answer_format == "number":
        return _canonical_number(value)
    text = str(value).strip()
    if answer_format == "strip_unit":  # ASDiv: "9 (apples)" -> "9"
        match = re.fullmatch(r"(.+?)\s*\([^()]*\)", text)
        return match.group(1) if match else text
    return text


def _resolve_path(source: str, path: str | None, split: str) -> tuple[str, str, dict[str, Any]]:
    """(display name, load_dataset builder or hub id, extra load_dataset kwargs)."""
    if path is None:
        raise ConfigError(f"data source {source!r} needs a path: a JSONL/JSON/parquet/CSV file, a directory "
                         f"holding {split}.jsonl, or a hub dataset id")
    local = Path(path).expanduser()
    if local.is_dir():
        candidates = [local / f"{split}{suffix}" for suffix in _FILE_BUILDERS]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            present = sorted(p.name for p in local.iterdir())
            raise ConfigError(f"{local}: no {split}.jsonl/.json/.parquet/.csv for split {split!r} (found {present})")
        local = found
    if local.suffix in _FILE_BUILDERS or path.startswith(("/", "./", "../", "~")):
        if not local.is_file():
            raise ConfigError(f"data file {str(local)!r} does not exist")
        if local.suffix not in _FILE_BUILDERS:
            raise ConfigError(f"data file {str(local)!r}: unsupported type (expected {', '.join(_FILE_BUILDERS)})")
        return str(local), _FILE_BUILDERS[local.suffix], {"data_files": {split: str(local)}}
    if Path(path).parts and Path(Path(path).parts[0]).expanduser().is_dir():
        # "data/svmap" next to a local "data/": a mistyped path, not a hub dataset to look for online.
        raise ConfigError(f"data path {path!r} does not exist (and {Path(path).parts[0]!r} is a local directory, so "
                          "it is not read as a hub dataset id)")
    hub_id, _, config = path.partition(":")
    _check_hub_reachable(path, hub_id)
    return path, hub_id, {"name": config} if config else {}


def _hub_cached(hub_id: str) -> bool:
    """Whether `datasets` or the hub cache holds a copy of dataset `hub_id` (usable without the network)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / f"datasets--{hub_id.replace('/', '--')}").is_dir() or \
        any(Path(datasets.config.HF_DATASETS_CACHE).glob(f"{hub_id.replace('/', '___')}*"))


def _check_hub_reachable(path: str, hub_id: str) -> None:
    """Refuse, at once, a dataset id that can only come from the hub when the hub is off or unreachable and no copy
    is cached: `datasets` would otherwise retry the network for half a minute before a ConnectionError."""
    if _hub_cached(hub_id):
        return
    if datasets.config.HF_HUB_OFFLINE:
        raise ConfigError(f"data path {path!r} is neither a local file or directory nor a cached hub dataset, and "
                          "HF_HUB_OFFLINE is set; check the path")
    import socket
    from urllib.parse import urlparse

    from huggingface_hub.constants import ENDPOINT

    host = urlparse(ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise ConfigError(f"data path {path!r} is neither a local file or directory nor a cached hub dataset, and "
                          f"the hub ({host}) cannot be reached; check the path") from None


def _first_bad_json_line(path: str) -> int | None:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    return number
    return None


def _load(display: str, builder: str, kwargs: dict[str, Any], split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(builder, split=split, **kwargs)
    except StopIteration as error:  # what the JSON builder raises for a file without rows
        raise ConfigError(f"{display}: the dataset is empty") from error
    except ConnectionError as error:  # the hub: a missing or private dataset id, or the network
        raise ConfigError(f"could not load {display}: {error}") from error
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as error:
        where = display
        if display.endswith(".jsonl"):
            bad_line = _first_bad_json_line(display)
            where = f"{display}, line {bad_line} (not valid JSON)" if bad_line else display
        raise ConfigError(f"could not load {where}: {error}") from error


def load_problems(source: str, path: str | None = None, split: str = "train", question_field: str | None = None,
                  answer_field: str | None = None, answer_format: Literal["plain", "gsm8k"] = "plain",
                  limit: int | None = None) -> list[MathProblem]:
    """Load problems from a built-in source (`gsm8k`, `math500`, `svamp`, `aime24`, `amc23`, `asdiv`, `mawps`)
    or from `"json"` (any JSON/JSONL/parquet/CSV file or hub dataset with `question_field`/`answer_field`,
    default "question"/"answer", and a "solution" column used when present).

    Built-in sources know their field layout and answer format (GSM8K's "#### x" with thousands separators
    removed; SVAMP/AMC/MAWPS floats such as 5.0 -> "5"; AIME's "025" -> "25"; ASDiv's "9 (apples)" -> "9");
    `question_field`/`answer_field` override it when given, and `answer_format` then applies to the overridden
    answer field. `limit` keeps the first N rows. Raises ValueError for an unknown source, an empty dataset,
    a missing column, or a row whose question or answer is missing or empty (naming the file and row).
    """
    if source == "synthetic":
        raise ConfigError("data source 'synthetic' is generated by the synthetic task, not loaded from a file")
    if source != "json" and source not in BUILTIN_SOURCES:
        raise ConfigError(f"unknown data source {source!r}; expected one of {sorted(BUILTIN_SOURCES)} or 'json'")
    if answer_format not in ("plain", "gsm8k"):
        raise ConfigError(f"answer_format must be 'plain' or 'gsm8k', got {answer_format!r}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    layout = BUILTIN_SOURCES.get(source) or SourceLayout(("question",), "answer", answer_format, "solution")
    if question_field is not None:
        layout = SourceLayout((question_field,), layout.answer_field, layout.answer_format, layout.solution_field)
    if answer_field is not None:
        layout = SourceLayout(layout.question_fields, answer_field, answer_format, layout.solution_field)

    display, builder, kwargs = _resolve_path(source, path, split)
    dataset = _load(display, builder, kwargs, split)
    if len(dataset) == 0:
        raise ConfigError(f"{display}: the dataset is empty")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    for field_name in (*layout.question_fields, layout.answer_field):
        if field_name not in dataset.column_names:
            raise ConfigError(f"{display}: no field {field_name!r} for data source {source!r} "
                             f"(fields: {dataset.column_names})")
    question_columns = [dataset[name] for name in layout.question_fields]
    answers = dataset[layout.answer_field]
    has_solutions = layout.solution_field in dataset.column_names
    solutions = dataset[layout.solution_field] if has_solutions else [None] * len(dataset)
    name = source if source != "json" else display

    problems = []
    for row, (answer_value, solution) in enumerate(zip(answers, solutions)):
        question_parts = [column[row] for column in question_columns]
        for field_name, value in zip((*layout.question_fields, layout.answer_field), (*question_parts, answer_value)):
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ConfigError(f"{display}, row {row + 1}: field {field_name!r} is missing or empty")
        answer = _reference_answer(answer_value, layout.answer_format)
        if not answer:
            expected = " (expected '#### <answer>')" if layout.answer_format == "gsm8k" else ""
            raise ConfigError(f"{display}, row {row + 1}: no answer in field {layout.answer_field!r}{expected}")
        if layout.answer_format == "gsm8k" and solution is None:
            # GSM8K's worked solution is its answer field; end it the way the prompt asks for answers.
            rationale = _gsm8k_parts(str(answer_value))[0]
            solution = f"{rationale}\nThe final answer is $\\boxed{{{answer}}}$."
        problems.append(MathProblem(question=_join_question([str(p) for p in question_parts]), answer=answer,
                                    source=name, solution=str(solution) if solution is not None else None))
    return problems
