"""The static and the reference decode engine through the real entry points give the same results.

- `deepspeed --num_gpus 2 --module nested_reft_ds.train` at ZeRO-3 (gloo on CPU), one launch per engine with
  gather-once and one streamed launch asking for the static engine (which then decodes with the reference one): the
  rollout-derived records of metrics.jsonl agree (counts and rewards exactly, importance-ratio statistics and the
  loss to float summation order), and so does the held-out greedy accuracy.
- `nested-reft eval` with `--engine static` and `--engine reference`: the same metrics, and the same samples.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNS = {"once-static": ("once", "static"), "once-reference": ("once", "reference"),
        "streamed-static": ("streamed", "static")}
SETTINGS = ["train.zero_stage=3", "train.steps=3", "rollout.max_new_tokens=16", "train.save_every=0",
            "train.cpu_threads=1", "logging.eval_every=2", "data.eval_problems=4"]
# Rollout-derived metrics that must be equal exactly: token counts, rewards, what the verifier saw.
EXACT = ("completion_length", "longest_completion_max", "longest_completion_min", "decode_alive_row_steps",
         "prefill_rows", "reward_mean", "reward_std", "reward_no_answer", "reward_well_formed", "sample_accuracy",
         "train_tokens_needed", "skip_ratio")


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
    records = {}
    for name, (gather, engine) in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        overrides = [arg for item in SETTINGS + [f"rollout.gather={gather}", f"rollout.engine={engine}",
                                                 f"train.output_dir={out}"] for arg in ("--set", item)]
        with socket.socket() as sock:  # a free port for the launcher
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module",
                   "nested_reft_ds.train", "--config", "configs/tiny_zero3_2rank.yaml", *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        records[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records


@pytest.mark.distributed
@pytest.mark.parametrize("other", ["once-static", "streamed-static"])
def test_zero3_training_rollouts_agree_between_engines(train_runs, other):
    reference = [r for r in train_runs["once-reference"] if r["phase"] == "rl"]
    records = [r for r in train_runs[other] if r["phase"] == "rl"]
    assert [r["step"] for r in records] == [r["step"] for r in reference] == [0, 1, 2]
    assert sum(r["completion_length"] for r in records) > 0
    for got, expected in zip(records, reference):
        for key in EXACT:
            assert got[key] == expected[key], (other, got["step"], key)
        ratio_keys = [key for key in expected if key.startswith(("ratio_", "kl", "ess"))] + ["loss"]
        assert len(ratio_keys) > 10
        for key in ratio_keys:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (other, got["step"], key)
    evals = {name: [r["heldout_accuracy"] for r in runs if r["phase"] == "eval"] for name, runs in train_runs.items()}
    assert len(evals[other]) >= 2 and evals[other] == evals["once-reference"]


def test_nested_reft_eval_gives_the_same_results_with_either_engine(tiny_models, tmp_path):
    from nested_reft_ds.recipes import evaluate

    reports = {}
    for engine in ("static", "reference"):
        out = tmp_path / engine
        out.mkdir()
        arguments = ["--model", str(tiny_models["qwen3"]), "--benchmarks", "synthetic", "--limit", "6", "--samples",
                     "3", "--temperature", "1.0", "--max-new-tokens", "12", "--batch-size", "6", "--skip-ratios",
                     "0,0.5", "--engine", engine, "--output", str(out / "eval.json"), "--samples-jsonl",
                     str(out / "samples.jsonl")]
        assert evaluate.main(arguments) == 0
        reports[engine] = json.loads((out / "eval.json").read_text()), (out / "samples.jsonl").read_text()
    (static, static_samples), (reference, reference_samples) = reports["static"], reports["reference"]
    assert static_samples == reference_samples and len(static_samples.splitlines()) == 2 * 6 * 3
    assert list(static["benchmarks"]) == list(reference["benchmarks"]) == ["synthetic skip=0", "synthetic skip=0.5"]
    for row, expected in reference["benchmarks"].items():
        metrics, reference_metrics = static["benchmarks"][row]["metrics"], expected["metrics"]
        assert metrics.keys() == reference_metrics.keys()
        for key in reference_metrics.keys() - {"tokens_per_s", "kl_behavior_target"}:
            assert metrics[key] == reference_metrics[key], (row, key)
        if "kl_behavior_target" in reference_metrics:
            assert metrics["kl_behavior_target"] == pytest.approx(reference_metrics["kl_behavior_target"], abs=1e-5)
