"""CUDA paths: bf16 and flash-attention-2 decoding and scoring, compaction and the chunked head on the GPU; the static
decode engine in bf16 and its CUDA-graph step (exactness against the eager fixed-shape step, no recapture across
skip sets).

`python -m pytest -m gpu tests/test_gpu.py` on a CUDA machine (scripts/gpu_check.sh runs it); skipped on CPU.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from nested_reft_ds.model import load_model_and_tokenizer
from nested_reft_ds.nested import SkipPlan, nested_view
from nested_reft_ds.rl.logprobs import token_logprobs
from nested_reft_ds.rollout import DecodeStats, Rollout, completion_logprobs, encode_prompts, generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = ["Question: 1+2?", "Q: 33 + 44 - 5 = ?", "Tom has 7 apples.", "x"]
GROUP = 4
STOPS = list(range(10))  # ten stop tokens of 98: completions end at many lengths
PLAN = SkipPlan(6, (2,))


def _model(tiny_models, attn: str, dtype=torch.bfloat16):
    model, tok = load_model_and_tokenizer(tiny_models["qwen2"], attn, dtype=dtype)
    return model.cuda().eval(), tok


def _rollout(model, tok, **kwargs) -> Rollout:
    ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(GROUP)], "cuda")
    return generate(model, ids, mask, PLAN, max_new_tokens=24, temperature=1.0, eos_token_id=STOPS,
                    pad_token_id=tok.pad_token_id, seed=5, **kwargs)


def test_bf16_behaviour_logprobs_match_a_rescoring_forward_of_the_nested_model(tiny_models):
    model, tok = _model(tiny_models, "sdpa")
    rollout = _rollout(model, tok, group_size=GROUP)
    with torch.no_grad(), nested_view(model, PLAN):
        rescored = completion_logprobs(model, rollout, 1.0)
    assert rescored.dtype == torch.float32
    mask = rollout.completion_mask.bool()
    # bf16 logits: the cached decode and the one-pass forward round differently, by a few hundredths of a nat.
    torch.testing.assert_close(rescored[mask], rollout.behavior_logprobs[mask], atol=0.1, rtol=0)


def test_bf16_compaction_and_shared_prefill_keep_every_token(tiny_models):
    model, tok = _model(tiny_models, "sdpa")
    plain_stats, fast_stats = DecodeStats(), DecodeStats()
    plain = _rollout(model, tok, compact_below=0.0, stats=plain_stats)
    fast = _rollout(model, tok, compact_below=0.9, group_size=GROUP, stats=fast_stats)
    assert torch.equal(plain.sequences, fast.sequences)
    torch.testing.assert_close(plain.behavior_logprobs, fast.behavior_logprobs, atol=2e-2, rtol=0)
    assert fast_stats.row_steps < plain_stats.row_steps


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_flash_attention_2_decodes_and_scores_like_sdpa(tiny_models):
    sdpa, tok = _model(tiny_models, "sdpa")
    flash, _ = _model(tiny_models, "flash_attention_2")
    ids, mask = encode_prompts(tok, PROMPTS, "cuda")  # left padded: flash-attn's varlen path
    kwargs = dict(max_new_tokens=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, greedy=True)
    a = generate(sdpa, ids, mask, SkipPlan(6, (1,)), **kwargs)
    b = generate(flash, ids, mask, SkipPlan(6, (1,)), **kwargs)
    agree = (a.completions == b.completions).float().mean().item()
    assert agree > 0.9, agree  # bf16 kernels differ in rounding; argmax ties may flip late tokens
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(flash, a, 1.0), completion_logprobs(sdpa, a, 1.0),
                                   atol=5e-2, rtol=0)


def test_chunked_head_needs_a_quarter_of_the_full_logits_memory_at_a_large_vocabulary():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab, rows, prompt, completion = 151_936, 8, 64, 256
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).cuda().bfloat16()
    sequences = torch.randint(0, vocab, (rows, prompt + completion), device="cuda")
    rollout = Rollout(sequences, torch.ones(rows, prompt, dtype=torch.long, device="cuda"),
                      torch.ones(rows, completion, dtype=torch.long, device="cuda"),
                      torch.zeros(rows, completion, device="cuda"))

    def peak(fn) -> int:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    def full():
        logits = model(input_ids=sequences).logits
        return token_logprobs(logits[:, prompt - 1:-1], rollout.completions, chunk_elements=2**62)

    full_bytes = peak(full)
    chunked_bytes = peak(lambda: completion_logprobs(model, rollout, 1.0))
    assert chunked_bytes <= full_bytes / 4, (chunked_bytes, full_bytes)


def test_bf16_shared_prompt_forward_scores_like_the_plain_layout(tiny_models):
    from nested_reft_ds.shared_prompt import pack_groups, shared_prompt_logprobs

    model, tok = _model(tiny_models, "sdpa")
    rollout = _rollout(model, tok, group_size=GROUP)
    group_ids = torch.arange(rollout.sequences.shape[0], device="cuda") // GROUP
    with torch.no_grad():
        packed = shared_prompt_logprobs(model, rollout, pack_groups(rollout, group_ids), 1.0)
        plain = completion_logprobs(model, rollout, 1.0)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(packed[mask], plain[mask], atol=5e-2, rtol=0)  # bf16: summation order differs


def _fixed_or_graphs(model, ids, mask, plan, step_mode, compact_below=0.0):
    """`decode.static_generate` at the fixed shapes: eagerly ("fixed") or replaying CUDA graphs ("graphs")."""
    from nested_reft_ds.decode import DecodeStats, static_generate

    counters = DecodeStats()
    out = static_generate(model, ids, mask.long(), plan, max_new_tokens=24, temperature=1.0, top_p=1.0,
                          eos_ids=torch.tensor(STOPS, device="cuda"), pad_token_id=0, greedy=False, seed=5,
                          row_keys=torch.arange(len(ids), device="cuda"), group_size=GROUP, compact_below=compact_below,
                          step_mode=step_mode, stats=counters)
    return out, counters


def test_cuda_graphs_decode_what_the_eager_fixed_step_decodes_and_skip_sets_recapture_nothing(tiny_models):
    """One graph per decoder layer and batch bucket (plus embedding and head): the first rollout captures its bucket,
    later rollouts with other skip sets capture nothing (no compaction here, so every rollout runs at one bucket),
    and every rollout samples the tokens the same fixed-shape step samples eagerly (bf16: log-probs to bf16
    rounding); with compaction too, where the smaller buckets are captured on first use."""
    model, tok = _model(tiny_models, "sdpa")
    ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(GROUP)], "cuda")
    captures = []
    for skipped in [(2,), (1, 4), (2,), (0, 3)]:
        plan = SkipPlan(6, skipped)
        (tokens, completion_mask, logprobs), counters = _fixed_or_graphs(model, ids, mask, plan, "graphs")
        (eager_tokens, eager_mask, eager_logprobs), _ = _fixed_or_graphs(model, ids, mask, plan, "fixed")
        assert torch.equal(tokens, eager_tokens) and torch.equal(completion_mask, eager_mask)
        torch.testing.assert_close(logprobs, eager_logprobs, atol=2e-2, rtol=0)
        captures.append(counters.captures)
    assert captures[0] > 0 and captures[1:] == [0, 0, 0], captures
    (tokens, completion_mask, logprobs), _ = _fixed_or_graphs(model, ids, mask, SkipPlan(6, (1,)), "graphs", 0.9)
    (eager_tokens, eager_mask, eager_logprobs), _ = _fixed_or_graphs(model, ids, mask, SkipPlan(6, (1,)), "fixed", 0.9)
    assert torch.equal(tokens, eager_tokens) and torch.equal(completion_mask, eager_mask)
    torch.testing.assert_close(logprobs, eager_logprobs, atol=2e-2, rtol=0)
    stats = DecodeStats()
    _rollout(model, tok, group_size=GROUP, engine="static_graphs", stats=stats)
    assert stats.engine == "static_graphs" and stats.host_reads <= -(-24 // 8)


def test_bf16_static_engine_samples_like_the_reference_engine(tiny_models):
    model, tok = _model(tiny_models, "sdpa")
    static = _rollout(model, tok, group_size=GROUP, engine="static")
    reference = _rollout(model, tok, group_size=GROUP, engine="reference")
    agree = (static.completions[:, :8] == reference.completions[:, :8]).float().mean().item()
    assert agree > 0.9, agree  # bf16 kernels differ in rounding: a late token may flip, and the row then diverges
    with torch.no_grad(), nested_view(model, PLAN):
        rescored = completion_logprobs(model, static, 1.0)
    mask = static.completion_mask.bool()
    torch.testing.assert_close(rescored[mask], static.behavior_logprobs[mask], atol=0.1, rtol=0)


def test_bf16_scripted_layer_loop_decodes_the_eager_floats_on_cuda(tiny_models):
    """"static" (the layer loop under TorchScript's plain interpreter) launches the eager functions' kernels on CUDA
    too: the same tokens and bit-identical behaviour log-probs as "static_eager", with compaction and shared prefill."""
    model, tok = _model(tiny_models, "sdpa")
    scripted = _rollout(model, tok, group_size=GROUP, engine="static", compact_below=0.9)
    eager = _rollout(model, tok, group_size=GROUP, engine="static_eager", compact_below=0.9)
    assert torch.equal(scripted.sequences, eager.sequences)
    assert torch.equal(scripted.behavior_logprobs, eager.behavior_logprobs)


def test_speculative_cuda_graphs_sample_the_scripted_rounds_and_a_new_skip_set_captures_nothing(tiny_models):
    """rollout.mode=speculative with rollout.engine=static_graphs (`SpeculativeGraphs`: per decoder layer, cache,
    batch bucket and tokens per row, the verify forward of g + 1 tokens included) against the scripted rounds in
    float32 (the graphs attend over every cache column, so the floats differ by summation order only): 12 rows
    (bucket 12, then smaller buckets after compaction, padding slots), g = 3 and g = 1 (drafter and verifier share
    the round inputs at 2 tokens per row); a rollout with another skip set captures nothing at the (cache, bucket,
    tokens per row) already captured."""
    from nested_reft_ds import speculative
    from nested_reft_ds.decode import HELD_GRAPHS

    model, tok = _model(tiny_models, "sdpa", dtype=torch.float32)
    held = model.__dict__.setdefault(HELD_GRAPHS, {})
    held.pop(speculative.SpeculativeGraphs, None)
    ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(3)], "cuda")
    for skipped, g in [((2,), 3), ((1, 4), 3), ((0, 3), 3), ((1, 4), 1)]:
        plan = SkipPlan(6, skipped)
        kwargs = dict(max_new_tokens=24, temperature=1.0, eos_token_id=STOPS, pad_token_id=tok.pad_token_id, seed=5,
                      draft_length=g, compact_below=0.9)
        before = set(getattr(held.get(speculative.SpeculativeGraphs), "graphs", {}))
        stats = DecodeStats()
        graphed = generate(model, ids, mask, plan, engine="static_graphs", stats=stats, **kwargs)
        scripted = generate(model, ids, mask, plan, engine="static", **kwargs)
        assert stats.engine == "speculative" and stats.verify_passes > 0
        assert torch.equal(graphed.sequences, scripted.sequences), (skipped, g)
        torch.testing.assert_close(graphed.behavior_logprobs, scripted.behavior_logprobs, atol=1e-4, rtol=0)
        new = set(held[speculative.SpeculativeGraphs].graphs) - before
        assert stats.captures == len(new)
        captured_before = {(key[0], key[2], key[3]) for key in before if len(key) == 4}  # (cache, bucket, m)
        assert not any((key[0], key[2], key[3]) in captured_before for key in new if len(key) == 4), new
        if not before:
            assert stats.captures > 0
