"""Evaluation: pass@k against brute force, maj@k on hand-built cases, sums over shards, and the CLI end to end."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from nested_reft_ds import evaluate
from nested_reft_ds.data import MathProblem, synthetic_problems
from nested_reft_ds.evaluate import (
    EvalSums,
    GenerationSettings,
    cluster_answers,
    evaluate_problems,
    maj_at_k,
    majority_vote,
    pass_at_k,
    reported_ks,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c of them correct) that contain a correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_brute_force_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_hand_computed_values_and_errors():
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(200, 0, 100) == 0.0
    with pytest.raises(ValueError, match="num_correct"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(4, 1, 5)


def test_reported_ks():
    assert reported_ks(1) == [1]
    assert reported_ks(8) == [1, 2, 4, 8]
    assert reported_ks(10) == [1, 2, 4, 8, 10]


def test_cluster_answers_uses_math_equal():
    assert cluster_answers(["6", "5", "6.0", "\\frac{12}{2}", "x", "5"]) == [0, 1, 0, 0, 2, 1]


@pytest.mark.parametrize("answers,correct,k,expected_answer,expected_correct", [
    # majority correct
    (["5", "5", "6"], [True, True, False], None, "5", True),
    # wrong answers written differently still form one cluster and win (6, 6.0, 12/2 vs 5, 5)
    (["6", "5", "6.0", "\\frac{12}{2}", "5"], [False, True, False, False, True], None, "6", False),
    # correct answers written differently are one cluster (they all equal the reference)
    (["\\frac12", "0.5", "3", "50\\%"], [True, True, False, True], None, "\\frac12", True),
    # a tie goes to the cluster voted first
    (["2", "3", "3", "2.0"], [True, False, False, True], None, "2", True),
    (["3", "2", "2.0", "3"], [False, True, True, False], None, "3", False),
    # samples without an answer do not vote
    ([None, None, "4", None], [False, False, True, False], None, "4", True),
    ([None, None], [False, False], None, None, False),
    # only the first k samples vote
    (["7", "8", "8", "8"], [True, False, False, False], 1, "7", True),
    (["7", "8", "8", "8"], [True, False, False, False], 3, "8", False),
])
def test_majority_vote(answers, correct, k, expected_answer, expected_correct):
    assert majority_vote(answers, correct, k) == (expected_answer, expected_correct)
    assert maj_at_k(answers, correct, k) is expected_correct


def test_eval_sums_add_and_round_trip():
    a = EvalSums(4, problems=2, samples=8, majority_correct=1, completion_tokens=40, generation_seconds=1.5)
    a.pass_at_k[1] += 0.75
    a.pass_at_k[4] += 1.0
    b = EvalSums(4, problems=1, samples=4, completion_tokens=10, no_answer=2, generation_seconds=0.5)
    b.pass_at_k[1] += 0.25
    total = a + b
    assert (total.problems, total.samples, total.completion_tokens, total.no_answer) == (3, 12, 50, 2)
    assert total.pass_at_k == {1: 1.0, 2: 0.0, 4: 1.0}
    assert EvalSums.from_list(4, total.as_list()) == total
    metrics = total.metrics()
    assert metrics["pass@1"] == pytest.approx(1 / 3)
    assert metrics["maj@4"] == pytest.approx(1 / 3)
    assert metrics["tokens_per_s"] == pytest.approx(25.0)
    with pytest.raises(ValueError, match="samples per problem"):
        a + EvalSums(2)


def test_evaluate_problems_aggregates_scored_samples(monkeypatch):
    problems = [MathProblem("q0", "5", "t"), MathProblem("q1", "\\frac{1}{2}", "t"), MathProblem("q2", "7", "t")]
    completions = [
        "\\boxed{5}", "\\boxed{6}", "so 5", "\\boxed{5.0}",  # 3 of 4 correct
        "\\boxed{0.5}", "\\boxed{2}", "\\boxed{2}", "nothing",  # 1 of 4, the wrong "2" is the majority
        "\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}",  # 0 of 4
    ]
    tokens = list(range(1, 13))
    truncated = [False] * 11 + [True]

    def fake_generate(model, tokenizer, prompts, settings, plan, device, measure_kl):
        assert len(prompts) == 12 and prompts[0] == prompts[3] != prompts[4]  # problem-major, 4 samples each
        return evaluate._Generated(completions, tokens, truncated, seconds=2.0)

    class FakeModel:
        config = type("Config", (), {"num_hidden_layers": 2})()

        def parameters(self):
            import torch
            yield torch.zeros(1)

    monkeypatch.setattr(evaluate, "_generate_completions", fake_generate)
    sums, records = evaluate_problems(FakeModel(), None, problems, GenerationSettings(samples=4),
                                      first_index=1, index_stride=2)
    assert [r["num_correct"] for r in records] == [3, 1, 0]
    assert [r["majority_correct"] for r in records] == [True, False, False]
    assert records[1]["majority_answer"] == "2"
    assert [r["index"] for r in records] == [1, 3, 5]
    assert records[1]["samples"][3] == {"completion": "nothing", "answer": None, "correct": False, "outcome": None,
                                        "tokens": 8, "truncated": False}
    metrics = sums.metrics()
    assert metrics["pass@1"] == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    assert metrics["pass@2"] == pytest.approx((1 + 0.5 + 0) / 3)  # 1 - C(1,2)/C(4,2)=1; 1 - C(3,2)/C(4,2)=0.5
    assert metrics["pass@4"] == pytest.approx(2 / 3)
    assert metrics["maj@4"] == pytest.approx(1 / 3)
    assert metrics["mean_completion_tokens"] == pytest.approx(6.5)
    assert metrics["truncated_rate"] == pytest.approx(1 / 12)
    assert metrics["no_answer_rate"] == pytest.approx(1 / 12)
    assert metrics["tokens_per_s"] == pytest.approx(78 / 2.0)


def test_generation_settings_validation():
    with pytest.raises(ValueError, match="greedy decoding gives one sample"):
        GenerationSettings(samples=4, greedy=True)
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings(temperature=0)


def test_shard_sums_add_up_to_the_whole(tiny_models):
    from nested_reft_ds.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_models["qwen2"])
    problems = synthetic_problems(4, seed=3)
    settings = GenerationSettings(samples=1, greedy=True, max_new_tokens=4, batch_size=2)
    whole, whole_records = evaluate_problems(model, tokenizer, problems, settings)
    shards = [evaluate_problems(model, tokenizer, problems[rank::2], settings, first_index=rank, index_stride=2)
              for rank in range(2)]
    total = shards[0][0] + shards[1][0]
    assert total.problems == whole.problems == 4
    for key in ("samples", "completion_tokens", "truncated", "no_answer", "majority_correct"):
        assert getattr(total, key) == getattr(whole, key), key
    assert total.pass_at_k == pytest.approx(whole.pass_at_k)
    merged = sorted(shards[0][1] + shards[1][1], key=lambda record: record["index"])
    assert [r["samples"][0]["completion"] for r in merged] == [r["samples"][0]["completion"] for r in whole_records]


@needs_data
def test_eval_cli_end_to_end(tiny_models, tmp_path, capsys):
    from nested_reft_ds.cli import main

    output, per_sample = tmp_path / "eval.json", tmp_path / "samples.jsonl"
    code = main(["eval", "--model", str(tiny_models["qwen2"]), "--benchmarks", "gsm8k,synthetic",
                 "--data-dir", str(DATA_DIR), "--limit", "3", "--samples", "2", "--temperature", "0.6",
                 "--max-new-tokens", "8", "--batch-size", "4", "--output", str(output),
                 "--samples-jsonl", str(per_sample)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| benchmark | problems | pass@1 | pass@2 | maj@2 |" in table and "| gsm8k | 3 |" in table
    report = json.loads(output.read_text())
    assert list(report["benchmarks"]) == ["gsm8k", "synthetic"]
    gsm8k = report["benchmarks"]["gsm8k"]
    assert gsm8k["problems"][0]["reference"] == "18"
    assert len(gsm8k["problems"]) == 3 and len(gsm8k["problems"][0]["samples"]) == 2
    assert set(gsm8k["metrics"]) >= {"pass@1", "pass@2", "maj@2", "mean_completion_tokens", "tokens_per_s"}
    assert 0 < gsm8k["metrics"]["mean_completion_tokens"] <= 8
    lines = per_sample.read_text().splitlines()
    assert len(lines) == 2 * 3 * 2
    assert set(json.loads(lines[0])) >= {"benchmark", "prompt", "completion", "answer", "correct"}


def test_eval_cli_greedy_and_errors(tiny_models, tmp_path, capsys):
    from nested_reft_ds.cli import main

    model = str(tiny_models["qwen2"])
    assert main(["eval", "--model", model, "--benchmarks", "synthetic", "--limit", "2", "--greedy",
                 "--max-new-tokens", "4", "--output", str(tmp_path / "g.json")]) == 0
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["settings"]["greedy"] and set(report["benchmarks"]["synthetic"]["metrics"]) >= {"pass@1", "maj@1"}
    capsys.readouterr()
    assert main(["eval", "--model", model, "--benchmarks", "gsm8k"]) == 2
    assert "needs --data-dir" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--benchmarks", "gsm9k", "--data-dir", str(tmp_path)]) == 2
    assert "unknown benchmark 'gsm9k'" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--benchmarks", "synthetic", "--greedy", "--samples", "4"]) == 2
    assert "greedy decoding gives one sample" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--benchmarks", "synthetic"]) == 2
    assert "not a Hugging Face checkpoint" in capsys.readouterr().err


def test_kl_of_the_full_model_to_itself_is_zero_and_grows_with_skipping(tiny_models):
    # Checks that the target log-probs are aligned with the sampled tokens: with no layer skipped the
    # behaviour and target distributions are the same model, so every per-token log-ratio is ~0.
    from nested_reft_ds.model import load_model_and_tokenizer
    from nested_reft_ds.nested import SkipPlan

    model, tokenizer = load_model_and_tokenizer(tiny_models["llama"])
    problems = synthetic_problems(2, seed=5)
    settings = GenerationSettings(samples=2, temperature=1.0, max_new_tokens=4, batch_size=4)
    full, _ = evaluate_problems(model, tokenizer, problems, settings, measure_kl=True)
    assert full.kl_tokens == full.completion_tokens > 0
    assert abs(full.kl_sum) / full.kl_tokens < 1e-4
    nested, _ = evaluate_problems(model, tokenizer, problems, settings, plan=SkipPlan(6, (1, 2, 3, 4)),
                                  measure_kl=True)
    assert abs(nested.metrics()["kl_behavior_target"]) > 1e-3
    assert "kl_behavior_target" not in EvalSums(2, problems=1, samples=2, completion_tokens=4).metrics()


def test_eval_cli_skip_ratios(tiny_models, tmp_path, capsys):
    from nested_reft_ds.cli import main

    output = tmp_path / "skip.json"
    assert main(["eval", "--model", str(tiny_models["qwen2"]), "--benchmarks", "synthetic", "--limit", "2",
                 "--samples", "2", "--max-new-tokens", "4", "--skip-ratios", "0,0.5", "--output", str(output)]) == 0
    rows = json.loads(output.read_text())["benchmarks"]
    assert list(rows) == ["synthetic skip=0", "synthetic skip=0.5"]
    assert rows["synthetic skip=0"]["skipped_layers"] == [] and len(rows["synthetic skip=0.5"]["skipped_layers"]) == 3
    assert "kl_behavior_target" not in rows["synthetic skip=0"]["metrics"]
    assert math.isfinite(rows["synthetic skip=0.5"]["metrics"]["kl_behavior_target"])
    assert "| synthetic skip=0.5 |" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_models["qwen2"]), "--benchmarks", "synthetic",
                 "--skip-ratios", "0.9"]) == 2
    assert "skip ratio 0.9" in capsys.readouterr().err
