"""Length-bucketed, trimmed micro-batches: the same loss, gradients and diagnostics as consecutive full-width ones."""
from __future__ import annotations

import pytest
import torch

from nested_reft_ds.config import AlgorithmConfig
from nested_reft_ds.model import load_model_and_tokenizer
from nested_reft_ds.nested import SkipPlan
from nested_reft_ds.recipes.batching import micro_batches
from nested_reft_ds.rl import finalize, merge, policy_loss_parts
from nested_reft_ds.rollout import Rollout, completion_logprobs, encode_prompts, generate

PROMPTS = ["Question: 1+2?", "Q: 33 + 44 - 5 = ?", "Tom has 7 apples.", "x"]
GROUP = 4


def _positions(prompt_lengths, completion_lengths, batches) -> int:  # what the trimmed micro-batches compute
    return sum(len(b) * int(prompt_lengths[b].max() + completion_lengths[b].max()) for b in batches)


def test_bucketing_keeps_groups_whole_sorts_by_longest_row_and_is_a_partition():
    prompts = torch.tensor([2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1])
    completions = torch.tensor([1, 7, 2, 2, 7, 0, 0, 0, 1, 1, 6, 1])  # rows' lengths 3, 9, 4, 4, 8, 1, ...
    plain = micro_batches(prompts, completions, 4, 4, bucket_by_length=False)
    assert [b.tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    grouped = micro_batches(prompts, completions, 4, 4, bucket_by_length=True)  # groups' longest rows: 9, 8, 7
    assert [b.tolist() for b in grouped] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    rows = micro_batches(prompts, completions, 4, 3, bucket_by_length=True)  # 4 % 3 != 0: single rows, longest first
    assert [b.tolist() for b in rows] == [[1, 4, 10, 2], [3, 0, 8, 9], [11, 5, 6, 7]]
    assert sorted(torch.cat(rows).tolist()) == list(range(12))
    assert _positions(prompts, completions, rows) < _positions(prompts, completions, plain)


def test_bucketing_weighs_prompt_and_completion_widths_apart():
    # Sorting by row length mixes the two prompts here (156 positions); keeping them apart computes 132.
    prompts = torch.tensor([10, 10, 10, 10, 4, 4, 4, 4])
    completions = torch.tensor([9, 3, 5, 3, 2, 10, 5, 9])
    by_length = list(torch.sort(prompts + completions, descending=True, stable=True).indices.split(4))
    rows = micro_batches(prompts, completions, 4, 1, bucket_by_length=True)
    assert _positions(prompts, completions, by_length) == 156
    assert [b.tolist() for b in rows] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # And where one prompt's long completions share a micro-batch with the other's, sorting pays: 132 < 140.
    prompts = torch.tensor([10, 10, 10, 10, 1, 1, 1, 1])
    completions = torch.tensor([1, 1, 1, 12, 12, 11, 11, 1])
    rows = micro_batches(prompts, completions, 4, 1, bucket_by_length=True)
    consecutive = micro_batches(prompts, completions, 4, 1, bucket_by_length=False)
    assert (_positions(prompts, completions, rows), _positions(prompts, completions, consecutive)) == (132, 140)


@pytest.mark.parametrize("correction,self_normalize", [("token_tis", False), ("seq_is", True)])
def test_bucketed_trimmed_training_equals_the_plain_path(tiny_models, correction, self_normalize):
    model, tok = load_model_and_tokenizer(tiny_models["qwen2"])
    ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(GROUP)], "cpu")
    rollout = generate(model.eval(), ids, mask, SkipPlan(6, (1, 4)), max_new_tokens=16, temperature=1.0,
                       eos_token_id=list(range(10)), pad_token_id=tok.pad_token_id, seed=3, group_size=GROUP)
    assert len(set(rollout.completion_mask.sum(dim=1).tolist())) > 3
    advantages = torch.randn(len(ids), generator=torch.Generator().manual_seed(0))
    cfg = AlgorithmConfig(correction=correction, self_normalize=self_normalize)
    prompt_lengths, completion_lengths = rollout.prompt_mask.sum(dim=1), rollout.completion_mask.sum(dim=1)

    def train(bucket: bool, micro: int):
        model.zero_grad()
        total, parts, computed = 0.0, [], 0
        for rows in micro_batches(prompt_lengths, completion_lengths, micro, GROUP, bucket):
            batch = rollout.select(rows) if bucket else Rollout(  # full width: the plain path
                rollout.sequences[rows], rollout.prompt_mask[rows], rollout.completion_mask[rows],
                rollout.behavior_logprobs[rows])
            computed += batch.sequences.numel()
            logprobs = completion_logprobs(model, batch, 1.0)
            loss, part = policy_loss_parts(logprobs, logprobs.detach(), batch.behavior_logprobs, advantages[rows],
                                           batch.completion_mask.float(), cfg,
                                           num_global_tokens=rollout.num_completion_tokens,
                                           num_global_seqs=len(ids), group_size=GROUP)
            loss.backward()
            total += loss.item()
            parts.append(part)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return total, grads, finalize(merge(parts)), computed

    plain_loss, plain_grads, plain_stats, plain_tokens = train(False, 8)
    loss, grads, stats, tokens = train(True, 8)
    assert tokens < plain_tokens  # the trimmed micro-batches ran fewer token positions
    assert loss == pytest.approx(plain_loss, abs=1e-5)
    torch.testing.assert_close(grads, plain_grads, atol=1e-5, rtol=1e-4)
    for key in ("ess", "ratio_tok_mean", "ratio_tok_max", "ratio_tok_p50", "kl_behavior_k3"):
        assert stats[key] == pytest.approx(plain_stats[key], abs=1e-6), key
