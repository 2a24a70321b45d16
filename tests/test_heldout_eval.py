"""One held-out evaluation path: the accuracy a training run logs and what `nested-reft eval --greedy` reports for
the run's exported model on the same problems come from the same code (`evaluate_problems`) and agree exactly."""
import json
import subprocess
import sys
from pathlib import Path

from nested_reft_ds.config import load_config
from nested_reft_ds.data import problems_from_config

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["model.hidden_size=32", "model.num_layers=4", "model.num_heads=2", "model.num_kv_heads=1",
            "model.intermediate_size=64", "data.num_problems=64", "data.eval_problems=24", "data.min_operand=0",
            "data.max_operand=2", "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=20",
            "train.micro_batch_size=8", "train.sft_steps=40", "train.sft_lr=0.01", "train.steps=0",
            "train.cpu_threads=1", "logging.tensorboard=false", "logging.progress_bar=false"]


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_training_heldout_accuracy_equals_nested_reft_eval_on_the_exported_model(tmp_path):
    run = tmp_path / "run"
    cli("train", *[a for item in SETTINGS + [f"train.output_dir={run}"] for a in ("--set", item)])
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (heldout,) = [r for r in logged if r["phase"] == "eval"]
    cli("export", "--checkpoint-dir", str(run / "checkpoints"), "--output", str(tmp_path / "hf"))

    cfg = load_config(None, SETTINGS)
    _, problems = problems_from_config(cfg.data, cfg.train.seed)
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in problems))
    report = tmp_path / "eval.json"
    cli("eval", "--model", str(tmp_path / "hf"), "--benchmarks", f"heldout={data}", "--greedy",
        "--max-new-tokens", "20", "--temperature", "1.0", "--batch-size", "64", "--prompt-template", "auto",
        "--seed", str(cfg.train.seed), "--device", "cpu", "--dtype", "float32", "--output", str(report))
    reported = json.loads(report.read_text())
    metrics = reported["benchmarks"]["heldout"]["metrics"]
    # the warm-up left a model that solves some problems and not others: the comparison has something to compare
    assert 0 < metrics["pass@1"] < 1
    assert heldout["heldout_accuracy"] == metrics["pass@1"]
    assert heldout["heldout_completion_length"] == metrics["mean_completion_tokens"]
    assert heldout["heldout_truncated"] == metrics["truncated_rate"]
    assert heldout["heldout_no_answer"] == metrics["no_answer_rate"]
