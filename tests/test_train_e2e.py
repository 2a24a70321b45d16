"""The README's main job, end to end: `nested-reft train --config configs/tiny_arith.yaml` (single process,
DeepSpeed engine with world size 1) warms up, runs Nested-ReFT with a usable behaviour model that raises the
mean reward, writes every artefact, and resumes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def train(*args):
    return subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", "train", "--config",
                           str(REPO / "configs" / "tiny_arith.yaml"), "--set", "logging.progress_bar=false", *args],
                          capture_output=True, text=True, timeout=1800, cwd=REPO)


def records(out: Path, phase: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == phase]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_arith")
    proc = train("--set", f"train.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_default_recipe_trains_a_usable_nested_behaviour_model(default_run):
    out, proc = default_run
    rl, evals = records(out, "rl"), records(out, "eval")
    quarter = len(rl) // 4
    reward_first = sum(r["reward_mean"] for r in rl[:quarter]) / quarter
    reward_last = sum(r["reward_mean"] for r in rl[-quarter:]) / quarter
    print(f"mean reward, first quarter of RL steps {reward_first:.3f} -> last quarter {reward_last:.3f}; "
          f"held-out greedy accuracy {evals[0]['heldout_accuracy']:.3f} -> {evals[-1]['heldout_accuracy']:.3f}")
    output = proc.stdout + proc.stderr
    assert "summary: heldout_accuracy_before" in output and "reward_second_half" in output
    # The warm-up teaches the task (a random init scores 0) and LayerDrop makes the nested model a usable
    # behaviour policy: without it, skipping 2 of 6 layers gave KL(behaviour||target) ~1.0 and reward ~0.08.
    assert evals[0]["heldout_accuracy"] > 0.6 and reward_first > 0.4
    assert sum(r["kl_behavior_k3"] for r in rl) / len(rl) < 0.1
    assert sum(r["ess"] for r in rl) / len(rl) > 0.9
    sft = records(out, "sft")
    assert {r["sft_skipped"] for r in sft[1::2]} == {2} and {r["sft_skipped"] for r in sft[0::2]} == {0}
    # RL raises the mean reward: the warm-up imitates the demonstrator's off-by-one mistake (30% of its
    # solutions), and the verifier's reward is what teaches the policy to drop it. Measured: +0.056 from the
    # first to the last quarter (per-step batch noise ~0.05, so a quarter's mean is good to ~0.01).
    assert reward_last > reward_first + 0.03
    assert evals[-1]["heldout_accuracy"] >= evals[0]["heldout_accuracy"]


def test_default_recipe_writes_logs_checkpoints_and_metrics(default_run):
    out, proc = default_run
    rl = records(out, "rl")
    assert [r["step"] for r in rl] == list(range(len(rl)))
    for key in ("reward_mean", "sample_accuracy", "loss", "ratio_tok_mean", "ratio_tok_max", "ess", "kl_behavior_k3",
                "accept", "grad_norm", "rollout_tokens_per_s", "train_tokens_per_s", "time_rollout_s",
                "time_reward_s", "time_train_s", "skipped_layers"):
        assert key in rl[0], key
    assert all(len(r["skipped_layers"]) == 2 for r in rl), "25% of 6 layers, rounded"
    assert all(r["grad_norm"] > 0 for r in rl if r["pg_loss"] != 0), "ZeRO-0 fp32 steps report their gradient norm"
    assert records(out, "sft") and len(records(out, "eval")) >= 2
    assert list((out / "tensorboard").glob("*/events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").read_text() == f"rl_step{len(rl)}"
    assert "[rl 0]" in proc.stdout + proc.stderr, "one line per step"
    step_line = next(line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("[rl 0]"))
    assert all(field in step_line for field in ("reward", "ratio", "ess", "kl(b|t)", "tok/s")), step_line


def test_rerun_resumes_without_repeating_warmup(default_run):
    out, _ = default_run
    done = len(records(out, "rl"))
    proc = train("--set", f"train.output_dir={out}", "--set", f"train.steps={done + 2}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rl = records(out, "rl")
    assert [r["step"] for r in rl[done:]] == [done, done + 1]
    assert "resume at sft" in proc.stdout + proc.stderr
    assert not any("[sft" in line for line in (proc.stdout + proc.stderr).splitlines())
