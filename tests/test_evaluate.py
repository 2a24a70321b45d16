"""Evaluation: pass@k against brute force, maj@k on hand-built cases, sums over shards, and the CLI end to end."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest

from nested_reft_ds.recipes import evaluate
from nested_reft_ds.data import MathProblem, synthetic_problems
from nested_reft_ds.eval_metrics import EvalSums, cluster_answers, maj_at_k, majority_vote, pass_at_k, reported_ks
from nested_reft_ds.config import ConfigError, GenerationSettings
from nested_reft_ds.recipes.evaluate import EvalSettings, chunk_seed, evaluate_problems, generation_chunks

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


def test_generation_chunks_sort_by_length_and_never_depend_on_the_world_size():
    lengths = [5, 9, 7, 9, 1]
    # longest first, ties by index; batch_size // samples problems per chunk
    assert generation_chunks(lengths, samples=2, batch_size=4) == [[1, 3], [2, 0], [4]]
    assert generation_chunks(lengths, samples=1, batch_size=3) == [[1, 3, 2], [0, 4]]
    assert generation_chunks(lengths, samples=8, batch_size=4) == [[1], [3], [2], [0], [4]]  # at least one
    assert generation_chunks([], samples=2, batch_size=4) == []
    assert chunk_seed(0, 1) == chunk_seed(0, 1) != chunk_seed(0, 2) != chunk_seed(1, 1)
    assert 0 <= chunk_seed(123, 4) < 2**63


_COMPLETIONS = {  # question -> its 4 sampled completions
    "q0": ["\\boxed{5}", "\\boxed{6}", "so 5", "\\boxed{5.0}"],  # 3 of 4 correct
    "q1": ["\\boxed{0.5}", "\\boxed{2}", "\\boxed{2}", "nothing"],  # 1 of 4, the wrong "2" is the majority
    "q2": ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}"],  # 0 of 4
}


class _FakeModel:
    config = type("Config", (), {"num_hidden_layers": 2})()

    def parameters(self):
        import torch
        yield torch.zeros(1)


class _FakeTokenizer:
    def __call__(self, texts, add_special_tokens=False):
        return type("Encoded", (), {"input_ids": [list(text) for text in texts]})()


def _fake_generate(calls):
    def fake(model, tokenizer, prompts, settings, plan, device, measure_kl, seed, decoding=None, group_size=1):
        calls.append((prompts, seed))
        questions = [prompt.split("\n")[0].removeprefix("Question: ") for prompt in prompts]
        assert all(questions[i] == questions[i - i % 4] for i in range(len(questions)))  # problem-major, 4 each
        texts = [_COMPLETIONS[q][i % 4] for i, q in enumerate(questions)]
        tokens = [int(q[1]) * 4 + i % 4 + 1 for i, q in enumerate(questions)]  # 1..12 over the 12 samples
        return evaluate._Generated(texts, tokens, [t == 12 for t in tokens], seconds=len(prompts) / 6)
    return fake


def test_evaluate_problems_aggregates_scored_samples(monkeypatch):
    problems = [MathProblem("q0", "5", "t"), MathProblem("q1", "\\frac{1}{2}", "t"), MathProblem("q2", "7", "t")]
    calls = []
    monkeypatch.setattr(evaluate, "_generate_completions", _fake_generate(calls))
    sums, records = evaluate_problems(_FakeModel(), _FakeTokenizer(), problems, EvalSettings(samples=4))
    assert len(calls) == 1 and len(calls[0][0]) == 12 and calls[0][1] == chunk_seed(0, 0)
    assert [r["num_correct"] for r in records] == [3, 1, 0]
    assert [r["majority_correct"] for r in records] == [True, False, False]
    assert records[1]["majority_answer"] == "2"
    assert [r["index"] for r in records] == [0, 1, 2]
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


def test_evaluate_problems_shards_by_chunk_and_the_shards_add_up(monkeypatch):
    problems = [MathProblem("q0", "5", "t"), MathProblem("q1", "\\frac{1}{2}", "t"), MathProblem("q2", "7", "t")]
    calls = []
    monkeypatch.setattr(evaluate, "_generate_completions", _fake_generate(calls))
    settings = EvalSettings(samples=4, batch_size=4)  # one problem per chunk: chunks [0], [1], [2]
    whole, whole_records = evaluate_problems(_FakeModel(), _FakeTokenizer(), problems, settings)
    whole_calls = list(calls)
    calls.clear()
    shards = [evaluate_problems(_FakeModel(), _FakeTokenizer(), problems, settings, rank=r, world=2) for r in (0, 1)]
    assert [[r["index"] for r in records] for _, records in shards] == [[0, 2], [1]]  # chunks 0, 2 | chunk 1
    assert sorted(calls, key=lambda call: call[1]) == sorted(whole_calls, key=lambda call: call[1])  # same seeds
    total = shards[0][0] + shards[1][0]
    assert total.as_list() == pytest.approx(whole.as_list())
    assert sorted(shards[0][1] + shards[1][1], key=lambda r: r["index"]) == whole_records
    empty, records = evaluate_problems(_FakeModel(), _FakeTokenizer(), problems, settings, rank=3, world=4)
    assert (empty.problems, empty.samples, records) == (0, 0, [])  # more ranks than chunks
    with pytest.raises(ValueError, match="rank must be in"):
        evaluate_problems(_FakeModel(), _FakeTokenizer(), problems, settings, rank=2, world=2)


def test_generation_settings_validation():
    with pytest.raises(ValueError, match="greedy decoding gives one sample"):
        EvalSettings(samples=4, generation=GenerationSettings(greedy=True))
    with pytest.raises(ConfigError, match="generation.temperature"):
        GenerationSettings(temperature=0)


@pytest.mark.parametrize("greedy", [True, False])
def test_samples_do_not_depend_on_the_world_size(tiny_models, greedy):
    # Every rank passes all problems and evaluates its chunks, each sampled from its own seed: the records
    # and sums of 1, 2 or 3 ranks are the same, sampled or greedy.
    from nested_reft_ds.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_models["qwen2"])
    problems = synthetic_problems(5, seed=3)
    settings = EvalSettings(samples=1 if greedy else 2, batch_size=2,
                            generation=GenerationSettings(greedy=greedy, temperature=1.0, max_new_tokens=4))
    whole, whole_records = evaluate_problems(model, tokenizer, problems, settings)
    assert [r["index"] for r in whole_records] == list(range(5))
    for world in (2, 3):
        shards = [evaluate_problems(model, tokenizer, problems, settings, rank=rank, world=world)
                  for rank in range(world)]
        total = sum((sums for sums, _ in shards[1:]), shards[0][0])
        for key in ("problems", "samples", "completion_tokens", "truncated", "no_answer", "majority_correct"):
            assert getattr(total, key) == getattr(whole, key), (world, key)
        assert total.pass_at_k == pytest.approx(whole.pass_at_k)
        merged = sorted((r for _, records in shards for r in records), key=lambda record: record["index"])
        assert merged == whole_records, world
    if not greedy:  # a different seed draws different samples
        other = evaluate_problems(model, tokenizer, problems, dataclasses.replace(settings, seed=1))[1]
        assert [s["completion"] for r in other for s in r["samples"]] != \
            [s["completion"] for r in whole_records for s in r["samples"]]


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
    assert (tmp_path / "eval.md").read_text() in table  # the table also goes next to --output
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
    assert report["settings"]["generation"]["greedy"] and set(report["benchmarks"]["synthetic"]["metrics"]) >= {"pass@1", "maj@1"}
    capsys.readouterr()
    assert main(["eval", "--model", model, "--benchmarks", "gsm8k"]) == 2
    assert "needs --data-dir" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--benchmarks", "gsm9k", "--data-dir", str(tmp_path)]) == 2
    assert "unknown benchmark 'gsm9k'" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--benchmarks", "synthetic", "--greedy", "--samples", "4"]) == 2
    assert "greedy decoding gives one sample" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--benchmarks", "synthetic"]) == 2
    assert "not a Hugging Face checkpoint" in capsys.readouterr().err


def test_eval_cli_custom_template_instruction_and_markdown_path(tiny_models, tmp_path, capsys):
    from nested_reft_ds.cli import main

    model = str(tiny_models["qwen2"])
    output, markdown = tmp_path / "custom.json", tmp_path / "tables" / "custom-table.md"
    markdown.parent.mkdir()
    assert main(["eval", "--model", model, "--benchmarks", "synthetic", "--limit", "2", "--greedy",
                 "--max-new-tokens", "2", "--prompt-template", "Q: {question} ({instruction}) {not a field}\nA:",
                 "--instruction", "Answer in \\boxed{}.", "--output", str(output), "--markdown", str(markdown)]) == 0
    report = json.loads(output.read_text())
    prompt = report["benchmarks"]["synthetic"]["problems"][0]["prompt"]
    question = report["benchmarks"]["synthetic"]["problems"][0]["question"]
    assert prompt == f"Q: {question} (Answer in \\boxed{{}}.) {{not a field}}\nA:"
    assert report["settings"]["instruction"] == "Answer in \\boxed{}." and report["world_size"] == 1
    assert markdown.read_text().startswith("| benchmark | problems | pass@1 | maj@1 |")
    assert not output.with_suffix(".md").exists()
    capsys.readouterr()
    assert main(["eval", "--model", model, "--benchmarks", "synthetic", "--prompt-template", "Q: nothing"]) == 2
    assert "{question} placeholder" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--benchmarks", "synthetic", "--prompt-template", "chat"]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_kl_of_the_full_model_to_itself_is_zero_and_grows_with_skipping(tiny_models):
    # Checks that the target log-probs are aligned with the sampled tokens: with no layer skipped the
    # behaviour and target distributions are the same model, so every per-token log-ratio is ~0.
    from nested_reft_ds.model import load_model_and_tokenizer
    from nested_reft_ds.nested import SkipPlan

    model, tokenizer = load_model_and_tokenizer(tiny_models["llama"])
    problems = synthetic_problems(2, seed=5)
    settings = EvalSettings(samples=2, batch_size=4, generation=GenerationSettings(temperature=1.0, max_new_tokens=4))
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


def test_rank_records_are_merged_on_rank_zero_in_index_order(tmp_path):
    # The record gather of a 2-rank eval, with the barrier replaced: rank 1 writes its part first, then
    # rank 0 writes its own, merges both in index order and removes the parts.
    class NoBarrier:
        @staticmethod
        def barrier():
            pass

    staging = tmp_path / ".eval.json.records"
    rank1 = {"a": [{"index": 1}, {"index": 3}], "b": [{"index": 0}]}
    rank0 = {"a": [{"index": 0}, {"index": 2}], "b": []}
    assert evaluate._merge_rank_records(rank1, staging, 1, 2, NoBarrier) is None
    merged = evaluate._merge_rank_records(rank0, staging, 0, 2, NoBarrier)
    assert merged == {"a": [{"index": i} for i in range(4)], "b": [{"index": 0}]}
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="rank 1's records are not at .*shares"):
        evaluate._merge_rank_records(rank0, staging, 0, 2, NoBarrier)
