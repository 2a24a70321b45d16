"""Rollout: cached decoding equals uncached recomputation; behaviour log-probs equal a fresh forward's."""
import pytest
import torch

from nested_reft_ds.model import load_model_and_tokenizer
from nested_reft_ds.nested import SkipPlan, nested_view
from nested_reft_ds.rl.logprobs import token_logprobs
from nested_reft_ds.rollout import DecodeStats, completion_logprobs, encode_prompts, generate, position_ids_from_mask
from nested_reft_ds.sampling import keyed_uniforms, sample_tokens, sampling_logprobs

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
    rollout = generate(model, enc.input_ids, enc.attention_mask, plan, max_new_tokens=16, temperature=1.3,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=0)
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


def test_shared_prompt_encoding_and_completion_logprobs_match_the_full_forward(tiny_models):
    model, tok = load_model_and_tokenizer(tiny_models["qwen2"])
    model.eval()
    ids, mask = encode_prompts(tok, PROMPTS, "cpu")
    lengths = [len(tok(p, add_special_tokens=False).input_ids) for p in PROMPTS]
    assert mask.sum(dim=1).tolist() == lengths and bool(mask[:, -1].all())  # left padded, no added tokens
    plan = SkipPlan(6)
    rollout = generate(model, ids, mask, plan, max_new_tokens=12, temperature=0.8, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, seed=0)
    reference = rescored(model, rollout, plan, 0.8)
    rows = torch.tensor([1, 2])
    with torch.no_grad():
        trimmed = rollout.select(rows)
        logprobs = completion_logprobs(model, trimmed, 0.8) * trimmed.completion_mask
    width = trimmed.completions.shape[1]
    torch.testing.assert_close(logprobs, reference[rows, :width], atol=1e-5, rtol=0)
    assert not reference[rows, width:].any()
    # with grad: the chunked head and the one-piece head give the same values and the same gradients
    grads = []
    for chunked_head in (True, False):
        model.zero_grad()
        logprobs = completion_logprobs(model, rollout, 0.8, chunked_head=chunked_head)
        torch.testing.assert_close(logprobs.detach() * rollout.completion_mask, reference, atol=1e-5, rtol=0)
        (logprobs * rollout.completion_mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_keyed_uniforms_are_uniform_and_a_pure_function_of_their_key():
    keys = torch.arange(200_000)
    u = keyed_uniforms(7, keys, 3)
    assert u.dtype == torch.float64 and 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.std()) - 12 ** -0.5) < 0.005
    histogram = torch.histc(u.float(), bins=20, min=0, max=1) / len(u)
    assert float((histogram - 0.05).abs().max()) < 0.003
    # Different position, seed or key: uncorrelated draws; the same key: the same draw, in any batch.
    for other in (keyed_uniforms(7, keys, 4), keyed_uniforms(8, keys, 3), keyed_uniforms(7, keys + 1, 3)):
        assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.01
    assert torch.equal(keyed_uniforms(7, keys[[5, 150_003, 9]], 3), u[[5, 150_003, 9]])
    big = torch.tensor([2**40 + 1, 2**40 + 2, 2**62])  # the high word of a key counts too
    assert len(set(keyed_uniforms(7, big, 0).tolist())) == 3
    with pytest.raises(ValueError, match=">= 0"):
        keyed_uniforms(-1, keys[:2], 0)


def test_inverse_cdf_sampling_follows_the_distribution_and_never_picks_a_dropped_token():
    logprobs = sampling_logprobs(torch.tensor([[0.0, 1.0, 5.0, 2.0, -1.0]]), 1.0, 0.9).expand(100_000, 5)
    tokens = sample_tokens(logprobs, keyed_uniforms(0, torch.arange(100_000), 0))
    frequencies = torch.bincount(tokens, minlength=5).double() / len(tokens)
    torch.testing.assert_close(frequencies, logprobs[0].double().exp(), atol=0.005, rtol=0)
    assert frequencies[logprobs[0] == float("-inf")].sum() == 0
    # u at its extremes still lands on a token of positive probability
    edge = sample_tokens(logprobs[:2], torch.tensor([0.0, 1.0 - 2**-53], dtype=torch.float64))
    assert all(logprobs[0, t] > float("-inf") for t in edge.tolist())


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_compaction_shared_prefill_and_batch_composition_do_not_change_a_sampled_token(tiny_models, top_p):
    model, tok = load_model_and_tokenizer(tiny_models["qwen2"])
    model.eval()
    group = 4
    ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(group)], "cpu")
    plan = SkipPlan(6, (2,))
    stops = list(range(10))  # ten stop tokens of 98: completions end at many different lengths
    kwargs = dict(max_new_tokens=20, temperature=1.2, top_p=top_p, eos_token_id=stops, pad_token_id=tok.pad_token_id,
                  seed=11)
    plain_stats, fast_stats = DecodeStats(), DecodeStats()
    plain = generate(model, ids, mask, plan, compact_below=0.0, stats=plain_stats, **kwargs)
    fast = generate(model, ids, mask, plan, compact_below=0.9, group_size=group, stats=fast_stats, **kwargs)
    lengths = plain.completion_mask.sum(dim=1)
    assert len(set(lengths.tolist())) >= 3, "rows must end at different lengths for compaction to act"
    assert torch.equal(fast.sequences, plain.sequences) and torch.equal(fast.completion_mask, plain.completion_mask)
    torch.testing.assert_close(fast.behavior_logprobs, plain.behavior_logprobs, atol=1e-5, rtol=0)
    assert fast_stats.compactions >= 1 and fast_stats.row_steps < plain_stats.row_steps
    assert fast_stats.prefill_rows == len(PROMPTS) and plain_stats.prefill_rows == len(ids)
    assert plain_stats.alive_row_steps == fast_stats.alive_row_steps == int(lengths.sum()) - len(ids)
    # A row keeps its tokens in another batch (reordered, half of it) as long as it keeps its key.
    order = torch.tensor([9, 2, 5, 0, 11, 7])
    subset = generate(model, ids[order], mask[order], plan, row_keys=order, **kwargs)
    width = subset.completions.shape[1]
    assert torch.equal(subset.completions, plain.completions[order, :width])
    assert int(plain.completion_mask[order].sum(dim=1).max()) == width


def test_shared_prefill_refuses_groups_that_are_not_one_prompt(tiny_models):
    model, tok = load_model_and_tokenizer(tiny_models["qwen2"])
    ids, mask = encode_prompts(tok, PROMPTS[:2], "cpu")
    with pytest.raises(ValueError, match="not the same prompt"):
        generate(model, ids, mask, SkipPlan(6), max_new_tokens=2, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, group_size=2)
