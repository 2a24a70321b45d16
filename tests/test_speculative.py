"""Self-speculative sampling (`rollout.mode: speculative`): the completions are distributed as the full model's.

- The rule (`sampling.speculative_verify`) in a speculative loop over two small autoregressive tables: the
  distribution of 4-token completions, enumerated exactly (3^4 sequences), against 120,000 samples by chi-square.
  It passes for the rule and fails for the draft's own distribution and for two subtly wrong rules (resampling from
  p instead of the residual; accepting with probability p(d) instead of min(1, p(d) / q(d))).
- The engine (speculative.py) on a real model: greedy speculative output is the full model's greedy output token
  for token; sampled completions match the full model's exact distribution of 3-token completions (chi-square
  over every sequence of probability >= 1e-3, the rest binned) and the nested model's samples do not; a row's
  tokens do not depend on the batch, compaction or shared prefill; a drafter that skips nothing is always accepted.
"""
import math

import pytest
import torch
from scipy.stats import chi2

from nested_reft_ds.config import ModelConfig
from nested_reft_ds.model import build_tiny_model, load_model_and_tokenizer
from nested_reft_ds.nested import SkipPlan
from nested_reft_ds.rollout import DecodeStats, Rollout, completion_logprobs, encode_prompts, generate
from nested_reft_ds.sampling import sample_tokens, speculative_verify
from nested_reft_ds.speculative import RoundRules, RoundState, predicted_speedup, verify_and_commit

# ---------------------------------------------------------------------------------------------- the rule alone

VOCAB, LENGTH, DRAFT = 3, 4, 2
SAMPLES = 120_000


def tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and draft transition tables log p(x_t | x_{t-1}) [V, V] (row V - 1 also serves the first token)."""
    g = torch.Generator().manual_seed(seed)
    target = (torch.randn(VOCAB, VOCAB, generator=g) * 1.5).log_softmax(-1)
    draft = (target + torch.randn(VOCAB, VOCAB, generator=g)).log_softmax(-1)
    return target, draft


def exact_distribution(target: torch.Tensor) -> torch.Tensor:
    """P(x_0 .. x_{L-1}) of every sequence, [V^L], in base-V order (x_0 most significant); x_0 follows token V-1."""
    probs = torch.ones(1, dtype=torch.float64)
    previous = torch.full((1,), VOCAB - 1)
    for _ in range(LENGTH):
        step = target.double().exp()[previous]  # [n, V]
        probs = (probs[:, None] * step).flatten()
        previous = torch.arange(VOCAB).repeat(len(previous))
    return probs


def speculative_samples(target, draft, rule, seed: int) -> torch.Tensor:
    """SAMPLES sequences of LENGTH tokens, drafted from `draft` and verified against `target` by `rule`."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(SAMPLES)
    out = torch.full((SAMPLES, LENGTH + DRAFT + 1), -1)
    length = torch.zeros(SAMPLES, dtype=torch.long)
    last = torch.full((SAMPLES,), VOCAB - 1)
    while bool((length < LENGTH).any()):
        drafts, previous = [], last
        for _ in range(DRAFT):
            token = sample_tokens(draft[previous], torch.rand(SAMPLES, generator=g, dtype=torch.float64))
            drafts.append(token)
            previous = token
        drafts = torch.stack(drafts, 1)  # [N, g]
        contexts = torch.cat([last[:, None], drafts], 1)  # p at position i conditions on the token before it
        accepted, next_token = rule(target[contexts], draft[contexts[:, :DRAFT]], drafts,
                                    torch.rand(SAMPLES, DRAFT, generator=g, dtype=torch.float64),
                                    torch.rand(SAMPLES, DRAFT + 1, generator=g, dtype=torch.float64))
        candidates = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, accepted[:, None], next_token[:, None])
        offsets = torch.arange(DRAFT + 1)
        keep = offsets <= accepted[:, None]
        columns = (length[:, None] + offsets).clamp(max=out.shape[1] - 1)
        out[rows[:, None].expand_as(columns)[keep], columns[keep]] = candidates[keep]
        last = candidates.gather(1, accepted[:, None]).squeeze(1)
        length = length + accepted + 1
    return out[:, :LENGTH]


def sequence_index(sequences: torch.Tensor) -> torch.Tensor:
    return (sequences * VOCAB ** torch.arange(LENGTH - 1, -1, -1)).sum(1)


def chi_square_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    statistic = float(((counts.double() - expected) ** 2 / expected).sum())
    return float(chi2.sf(statistic, len(counts) - 1))


