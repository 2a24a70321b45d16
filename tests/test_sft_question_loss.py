"""`train.sft_question_loss`: the warm-up trains on the question's tokens as well as the worked solution's.

The batch layout (`teacher_forced`) and the real `train.run` (single process, tiny model): with the option the
first step reports the solution's and the question's token-mean losses of the initial weights, and the update
differs from the solution-only warm-up's, so the question reaches the gradient.
"""
import json
import os

import pytest
import torch

from nested_reft_ds.config import load_config
from nested_reft_ds.data.synthetic import synthetic_problems
from nested_reft_ds.model import build_char_tokenizer
from nested_reft_ds.recipes.train import teacher_forced
from nested_reft_ds.data.templates import format_prompt

TINY = ["model.hidden_size=32", "model.num_layers=4", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_problems=16", "data.eval_problems=2", "rollout.prompts_per_step=2",
        "rollout.group_size=4", "train.micro_batch_size=4", "train.sft_steps=2", "train.steps=0",
        "train.cpu_threads=1", "logging.tensorboard=false", "logging.progress_bar=false"]


def test_question_loss_layout_covers_the_prompt_after_its_first_token():
    tokenizer = build_char_tokenizer()
    problems = synthetic_problems(3, seed=5, min_steps=1, max_steps=4)
    solution_only, solution_mask = teacher_forced(tokenizer, problems, "plain", "cpu")
    assert torch.equal(solution_mask, solution_only.completion_mask)

    batch, solution_mask = teacher_forced(tokenizer, problems, "plain", "cpu", question_loss=True)
    assert batch.prompt_length == 1 and bool(batch.prompt_mask.all())
    for row, problem in enumerate(problems):
        prompt = tokenizer(format_prompt(problem.question, tokenizer, "plain"), add_special_tokens=False).input_ids
        solution = tokenizer(" " + problem.solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        length = int(batch.completion_mask[row].sum())
        assert batch.sequences[row, :1 + length].tolist() == prompt + solution
        assert batch.completions[row, solution_mask[row].bool()].tolist() == solution
        assert int(solution_mask[row].sum()) == len(solution) and length == len(prompt) - 1 + len(solution)
    # The solution tokens are the same targets either way.
    assert int(solution_mask.sum()) == int(solution_only.completion_mask.sum())


def _warmup(out, overrides):
    from nested_reft_ds.recipes.train import run

    run(load_config(None, TINY + [f"train.output_dir={out}", *overrides]), None, "none")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("phase") == "sft"]


def test_question_loss_warmup_logs_both_losses_and_trains_on_the_question(tmp_path):
    from nested_reft_ds import engine as ds
    from nested_reft_ds.data import problems_from_config
    from nested_reft_ds.model import load_model_and_tokenizer
    from nested_reft_ds.recipes.batching import batch_indices
    from nested_reft_ds.rollout import completion_logprobs

    environ = dict(os.environ)  # init_distributed exports RANK/WORLD_SIZE/...: keep them out of later tests
    try:
        with_question = _warmup(tmp_path / "q", ["train.sft_question_loss=true"])
        solution_only = _warmup(tmp_path / "s", [])
    finally:
        ds.shutdown_distributed()
        os.environ.clear()
        os.environ.update(environ)

    assert [r["step"] for r in with_question] == [0, 1]
    assert "sft_question_loss" in with_question[0] and "sft_question_loss" not in solution_only[0]
    # Step 0 sees the initial weights: both runs report the same solution loss, and the question loss is the
    # question tokens' token mean under those weights.
    cfg = load_config(None, TINY)
    model, tokenizer = load_model_and_tokenizer(tmp_path / "q" / "base_model", "sdpa")
    problems, _ = problems_from_config(cfg.data, cfg.train.seed)
    chosen = batch_indices(len(problems), 8, 0, cfg.train.seed + 1)
    batch, solution_mask = teacher_forced(tokenizer, [problems[i] for i in chosen], cfg.data.prompt_template, "cpu",
                                          question_loss=True)
    with torch.no_grad():
        nll = -completion_logprobs(model, batch, 1.0) * batch.completion_mask
    question_mask = batch.completion_mask - solution_mask
    assert with_question[0]["sft_loss"] == pytest.approx(float(nll[solution_mask.bool()].mean()), rel=1e-5)
    assert with_question[0]["sft_question_loss"] == pytest.approx(
        float(nll.sum() - nll[solution_mask.bool()].sum()) / float(question_mask.sum()), rel=1e-5)
    assert solution_only[0]["sft_loss"] == pytest.approx(with_question[0]["sft_loss"], rel=1e-5)
    # The first update differs: the question's tokens reach the gradient.
    assert abs(with_question[1]["sft_loss"] - solution_only[1]["sft_loss"]) > 1e-4
