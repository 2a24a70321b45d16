"""`nested-reft eval` data-parallel on 2 ranks (deepspeed launcher, gloo on CPU) gives the same totals, records
and per-sample lines as one process: one launch over a slice of GSM8K, the synthetic task and a benchmark whose
references are rigged from the single-process samples (so pass@k and maj@k are not all zero), sampled at
temperature 0.6 with two skip ratios (the nested row also reduces its behaviour-target KL)."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
TIMING_KEYS = {"tokens_per_s"}  # wall-clock based: differs between runs


def _arguments(model: Path, rigged: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--benchmarks", f"gsm8k,synthetic,rigged={rigged}", "--data-dir", str(DATA_DIR),
            "--limit", "5", "--samples", "2", "--temperature", "0.6", "--max-new-tokens", "8", "--batch-size", "2",
            "--skip-ratios", "0,0.5", "--output", str(out / "eval.json"), "--samples-jsonl", str(out / "samples.jsonl")]


def _rigged_benchmark(model_dir: Path, path: Path) -> None:
    """Synthetic problems whose reference is, for every other problem, an answer the model actually samples."""
    from nested_reft_ds.data import synthetic_problems
    from nested_reft_ds.config import GenerationSettings
    from nested_reft_ds.recipes.evaluate import EvalSettings, evaluate_problems
    from nested_reft_ds.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_dir)
    problems = synthetic_problems(5, seed=0)
    settings = EvalSettings(samples=2, batch_size=2, generation=GenerationSettings(temperature=0.6, max_new_tokens=8))
    _, records = evaluate_problems(model, tokenizer, problems, settings)
    rows = []
    for record in records:
        sampled = [s["answer"] for s in record["samples"] if s["answer"] is not None]
        answer = sampled[0] if sampled and record["index"] % 2 == 0 else record["reference"]
        rows.append({"question": record["question"], "answer": answer})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR}")
    from nested_reft_ds.recipes import evaluate

    root = tmp_path_factory.mktemp("eval_dp")
    model, rigged = tiny_models["qwen2"], root / "rigged.jsonl"
    _rigged_benchmark(model, rigged)
    single, double = root / "single", root / "double"
    single.mkdir()
    double.mkdir()
    assert evaluate.main(_arguments(model, rigged, single)) == 0  # `python -m nested_reft_ds.evaluate`
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "nested_reft_ds.cli",
               "eval", *_arguments(model, rigged, double)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    began = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    print(f"2-rank eval launch: {time.monotonic() - began:.1f} s")
    if proc.returncode != 0:
        pytest.fail(f"2-rank eval failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return single, double, proc.stdout


def _report(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def test_two_ranks_give_the_single_process_totals(runs):
    single, double, _ = runs
    one, two = _report(single), _report(double)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert list(two["benchmarks"]) == list(one["benchmarks"]) == [
        f"{name} skip={ratio}" for name in ("gsm8k", "synthetic", "rigged") for ratio in ("0", "0.5")]
    for row, expected in one["benchmarks"].items():
        got = two["benchmarks"][row]
        assert got["skipped_layers"] == expected["skipped_layers"]
        metrics, reference = got["metrics"], expected["metrics"]
        assert metrics.keys() == reference.keys()
        for key in reference.keys() - TIMING_KEYS - {"kl_behavior_target"}:
            assert metrics[key] == reference[key], (row, key)  # counts and pass/maj sums: exactly equal
        if "kl_behavior_target" in reference:
            assert metrics["kl_behavior_target"] == pytest.approx(reference["kl_behavior_target"], rel=1e-9)
        assert metrics["problems"] == 5 and metrics["samples"] == 10
    rigged = one["benchmarks"]["rigged skip=0"]["metrics"]
    assert rigged["pass@1"] > 0 and rigged["maj@2"] > 0, "the rigged benchmark must exercise correct answers"


def test_rank_zero_gathers_every_record_and_sample_line_in_order(runs):
    single, double, _ = runs
    one, two = _report(single), _report(double)
    for row, expected in one["benchmarks"].items():
        assert two["benchmarks"][row]["problems"] == expected["problems"], row
        assert [r["index"] for r in expected["problems"]] == list(range(5))
    assert (double / "samples.jsonl").read_text() == (single / "samples.jsonl").read_text()
    assert len((double / "samples.jsonl").read_text().splitlines()) == 6 * 5 * 2
    assert sorted(path.name for path in double.iterdir()) == ["eval.json", "eval.md", "samples.jsonl"]  # parts gone


def test_rank_zero_alone_prints_and_writes_the_table(runs):
    single, double, stdout = runs
    table = (double / "eval.md").read_text()
    assert table.count("| rigged skip=0.5 | 5 |") == 1 and "kl_behavior_target" in table
    assert stdout.count("| benchmark | problems |") == 1  # one rank prints
    strip = lambda text: [line.rsplit("|", 3)[0] for line in text.splitlines()]  # drop the timing columns
    assert strip(table) == strip((single / "eval.md").read_text())