def rule_with(accept_probability, residual):
    """A speculative rule built from its two parts, for the wrong variants the test must catch."""
    def rule(target_logprobs, draft_logprobs, drafts, accept_uniforms, resample_uniforms):
        g, vocab = drafts.shape[1], target_logprobs.shape[-1]
        p = target_logprobs[:, :g].gather(-1, drafts[..., None]).squeeze(-1).double().exp()
        q = draft_logprobs.gather(-1, drafts[..., None]).squeeze(-1).double().exp()
        accepted = (accept_uniforms < accept_probability(p, q)).long().cumprod(-1).sum(-1)
        at = accepted[:, None, None].expand(-1, 1, vocab)
        p_next = target_logprobs.gather(1, at).squeeze(1).double().exp()
        q_next = draft_logprobs.gather(1, at.clamp(max=g - 1)).squeeze(1).double().exp()
        weights = torch.where((accepted < g)[:, None], residual(p_next, q_next), p_next)
        return accepted, sample_tokens(weights.log(), resample_uniforms.gather(1, accepted[:, None]).squeeze(1))
    return rule


WRONG_RULES = {
    # after a rejection, draw from p instead of the residual max(0, p - q)
    "resample_from_p": rule_with(lambda p, q: p / q, lambda p, q: p),
    # accept with probability p(d) instead of min(1, p(d) / q(d))
    "accept_with_p": rule_with(lambda p, q: p, lambda p, q: (p - q).clamp(min=0)),
}


@pytest.mark.parametrize("seed", [0, 1])
def test_speculative_rule_samples_the_target_distribution_exactly(seed):
    target, draft = tables(seed)
    exact = exact_distribution(target)
    counts = torch.bincount(sequence_index(speculative_samples(target, draft, speculative_verify, seed)),
                            minlength=VOCAB ** LENGTH)
    assert chi_square_pvalue(counts, exact) > 1e-3
    # The same test has the power to see the draft's distribution and two subtly wrong rules.
    assert chi_square_pvalue(counts, exact_distribution(draft)) < 1e-9
    for name, wrong in WRONG_RULES.items():
        wrong_counts = torch.bincount(sequence_index(speculative_samples(target, draft, wrong, seed)),
                                      minlength=VOCAB ** LENGTH)
        assert chi_square_pvalue(wrong_counts, exact) < 1e-9, name
    # ... while the right rule written from the same parts passes.
    right = rule_with(lambda p, q: p / q, lambda p, q: (p - q).clamp(min=0))
    right_counts = torch.bincount(sequence_index(speculative_samples(target, draft, right, seed + 10)),
                                  minlength=VOCAB ** LENGTH)
    assert chi_square_pvalue(right_counts, exact) > 1e-3


def test_speculative_rule_by_hand():
    # p = (0.5, 0.5), q = (0.9, 0.1) at one drafted position; the draft is token 0.
    target = torch.tensor([[[0.5, 0.5], [0.2, 0.8]]]).log()
    draft = torch.tensor([[[0.9, 0.1]]]).log()
    drafts = torch.tensor([[0]])
    # Accept iff u < p/q = 0.5556.
    accepted, token = speculative_verify(target, draft, drafts, torch.tensor([[0.55]]), torch.tensor([[0.0, 0.9]]))
    assert (int(accepted), int(token)) == (1, 1)  # all kept: bonus from p_2 = (0.2, 0.8) at u = 0.9
    accepted, token = speculative_verify(target, draft, drafts, torch.tensor([[0.56]]), torch.tensor([[0.0, 0.0]]))
    assert (int(accepted), int(token)) == (0, 1)  # rejected: residual max(0, p - q) = (0, 0.4) -> token 1 always
    accepted, token = speculative_verify(target, draft, drafts, torch.tensor([[0.99]]), torch.tensor([[0.0, 0.0]]),
                                         greedy=True)
    assert int(accepted) == 1 and int(token) == 1  # greedy: p's argmax at 0 is 0 (tie -> first), then p_2's is 1


def test_speculative_rule_refuses_shapes_that_do_not_agree():
    target = torch.zeros(2, 3, 5).log_softmax(-1)
    draft = torch.zeros(2, 2, 5).log_softmax(-1)
    drafts = torch.zeros(2, 2, dtype=torch.long)
    uniforms = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"draft log-probs must be \[B, g, V\], got \[1, 2, 2, 5\]"):
        speculative_verify(target, draft[None], drafts, uniforms[:, :2], uniforms, greedy=True)
    with pytest.raises(ValueError, match=r"target \[2, 2, 5\], draft \[2, 2, 5\] and drafts \[2, 2\] do not agree"):
        speculative_verify(target[:, :2], draft, drafts, uniforms[:, :2], uniforms)
    # Scripted (as the engine's verify phase runs it), the check holds too.
    scripted_rule = torch.jit.script(speculative_verify)
    with pytest.raises(torch.jit.Error, match="do not agree"):
        scripted_rule(target, draft, drafts[:, :1], uniforms[:, :2], uniforms, False)


