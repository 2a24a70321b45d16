"""Shared-prompt training forward: the packed layout, its block mask, and equality with the plain path."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from nested_reft_ds.config import AlgorithmConfig, ConfigError, load_config
from nested_reft_ds.model import load_model_and_tokenizer
from nested_reft_ds.nested import SkipPlan
from nested_reft_ds.rl import finalize, merge, policy_loss_parts
from nested_reft_ds.rollout import Rollout, completion_logprobs, encode_prompts, generate
from nested_reft_ds.shared_prompt import (PADDING, PROMPT, block_attention_mask, pack_groups, packed_shape,
                                          packing_pays, shared_prompt_logprobs)

PROMPTS = ["Question: 1+2?", "Q: 33 + 44 - 5 = ?", "Tom has 7 apples.", "x"]
GROUP = 4


def _hand_rollout() -> Rollout:
    # Two prompts (ids 5 6 and 7), two samples each, left-padded prompts and right-padded completions.
    sequences = torch.tensor([[5, 6, 11, 12, 13], [5, 6, 14, 0, 0], [0, 7, 15, 16, 0], [0, 7, 17, 0, 0]])
    prompt_mask = torch.tensor([[1, 1], [1, 1], [0, 1], [0, 1]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]])
    return Rollout(sequences, prompt_mask, completion_mask, torch.zeros(4, 3))


def test_packed_layout_and_block_mask_by_hand():
    packed = pack_groups(_hand_rollout(), torch.tensor([0, 0, 1, 1]))
    assert packed.input_ids.tolist() == [[5, 6, 11, 12, 13, 14], [7, 15, 16, 17, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 2, 1, 0, 0]]
    assert packed.segments.tolist() == [[PROMPT, PROMPT, 1, 1, 1, 2], [PROMPT, 1, 1, 2, PADDING, PADDING]]
    # Flat indices into [2 x 6]: a first token is predicted by its prompt's last position (1, and 6 + 0).
    assert packed.predictor.tolist() == [[1, 2, 3], [1, 0, 0], [6, 7, 0], [6, 0, 0]]
    assert packed_shape(_hand_rollout(), torch.tensor([0, 0, 1, 1])) == (2, 6)
    allowed = block_attention_mask(packed.segments)[:, 0].int()
    assert allowed[0].tolist() == [[1, 0, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0, 0],
                                   [1, 1, 1, 0, 0, 0],
                                   [1, 1, 1, 1, 0, 0],
                                   [1, 1, 1, 1, 1, 0],
                                   [1, 1, 0, 0, 0, 1]]  # sample 2 sees the prompt and itself, not sample 1
    assert allowed[1].tolist() == [[1, 0, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0, 0],
                                   [1, 1, 1, 0, 0, 0],
                                   [1, 0, 0, 1, 0, 0],
                                   [0, 0, 0, 0, 1, 0],   # padding sees itself only
                                   [0, 0, 0, 0, 0, 1]]


def test_rows_that_share_a_group_id_must_share_the_prompt():
    with pytest.raises(ValueError, match="share group id 0 but not their prompt"):
        pack_groups(_hand_rollout(), torch.tensor([0, 0, 0, 1]))


@pytest.fixture(scope="module")
def sampled(tiny_models):
    model, tok = load_model_and_tokenizer(tiny_models["qwen2"])
    ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(GROUP)], "cpu")
    rollout = generate(model.eval(), ids, mask, SkipPlan(6, (1, 4)), max_new_tokens=16, temperature=1.0,
                       eos_token_id=list(range(10)), pad_token_id=tok.pad_token_id, seed=3, group_size=GROUP)
    assert len(set(rollout.completion_mask.sum(dim=1).tolist())) > 3  # unequal lengths: padding to drop
    return tiny_models["qwen2"], rollout


def _train(model, rollout: Rollout, batches, packed: bool, cfg: AlgorithmConfig, chunked_head: bool):
    model.zero_grad()
    advantages = torch.randn(rollout.sequences.shape[0], generator=torch.Generator().manual_seed(0))
    group_ids = torch.arange(rollout.sequences.shape[0]) // GROUP
    total, parts = 0.0, []
    for rows in batches:
        batch = rollout.select(rows)
        if packed:
            logprobs = shared_prompt_logprobs(model, batch, pack_groups(batch, group_ids[rows]), 1.0,
                                              chunked_head=chunked_head)
        else:
            logprobs = completion_logprobs(model, batch, 1.0, chunked_head=chunked_head)
        loss, part = policy_loss_parts(logprobs, logprobs.detach(), batch.behavior_logprobs, advantages[rows],
                                       batch.completion_mask.float(), cfg,
                                       num_global_tokens=rollout.num_completion_tokens,
                                       num_global_seqs=rollout.sequences.shape[0], group_size=GROUP)
        loss.backward()
        total += loss.item()
        parts.append(part)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return total, grads, finalize(merge(parts))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunked_head", [True, False])
@pytest.mark.parametrize("correction,self_normalize", [("token_tis", False), ("seq_is", True)])
def test_shared_prompt_forward_equals_the_plain_path(sampled, attn, chunked_head, correction, self_normalize):
    path, rollout = sampled
    model, _ = load_model_and_tokenizer(path, attn)
    cfg = AlgorithmConfig(correction=correction, self_normalize=self_normalize)
    whole_groups = [torch.arange(0, 8), torch.arange(8, 16)]
    plain = _train(model, rollout, whole_groups, False, cfg, chunked_head)
    packed = _train(model, rollout, whole_groups, True, cfg, chunked_head)
    assert packed[0] == pytest.approx(plain[0], abs=1e-5)
    torch.testing.assert_close(packed[1], plain[1], atol=1e-5, rtol=1e-4)
    for key in ("ess", "ratio_tok_mean", "ratio_tok_max", "kl_behavior_k3"):
        assert packed[2][key] == pytest.approx(plain[2][key], abs=1e-6), key
    if not self_normalize:  # partial groups in shuffled order pack too (one sequence per prompt present)
        shuffled = list(torch.randperm(16, generator=torch.Generator().manual_seed(1)).split(6))
        partial = _train(model, rollout, shuffled, True, cfg, chunked_head)
        assert partial[0] == pytest.approx(plain[0], abs=1e-5)
        torch.testing.assert_close(partial[1], plain[1], atol=1e-5, rtol=1e-4)


def test_packing_pays_for_long_prompts_and_not_for_long_completions(tiny_models):
    model, _ = load_model_and_tokenizer(tiny_models["qwen2"])

    def rollout(prompt: int, completion: int) -> Rollout:
        rows = 8
        return Rollout(torch.ones(rows, prompt + completion, dtype=torch.long),
                       torch.ones(rows, prompt, dtype=torch.long), torch.ones(rows, completion, dtype=torch.long),
                       torch.zeros(rows, completion))

    one_group = torch.zeros(8, dtype=torch.long)
    assert packing_pays(model.config, rollout(200, 10), one_group)      # 7 x 200 prompt positions saved
    assert not packing_pays(model.config, rollout(10, 400), one_group)  # S^2 = 3210^2 >> 8 x 410^2
    assert not packing_pays(model.config, rollout(200, 10), torch.arange(8))  # distinct prompts: nothing shared


def test_flash_attention_refuses_the_block_mask(sampled, tiny_models):
    _, rollout = sampled
    model, _ = load_model_and_tokenizer(tiny_models["qwen2"])
    model.config._attn_implementation = "flash_attention_2"  # only read by the mask builder before any kernel
    with pytest.raises(ValueError, match="shared_prompt_forward=never"):
        shared_prompt_logprobs(model, rollout, pack_groups(rollout, torch.arange(16) // GROUP), 1.0)
    with pytest.raises(ConfigError, match="train.shared_prompt_forward"):
        load_config(None, ["train.shared_prompt_forward=always", "model.attn_implementation=flash_attention_2"])
    cfg = load_config(None, ["train.shared_prompt_forward=auto", "model.attn_implementation=flash_attention_2"])
    assert dataclasses.asdict(cfg)["train"]["shared_prompt_forward"] == "auto"
