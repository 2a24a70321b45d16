"""Rollout: cached decoding equals uncached recomputation; behaviour log-probs equal a fresh forward's."""
import pytest
import torch

from nested_reft_ds.model import load_model_and_tokenizer
from nested_reft_ds.nested import SkipPlan, nested_view
from nested_reft_ds.rl.logprobs import token_logprobs
from nested_reft_ds.rollout import generate, position_ids_from_mask, sampling_logprobs

PROMPTS = ["Question: 1+2?", "Q: 33 + 44 - 5 = ?", "Tom has 7 apples."]


def rescored(model, rollout, plan, temperature):
    """Log-probs of the rollout's tokens under a fresh (no cache) forward of the nested model."""
    with torch.no_grad(), nested_view(model, plan):
        logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                       position_ids=position_ids_from_mask(rollout.attention_mask)).logits
    start = rollout.prompt_length
    return token_logprobs(logits[:, start - 1:-1], rollout.completions, temperature) * rollout.completion_mask


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("skipped", [(), (0, 3), (2, 4)])
def test_cached_greedy_equals_uncached_and_logprobs_match(tiny_models, arch, skipped):
    model, tok = load_model_and_tokenizer(tiny_models[arch])
    model.eval()
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    plan = SkipPlan(6, skipped)
    kwargs = dict(max_new_tokens=24, temperature=0.7, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  greedy=True)
    cached = generate(model, enc.input_ids, enc.attention_mask, plan, **kwargs)
    uncached = generate(model, enc.input_ids, enc.attention_mask, plan, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.behavior_logprobs, rescored(model, cached, plan, 0.7), atol=1e-4, rtol=0)


def test_sampled_logprobs_are_the_sampling_distribution_and_stop_at_eos(tiny_models):
    model, tok = load_model_and_tokenizer(tiny_models["qwen2"])
    model.eval()
    # Make EOS likely so some rows stop early and some run to the limit.
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 0  # tied embedding row: only affects EOS
        model.model.norm.weight.mul_(0.1)
    enc = tok(PROMPTS * 4, padding=True, return_tensors="pt")
    plan = SkipPlan(6, (1, 4))
    generator = torch.Generator().manual_seed(0)
    rollout = generate(model, enc.input_ids, enc.attention_mask, plan, max_new_tokens=16, temperature=1.3,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, generator=generator)
    torch.testing.assert_close(rollout.behavior_logprobs, rescored(model, rollout, plan, 1.3), atol=1e-4, rtol=0)
    lengths = rollout.completion_mask.sum(1)
    for row, length in enumerate(lengths.tolist()):
        completion = rollout.completions[row]
        if length < rollout.completions.shape[1]:
            assert completion[length - 1] == tok.eos_token_id, "a stopped row ends with its EOS"
            assert (completion[length:] == tok.pad_token_id).all()
        assert tok.eos_token_id not in completion[: length - 1].tolist()


def test_top_p_restricts_support_and_renormalises():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    logprobs = sampling_logprobs(logits, 1.0, 0.8)
    assert torch.isinf(logprobs[0, 2:]).all()
    torch.testing.assert_close(logprobs[0, :2].exp(), torch.tensor([0.625, 0.375]))
    torch.testing.assert_close(sampling_logprobs(logits, 1.0, 1.0).exp(), logits.exp())



def test_a_model_marked_for_lockstep_decodes_in_lockstep_whatever_the_caller_passes(tiny_models):
    """Streamed ZeRO-3 decoding marks its model; generate then consults the rule every step by itself (a call site
    that forgets it cannot hang the job), keeps stepping until the rule says every rank is done, trims the extra
    padding steps, and refuses a different rule."""
    from nested_reft_ds.rollout import lockstep_rule, mark_lockstep
    model, tok = load_model_and_tokenizer(tiny_models["qwen2"])
    model.eval()
    enc = tok(PROMPTS[:1], return_tensors="pt")
    plan = SkipPlan(6)
    first = generate(model, enc.input_ids, enc.attention_mask, plan, max_new_tokens=1, greedy=True,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    eos = int(first.completions[0, 0])  # the row's first greedy token ends it: this "rank" is done after 1 step
    kwargs = dict(max_new_tokens=8, greedy=True, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    alone = generate(model, enc.input_ids, enc.attention_mask, plan, **kwargs)
    calls = []

    def all_ranks_done(local_done: bool) -> bool:  # another rank needs 3 more steps
        calls.append(local_done)
        return len(calls) >= 4

    mark_lockstep(model, all_ranks_done)
    try:
        assert lockstep_rule(model) is all_ranks_done
        stepped = generate(model, enc.input_ids, enc.attention_mask, plan, **kwargs)
        with pytest.raises(ValueError, match="carries its own lockstep rule"):
            generate(model, enc.input_ids, enc.attention_mask, plan, all_ranks_done=lambda done: done, **kwargs)
    finally:
        mark_lockstep(model, None)
    assert lockstep_rule(model) is None
    assert calls == [True] * 4, "one rule call per decode step, until every rank is done"
    assert alone.completions.shape[1] == 1
    assert torch.equal(stepped.sequences, alone.sequences), "the padding steps are trimmed"
    assert torch.equal(stepped.completion_mask, alone.completion_mask)
    assert torch.equal(stepped.behavior_logprobs, alone.behavior_logprobs)