def test_predicted_speedup_formula():
    assert predicted_speedup(1.0, 4, 0.0, 1.0) == 5.0
    assert predicted_speedup(0.0, 4, 0.5, 1.0) == pytest.approx(1 / 3)
    a, g, c, v = 0.8, 3, 0.5, 1.2
    assert predicted_speedup(a, g, c, v) == pytest.approx((1 - a ** 4) / ((1 - a) * (g * c + v)))
    with pytest.raises(ValueError, match="acceptance"):
        predicted_speedup(1.5, 3, 0.5)


@pytest.mark.parametrize("a", [0.6, 0.9])
def test_commit_counts_give_the_per_token_acceptance_of_the_formula(a):
    """A drafter that always drafts token 0 (q = [1, 0]) against a target p = [a, 1 - a]: every tested draft is kept
    with probability min(1, p/q) = a, whatever came before. Kept / tested estimates a (the formula's a, which
    predicts tokens per verify); kept / drafted does not (drafts after a rejection are never tested)."""
    rows, g = 40_000, 4
    uniforms = torch.rand(2, rows, g + 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    state = RoundState(torch.zeros(rows, 8 + g + 1, dtype=torch.long), torch.zeros(rows, g + 1, dtype=torch.long),
                       torch.zeros(rows, g + 1), torch.zeros(rows, dtype=torch.long),
                       torch.ones(rows, dtype=torch.bool), torch.zeros(3, dtype=torch.long))
    rules = RoundRules(1.0, 1.0, False, uniforms[0], uniforms[1], torch.tensor([7]), torch.tensor(0), 100, 8)
    hidden = torch.tensor([math.log(a), math.log(1 - a)]).expand(rows, g + 1, 2)
    draft_logprobs = torch.tensor([0.0, -math.inf]).expand(rows, g, 2)
    verify_and_commit(hidden, torch.eye(2), torch.zeros(rows, g, dtype=torch.long), draft_logprobs, state, rules)
    verified, kept, tested = state.counts.tolist()
    assert verified == rows
    tolerance = 4 * math.sqrt(a * (1 - a) / tested)
    assert kept / tested == pytest.approx(a, abs=tolerance)
    assert state.length.float().mean().item() == pytest.approx((1 - a ** (g + 1)) / (1 - a), rel=0.02)  # per verify
    assert kept / (g * rows) < a - 10 * tolerance  # what the acceptance used to be: not the formula's a

    # Drafts after an EOS or past the length limit are not counted. With token 0 the EOS, a row's round ends at its
    # first draft, kept or not: one test per row. With a limit of 2 tokens, a row's second draft is tested only when
    # its first was kept.
    for eos, limit in (([0], 100), ([7], 2)):
        state = state._replace(out_tokens=torch.full((rows, g + 1), 9), length=torch.zeros(rows, dtype=torch.long),
                               alive=torch.ones(rows, dtype=torch.bool), counts=torch.zeros(3, dtype=torch.long))
        verify_and_commit(hidden, torch.eye(2), torch.zeros(rows, g, dtype=torch.long), draft_logprobs, state,
                          rules._replace(eos_ids=torch.tensor(eos), pad=torch.tensor(9), limit=limit))
        _, kept, tested = state.counts.tolist()
        kept_at = (state.out_tokens == 0).long()  # a kept draft (token 0) per position; the resampled token is 1
        second_tested = kept_at[:, 0].sum().item() if limit == 2 else 0
        assert kept == kept_at.sum().item() > 0 and tested == rows + second_tested


# ------------------------------------------------------------------------------------------ the engine, real model

PROMPTS = ["Question: 1+2?", "Q: 33 + 44 - 5 = ?", "Tom has 7 apples.", "x"]
STOPS = list(range(10))
LAYER_GAIN = 8.0


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    path = build_tiny_model(ModelConfig(arch="qwen3", num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2,
                                        intermediate_size=128), root / "qwen3", seed=0)
    model, tokenizer = load_model_and_tokenizer(path)
    with torch.no_grad():  # a peaked output head (few likely completions) and layers that matter (a drafter that
        model.get_output_embeddings().weight.mul_(6.0)  # visibly differs): random init leaves both nearly flat
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(LAYER_GAIN)
            layer.self_attn.o_proj.weight.mul_(LAYER_GAIN)
    return model.eval(), tokenizer


def decode(model, tok, prompts, plan, **kwargs):
    ids, mask = encode_prompts(tok, prompts, "cpu")
    settings = dict(max_new_tokens=16, temperature=1.0, eos_token_id=STOPS, pad_token_id=tok.pad_token_id, seed=5,
                    compact_below=0.0)
    settings.update(kwargs)
    stats = DecodeStats()
    return generate(model, ids, mask, plan, stats=stats, **settings), stats


@pytest.mark.parametrize("skipped", [(1,), (2, 4), (1, 2, 3, 4)])
def test_greedy_speculative_equals_greedy_full_model(model_and_tokenizer, skipped):
    model, tok = model_and_tokenizer
    prompts = [p for p in PROMPTS for _ in range(2)]
    full, _ = decode(model, tok, prompts, SkipPlan(6), greedy=True, eos_token_id=[0])
    spec, stats = decode(model, tok, prompts, SkipPlan(6, skipped), greedy=True, draft_length=3, eos_token_id=[0])
    assert stats.engine == "speculative"
    assert torch.equal(spec.sequences, full.sequences)
    torch.testing.assert_close(spec.behavior_logprobs, full.behavior_logprobs, atol=1e-5, rtol=0)
    assert 0 < stats.accepted_drafts < stats.drafted_tokens  # the drafter is wrong somewhere, so verify mattered


def test_speculative_rows_do_not_depend_on_the_batch(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [p for p in PROMPTS for _ in range(4)]
    plan = SkipPlan(6, (2, 3))
    whole, _ = decode(model, tok, prompts, plan, draft_length=4)
    lengths = whole.completion_mask.sum(1)
    assert int(lengths.min()) < 16 and len(set(lengths.tolist())) >= 3  # rows stop at EOS at many lengths
    compacted, stats = decode(model, tok, prompts, plan, draft_length=4, compact_below=0.9, group_size=4)
    assert stats.compactions >= 1
    assert torch.equal(compacted.sequences, whole.sequences)
    torch.testing.assert_close(compacted.behavior_logprobs, whole.behavior_logprobs, atol=1e-5, rtol=0)
    part, _ = decode(model, tok, prompts[5:11], plan, draft_length=4, row_keys=torch.arange(5, 11))
    width = part.completion_mask.shape[1]
    assert torch.equal(part.completions, whole.completions[5:11, :width])
    # The behaviour log-probs are the full model's: a training forward scores the same values.
    scored = completion_logprobs(model, whole, 1.0, chunked_head=False) * whole.completion_mask
    torch.testing.assert_close(whole.behavior_logprobs, scored, atol=1e-4, rtol=0)


def test_speculative_layer_loops_under_torchscript_decode_the_eager_floats(model_and_tokenizer):
    """By default the drafter's and the verifier's layer loops run under TorchScript (`decode.scripted`); with
    rollout.engine=static_eager they run eagerly. Same kernels: the same tokens and bit-identical log-probs."""
    model, tok = model_and_tokenizer
    prompts = [p for p in PROMPTS for _ in range(4)]
    plan = SkipPlan(6, (1, 3))
    scripted, _ = decode(model, tok, prompts, plan, draft_length=3, compact_below=0.9)
    eager, _ = decode(model, tok, prompts, plan, draft_length=3, compact_below=0.9, engine="static_eager")
    assert torch.equal(scripted.sequences, eager.sequences)
    assert torch.equal(scripted.behavior_logprobs, eager.behavior_logprobs)


def graphed_rounds(model, tok, prompts, plan, step_mode, **kwargs):
    """`speculative_generate` called directly, so that step_mode "graphs" runs on the CPU (`rollout.generate`
    refuses rollout.engine=static_graphs off CUDA): its `capture_graph` replays eagerly there."""
    from nested_reft_ds.speculative import speculative_generate

    ids, mask = encode_prompts(tok, prompts, "cpu")
    settings = dict(max_new_tokens=16, temperature=1.0, top_p=1.0, eos_ids=torch.tensor(STOPS),
                    pad_token_id=tok.pad_token_id, greedy=False, seed=5, row_keys=torch.arange(len(prompts)),
                    group_size=1, compact_below=0.0)
    settings.update(kwargs)
    stats = DecodeStats()
    return speculative_generate(model, ids, mask.long(), plan, step_mode=step_mode, stats=stats, **settings), stats


def test_speculative_graph_path_replays_the_rounds_and_a_new_skip_set_captures_nothing(model_and_tokenizer):
    """The graph path (`SpeculativeGraphs`: the batch padded to a bucket, attention over every cache column, a graph
    per decoder layer, cache, bucket and tokens per row) samples what the scripted rounds sample, with compaction
    (smaller buckets), shared prefill, g = 1 (drafter and verifier both at 2 tokens per row, sharing the round
    inputs) and narrower prompts in the held caches; once the first rollout has captured its shapes, rollouts with
    other skip sets capture nothing, and a new draft length captures only the verify forward of its own width. On
    the CPU the "graphs" replay eagerly; tests/test_gpu.py runs the CUDA capture."""
    from nested_reft_ds import speculative
    from nested_reft_ds.decode import HELD_GRAPHS

    model, tok = model_and_tokenizer
    held = model.__dict__.setdefault(HELD_GRAPHS, {})
    held.pop(speculative.SpeculativeGraphs, None)
    prompts = [p for p in PROMPTS for _ in range(3)]  # 12 rows: bucket 12, then smaller ones after compaction
    narrow = [p for p in ("x", "1+2?", "y z") for _ in range(3)]  # a narrower prompt width than the first rollout's
    captures, new_graphs, holders = [], [], set()
    rollouts = [(prompts, (1, 3), 3, 1), (prompts, (0, 4), 3, 1), (prompts, (2, 3, 4), 3, 1), (prompts, (2,), 2, 1),
                (prompts, (2,), 1, 1), (narrow, (0, 3), 3, 1), (prompts, (1, 3), 3, 3)]
    for rows, skipped, g, group in rollouts:
        plan = SkipPlan(6, skipped)
        kwargs = dict(draft_length=g, compact_below=0.9, group_size=group)
        before = set(getattr(held.get(speculative.SpeculativeGraphs), "graphs", {}))
        graphed, stats = graphed_rounds(model, tok, rows, plan, "graphs", **kwargs)
        scripted, _ = graphed_rounds(model, tok, rows, plan, "scripted", **kwargs)
        assert torch.equal(graphed[0], scripted[0]) and torch.equal(graphed[1], scripted[1]), (skipped, g, group)
        torch.testing.assert_close(graphed[2], scripted[2], atol=1e-5, rtol=0)
        assert stats.verified_rows > 0 and stats.compactions >= 1
        graphs = held[speculative.SpeculativeGraphs]
        holders.add(id(graphs))
        captures.append(stats.captures)
        new_graphs.append(set(graphs.graphs) - before)
        assert stats.captures == len(new_graphs[-1])
    assert len(holders) == 1  # every rollout fitted the first one's buffers
    # Rollout 1 captures a prologue, an epilogue and 6 layers per cache for each (bucket, m) it meets; rollouts 2 and
    # 3 (other skip sets, at buckets rollout 1 met) capture nothing; rollout 4 (g = 2) adds its verify forward's
    # width m = 3, rollout 5 (g = 1) the verifier's layers at m = 2, and otherwise only buckets not met before.
    assert captures[0] >= 2 * (2 + 2 * 6) and captures[1:3] == [0, 0], captures
    seen = {key[-2] for key in new_graphs[0]}
    assert any(key[-1] == 3 for key in new_graphs[3])
    assert all(key[-1] == 3 or key[-2] not in seen for key in new_graphs[3]), new_graphs[3]
    seen |= {key[-2] for key in new_graphs[3]}
    assert any(key[0] == "full" and key[-1] == 2 for key in new_graphs[4])
    assert all((key[0] == "full" and key[-1] == 2) or key[-2] not in seen for key in new_graphs[4]), new_graphs[4]


def test_a_drafter_that_skips_nothing_is_always_accepted(model_and_tokenizer):
    model, tok = model_and_tokenizer
    _, stats = decode(model, tok, PROMPTS, SkipPlan(6), draft_length=3)
    assert stats.drafted_tokens > 0 and stats.accepted_drafts == stats.tested_drafts == stats.drafted_tokens


def enumerate_likely(model, tok, prompt: str, length: int, floor: float) -> dict[tuple[int, ...], float]:
    """Every completion of `length` tokens with probability >= `floor` under the full model at temperature 1."""
    ids, mask = encode_prompts(tok, [prompt], "cpu")
    frontier = {(): 1.0}
    for _ in range(length):
        prefixes = list(frontier)
        sequences = torch.cat([ids.expand(len(prefixes), -1),
                               torch.tensor([list(p) for p in prefixes], dtype=torch.long).view(len(prefixes), -1)],
                              dim=1)
        attention = torch.ones_like(sequences)
        attention[:, :ids.shape[1]] = mask
        with torch.no_grad():
            logits = model(input_ids=sequences, attention_mask=attention).logits[:, -1]
        probs = logits.double().softmax(-1)
        frontier = {prefix + (token,): frontier[prefix] * float(probs[i, token])
                    for i, prefix in enumerate(prefixes) for token in range(probs.shape[1])
                    if frontier[prefix] * float(probs[i, token]) >= floor}
    return frontier


def completion_counts(rollout: Rollout, categories: list[tuple[int, ...]], length: int) -> torch.Tensor:
    index = {sequence: i for i, sequence in enumerate(categories)}
    counts = torch.zeros(len(categories) + 1)
    for row in rollout.completions[:, :length].tolist():
        counts[index.get(tuple(row), len(categories))] += 1
    return counts


@pytest.fixture
def sharper(model_and_tokenizer):
    """The model with its output head scaled by 1.6 more: about a hundred 3-token completions of probability >= 1e-3
    covering 0.8 of the mass (at 1.0 they cover 0.03, at 2.0 thirteen cover 0.97)."""
    model, tok = model_and_tokenizer
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head.mul_(1.6)
    yield model, tok
    with torch.no_grad():
        head.div_(1.6)


def test_speculative_completions_follow_the_full_model_not_the_drafter(sharper):
    model, tok = sharper
    prompt, length, samples, plan = "Q: 33 + 44 - 5 = ?", 3, 6000, SkipPlan(6, (1, 2, 3))
    likely = enumerate_likely(model, tok, prompt, length, floor=1e-3)
    categories = sorted(likely, key=likely.get, reverse=True)
    expected = torch.tensor([likely[c] for c in categories] + [max(1.0 - sum(likely.values()), 0.0)],
                            dtype=torch.float64)
    assert expected[-1] < 0.5 and len(categories) >= 10
    keep = expected * samples >= 5  # chi-square's rule of thumb; the rest join the last bin
    merge = lambda counts: torch.cat([counts[:-1][keep[:-1]], (counts[:-1][~keep[:-1]].sum() + counts[-1])[None]])
    expected = merge(expected)

    kwargs = dict(max_new_tokens=length, eos_token_id=[], row_keys=torch.arange(samples), seed=3)
    spec, stats = decode(model, tok, [prompt] * samples, plan, draft_length=2, group_size=samples, **kwargs)
    acceptance = stats.accepted_drafts / stats.tested_drafts
    assert 0.2 < acceptance < 0.95  # the drafter differs from the target: a test with something to catch
    assert chi_square_pvalue(merge(completion_counts(spec, categories, length)), expected) > 1e-3
    nested, _ = decode(model, tok, [prompt] * samples, plan, **kwargs)  # the drafter's own samples
    assert chi_square_pvalue(merge(completion_counts(nested, categories, length)), expected) < 1e-9
    full, _ = decode(model, tok, [prompt] * samples, SkipPlan(6), **kwargs)  # the target's own samples pass too
    assert chi_square_pvalue(merge(completion_counts(full, categories, length)), expected) > 1e-3
    assert math.isfinite(acceptance)


# --------------------------------------------------------------------------------------------------- the config

SPECULATIVE = ["rollout.mode=speculative", "algorithm.correction=none", "skip.schedule=fixed", "skip.ratio=0.5"]


def test_speculative_config_gives_generate_its_draft_length():
    from nested_reft_ds.config import load_config

    cfg = load_config(None, SPECULATIVE + ["rollout.draft_length=5"])
    assert cfg.rollout.generation.draft_length == 5
    assert load_config(None, ["rollout.draft_length=5"]).rollout.generation.draft_length == 0  # nested mode


@pytest.mark.parametrize("override, message", [
    ("algorithm.correction=token_tis", "'algorithm.correction' has invalid value 'token_tis': expected 'none' with "
                                       "rollout.mode='speculative'"),
    ("skip.schedule=adaptive&skip.target_ess=0.9", "'skip.schedule' has invalid value 'adaptive'"),
    ("rollout.gather=streamed", "'rollout.gather' has invalid value 'streamed'"),
    ("rollout.gather=auto", "'rollout.gather' has invalid value 'auto'"),
    ("rollout.draft_length=0", "'rollout.draft_length' has invalid value 0"),
    ("rollout.draft_length=17", "'rollout.draft_length' has invalid value 17"),
    ("rollout.mode=draft", "'rollout.mode' has invalid value 'draft'"),
    ("rollout.max_draft_length=17", "'rollout.max_draft_length' has invalid value 17"),
    ("rollout.adaptive_draft=true&rollout.draft_length=9", "'rollout.draft_length' has invalid value 9: expected an "
                                                          "integer <= rollout.max_draft_length=8"),
    ("rollout.mode=nested&rollout.adaptive_draft=true&algorithm.correction=token_tis",
     "'rollout.adaptive_draft' has invalid value True: expected false unless rollout.mode='speculative'"),
])
def test_speculative_config_refusals_name_the_key(override, message):
    from nested_reft_ds.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, SPECULATIVE + override.split("&"))


def test_generate_refuses_speculative_lockstep_decoding(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="speculative decoding .* cannot decode in lockstep"):
        decode(model, tok, PROMPTS, SkipPlan(6, (2,)), draft_length=2, all_ranks_done=lambda done: done)


def test_best_draft_length_maximises_the_predicted_speedup():
    from nested_reft_ds.speculative import best_draft_length, predicted_speedup

    for acceptance in (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99):
        for cost in (0.1, 0.25, 0.5, 0.9):
            best = best_draft_length(acceptance, cost, 8)
            speedups = [predicted_speedup(acceptance, g, cost) for g in range(1, 9)]
            assert speedups[best - 1] == max(speedups) and 1 <= best <= 8
    assert best_draft_length(0.0, 0.25, 8) == 1  # nothing is ever accepted: the shortest draft
    assert best_draft_length(1.0, 0.25, 8) == 8  # everything is accepted: the longest
    assert best_draft_length(1.0, 1.0, 8) == 1  # a drafter as costly as the verifier gains nothing: the shortest
    # Longer drafts pay as the acceptance rises and as the drafter gets cheaper.
    assert best_draft_length(0.6, 0.25, 8) < best_draft_length(0.9, 0.25, 8) < best_draft_length(0.97, 0.25, 16)
    assert best_draft_length(0.9, 0.5, 8) < best_draft_length(0.9, 0.1, 8)


def test_draft_lengths_fixed_adaptive_and_resumed():
    from nested_reft_ds.speculative import DraftLengths, best_draft_length

    plan = SkipPlan(8, (0, 2, 4, 6, 7))  # c = 3/8
    fixed = DraftLengths(3, adaptive=False, longest=8)
    fixed.observe(0.99)
    assert fixed.length(plan) == 3
    adaptive = DraftLengths(3, adaptive=True, longest=8)
    assert adaptive.length(plan) == 3  # nothing observed yet
    adaptive.observe(0.9)
    assert adaptive.acceptance == 0.9 and adaptive.length(plan) == best_draft_length(0.9, 3 / 8, 8)
    adaptive.observe(0.5)
    assert adaptive.acceptance == pytest.approx(0.9 + 0.3 * (0.5 - 0.9))
    adaptive.observe(float("nan"))  # a step that drafted nothing says nothing
    assert adaptive.acceptance == pytest.approx(0.78)
    resumed = DraftLengths(3, adaptive=True, longest=8)
    resumed.load_state_dict(adaptive.state_dict())
    assert resumed.length(plan) == adaptive.length(plan) == best_draft_length(0.78, 3 / 8, 8)
    assert resumed.length(SkipPlan(8, (1,))) == best_draft_length(0.78, 7 / 8, 8)  # the step's own kept share


def test_speculative_train_run_single_process_and_its_resume(tmp_path):
    """rollout.mode=speculative through `nested-reft train` (one process, ZeRO-0; subprocesses, so this test's
    process never joins a process group): the logged ratios are 1 (on-policy), the acceptance and tokens per
    verify are logged, the adaptive draft length follows the logged acceptance, the learned skip strategy charges
    the drafter's rejection rate 1 - a to the skipped layers (KL is 0 on-policy), held-out evaluation decodes
    plainly (no drafting), and a run resumed from the step-1 checkpoint drafts the lengths and skips the layers of
    the uninterrupted run (the smoothed acceptance and the layer costs travel in the checkpoint) and samples the same
    completions."""
    from nested_reft_ds.nested.controller import LayerCostTracker
    from nested_reft_ds.speculative import DraftLengths
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    def train(out_dir: Path) -> list[dict]:
        overrides = SPECULATIVE + [
            f"train.output_dir={out_dir}", "model.hidden_size=32", "model.num_layers=4", "model.num_heads=2",
            "model.num_kv_heads=1", "model.intermediate_size=64", "rollout.prompts_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=16", "train.sft_steps=10", "train.steps=3",
            "train.micro_batch_size=2", "rollout.draft_length=6", "rollout.adaptive_draft=true",
            "rollout.max_draft_length=6", "data.eval_problems=3", "logging.tensorboard=false",
            "logging.progress_bar=false", "train.save_every=1", "skip.ratio=0.25", "skip.strategy=learned"]
        proc = subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", "train",
                               *[arg for override in overrides for arg in ("--set", override)]],
                              capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]

    records = train(tmp_path / "a")
    rl = [r for r in records if r["phase"] == "rl"]
    assert len(rl) == 3
    expected = DraftLengths(6, adaptive=True, longest=6)  # replayed from the logged global acceptances
    costs = LayerCostTracker(4)
    for record in rl:
        kept = SkipPlan(4, tuple(record["skipped_layers"]))
        assert record["spec_draft_length"] == expected.length(kept)
        expected.observe(record["spec_acceptance"])
        costs.update(record["skipped_layers"], 1 - record["spec_acceptance"])
        assert [record[f"layer_cost/{layer}"] for layer in range(4)] == pytest.approx(costs.costs(), abs=1e-12)
    assert max(costs.costs()) > 0
    for record in rl:
        assert 0 < record["spec_acceptance"] <= 1 and record["spec_tokens_per_verify"] >= 1
        assert record["spec_predicted_speedup"] > 0
        assert abs(record["ratio_tok_max"] - 1) < 1e-4 and abs(record["kl_behavior_k3"]) < 1e-8
    evals = [r for r in records if r["phase"] == "eval"]
    assert evals and all(len(r["heldout_correct"]) == 3 for r in evals)
    # TorchScript compiles the two phases of a round (draft, verify) once per process, at the first RL step; later
    # steps' skip sets and draft lengths compile nothing (and nothing is captured off CUDA).
    assert [r["decode_compilations_max"] for r in rl] == [2, 0, 0]
    assert all(r["decode_captures_max"] == 0 for r in rl)

    # Resume in a fresh directory from the checkpoint after RL step 0 ("rl_step1": one RL step done).
    resumed_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "base_model", resumed_dir / "base_model")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "rl_step1", resumed_dir / "checkpoints" / "rl_step1")
    (resumed_dir / "checkpoints" / "latest").write_text("rl_step1")
    resumed = [r for r in train(resumed_dir) if r["phase"] == "rl"]
    assert [r["step"] for r in resumed] == [1, 2]
    # A run that lost the smoothed acceptance would draft rollout.draft_length (6) again at its first step.
    assert rl[1]["spec_draft_length"] != 6
    for replayed, uninterrupted in zip(resumed, rl[1:]):
        for key in ("spec_draft_length", "spec_drafted_tokens", "spec_acceptance", "reward_mean", "loss",
                    "skipped_layers", "layer_cost/1"):
            assert replayed[key] == uninterrupted[key], key


def test_bench_speculative_prints_measured_and_predicted_speedups():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", "bench", "speculative", "--ratios", "0.5",
                           "--drafts", "2,3", "--repeats", "1", "--prompts", "1", "--group-size", "2",
                           "--set", "rollout.max_new_tokens=12", "--engine", "static_eager", "--device", "cpu",
                           "--dtype", "float32"], capture_output=True, text=True, timeout=600, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "engine static_eager, float32 on 1 thread(s)" in lines[0]
    assert any(line.startswith("full ") for line in lines) and any(line.startswith("nested ") for line in lines)
    speculative = [line.split() for line in lines if line.startswith("speculative ") and "benchmark:" not in line]
    assert [row[2] for row in speculative] == ["2", "3"]
    for row in speculative:  # tokens/s, x full, rows per forward, acceptance, tokens/verify, c, v, predicted,
        numbers = [float(value) for value in row[4:]]  # predicted (ideal), share of the time in the phases
        assert len(numbers) == 10 and all(value > 0 for value in numbers)
        assert numbers[2] <= 2 and numbers[3] <= 1 and numbers[9] <= 1  # 1 problem x G = 2 rows
    bad = subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", "bench", "speculative", "--drafts", "0"],
                         capture_output=True, text=True, timeout=600, cwd=repo)
    assert bad.returncode != 0 and "--drafts must be integers >= 1" in bad.stderr
    graphs = subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", "bench", "speculative", "--engine",
                             "static_graphs"], capture_output=True, text=True, timeout=600, cwd=repo)
    assert graphs.returncode != 0 and "--engine static_graphs needs --device cuda" in graphs.stderr
