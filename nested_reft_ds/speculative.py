"""Self-speculative sampling: the nested model drafts, the full model verifies (`rollout.mode: speculative`).

Each round, every row drafts g tokens with the model viewed through the step's skip plan (the nested behaviour
model of `rollout.mode: nested`), the full model scores all g + 1 positions in one forward, and the speculative
sampling rule (`sampling.speculative_verify`) keeps a prefix of the drafts and draws one more token. The
completions are distributed exactly as the full model's samples, so training on them is on-policy: the behaviour
log-probs are the full model's (the verify forward's), with no importance weight to correct.

How a round runs, per row (rows advance by different numbers of tokens, so every position is per row):
- The two models keep separate static KV caches (the drafter's kept layers see different hidden states than the
  full model's at the same layer). Columns are shared by all rows: the prompts are left padded to one width, and
  completion token t of every row lives in column P + t; a row's rotary position is its column minus its padding.
- With t tokens committed, the full model's cache is valid through token t - 2 and the drafter's through t - 3 or
  t - 2 (the drafter never feeds its own last draft when all are accepted). So the drafter's first step feeds
  tokens t - 2 and t - 1 (rewriting a valid entry costs nothing extra in an overhead-bound step), its next g - 1
  steps one draft each; the verify forward feeds token t - 1 and the g drafts. Rejected drafts' cache entries lie
  beyond the new frontier and are overwritten by the next round: rolling back is moving the row's length.
- Randomness is keyed per (row, completion position) with three streams: the draft's sample, the acceptance test
  and the resample (or bonus) draw. A position is drafted, tested and resampled at most once, so every decision
  reads fresh uniforms, and a row's tokens do not depend on the rest of the batch, the world size or compaction.
- `stats.draft_s` / `stats.verify_s` time the two phases on the host clock (exact on the CPU; on a GPU, which
  runs ahead of the host, only their sum is).
- The host reads the rows' lengths once per round (the attention spans the filled columns only, and the loop stops
  when every row has); finished rows leave the batch when at most `compact_below` of it is alive.

Cost model (reported by `nested-reft bench decode` next to the measurement): with per-token acceptance a, draft
length g, drafter cost c per token and verify cost v, both relative to one full decode step, the expected
speed-up over full decoding is (1 - a^(g+1)) / ((1 - a) (g c + v)) (`predicted_speedup`).

This engine runs the functional layer step of decode.py (qwen2 / qwen3 / llama / mistral). Each round is two calls
under TorchScript, like the static engine's decode steps (`rollout.engine=static_eager`: eagerly): `draft_phase`
(the drafter's g forwards and samples) and `verify_phase` (the verify forward, the rule and the commit). With
`rollout.engine=static_graphs` (CUDA) every forward replays CUDA graphs (`SpeculativeGraphs`): one per decoder
layer, cache, batch bucket and tokens per row (the drafter's 2 and 1, the verify forward's g + 1), captured on
first use and never for a new skip set; the batch is padded to its bucket and attention spans every cache column,
the unseen ones masked.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .config import MAX_DRAFT_LENGTH
from .decode import (COLUMN_BUCKET, COMPILATIONS, DecodeStats, DecoderShape, EagerReplay, GraphWeights, LayerWeights,
                     StaticKVCache, UnsupportedModelError, attention_probs, batch_bucket, capture_graph, decoder_shape,
                     held_graphs, layer_weights, outer_weights, output_and_mlp, rms_norm, rotary_tables, rotated_qkv,
                     scripted, text_config)
from .nested import SkipPlan, decoder_layers, nested_view
from .sampling import keyed_uniform_table, sample_tokens, sampling_logprobs, speculative_verify

# Uniform streams of one rollout: the draft's sample, the acceptance test and the resample / bonus draw per position.
_DRAFT, _ACCEPT, _RESAMPLE = range(3)
SPECULATIVE_STEP_MODES = ("scripted", "eager", "graphs")


def predicted_speedup(acceptance: float, draft_length: int, draft_cost: float, verify_cost: float = 1.0) -> float:
    """Expected tokens per unit of full-decode time: (1 - a^(g+1)) / ((1 - a) (g c + v)).

    `acceptance` a: the probability a draft is kept (given the earlier ones were); `draft_cost` c and `verify_cost`
    v: one drafter step and one verify forward, each relative to one decode step of the full model."""
    if not 0 <= acceptance <= 1 or draft_length < 1 or draft_cost < 0 or verify_cost <= 0:
        raise ValueError(f"predicted_speedup: acceptance {acceptance} in [0, 1], draft_length {draft_length} >= 1, "
                         f"draft_cost {draft_cost} >= 0 and verify_cost {verify_cost} > 0 expected")
    tokens_per_round = draft_length + 1 if acceptance == 1 else (1 - acceptance ** (draft_length + 1)) / (1 - acceptance)
    return tokens_per_round / (draft_length * draft_cost + verify_cost)


def best_draft_length(acceptance: float, draft_cost: float, longest: int, verify_cost: float = 1.0) -> int:
    """The draft length g in [1, `longest`] with the highest `predicted_speedup` (the shortest among equals)."""
    return max(range(1, longest + 1), key=lambda g: (predicted_speedup(acceptance, g, draft_cost, verify_cost), -g))


class DraftLengths:
    """The draft length of each RL step: rollout.draft_length, or with rollout.adaptive_draft the `best_draft_length`
    at the smoothed acceptance of the earlier steps and the step's kept share of the layers (the first step, with
    nothing observed yet, drafts rollout.draft_length).

    Pure and deterministic in its inputs: the training loop feeds it the all-reduced acceptance, so every rank
    chooses the same g (keyed sampling then makes the completions independent of the world size), and it
    round-trips through `state_dict()` so a resumed run continues the same sequence."""

    SMOOTHING = 0.3  # weight of the newest step in the moving average of the acceptance

    def __init__(self, draft_length: int, adaptive: bool, longest: int):
        self.draft_length, self.adaptive, self.longest = draft_length, adaptive, longest
        self.acceptance: float | None = None

    def length(self, plan: SkipPlan) -> int:
        if not self.adaptive or self.acceptance is None:
            return self.draft_length
        return best_draft_length(self.acceptance, len(plan.kept) / plan.num_layers, self.longest)

    def observe(self, acceptance: float) -> None:
        """Feed one step's global acceptance rate; a value outside [0, 1] (NaN) is ignored. The training loop
        feeds only steps that drafted something (rl_step)."""
        if not 0.0 <= acceptance <= 1.0:
            return
        previous = self.acceptance
        self.acceptance = acceptance if previous is None else previous + self.SMOOTHING * (acceptance - previous)

    def state_dict(self) -> dict:
        return {"acceptance": self.acceptance}

    def load_state_dict(self, state: dict) -> None:
        self.acceptance = state["acceptance"]


class ForwardWeights(NamedTuple):
    """What a forward of some decoder layers reads (the drafter's kept layers, or all of them for the verifier): the
    layers' weights, their caches' keys and values [b Hkv, S, D] at the batch's rows, the embedding, the final
    norm, the rotary tables and the norms' eps."""
    layers: list[LayerWeights]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    embed: torch.Tensor
    final_norm: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor
    eps: torch.Tensor
    minimum: float  # the dtype's lowest value: the additive mask of a key a query may not see


class _CachedLayers:
    """A forward's `ForwardWeights` for each batch size: the caches' views are of their leading slots, which
    compaction rewrites in place, so they are made once per size."""

    def __init__(self, weights: list[LayerWeights], cache: StaticKVCache, embed: torch.Tensor,
                 final_norm: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, eps: torch.Tensor):
        self.weights, self.cache = weights, cache
        self.outer = (embed, final_norm, cos_table, sin_table, eps, torch.finfo(embed.dtype).min)
        self.sizes: dict[int, ForwardWeights] = {}

    def at(self, rows: int) -> ForwardWeights:
        if rows not in self.sizes:
            keys, values = (list(views) for views in zip(*self.cache.layer_views(rows)))
            self.sizes[rows] = ForwardWeights(self.weights, keys, values, *self.outer)
        return self.sizes[rows]


def multi_token_forward(tokens: torch.Tensor, columns: torch.Tensor, padding: torch.Tensor, key_ok: torch.Tensor,
                        width: int, layers: ForwardWeights, shape: DecoderShape) -> torch.Tensor:
    """A forward of `layers` over m new tokens per row at per-row cache columns: embedding, rotary, the layer steps
    writing their keys and values into the caches, the final norm. tokens, columns [b, m] (the cache column each
    token's key goes to), `padding` [b] (a row's left padding: its rotary position is column - padding), `key_ok`
    [b, S] (columns a query may see: real prompt tokens and completion columns), `width` (attention spans columns
    [0, width)) -> final hidden states [b, m, H]."""
    rows, m = tokens.shape[0], tokens.shape[1]
    x, cos, sin, write_index, mask = forward_inputs(tokens, columns, padding, key_ok, width, layers.embed,
                                                    layers.cos_table, layers.sin_table, shape,
                                                    layers.keys[0].shape[1], layers.minimum)
    x = multi_token_layer_steps(x, layers.layers, layers.keys, layers.values, write_index, width, cos, sin, mask,
                                shape, layers.eps, rows, m)
    return rms_norm(x, layers.final_norm, layers.eps).view(rows, m, -1)


def draft_sample(hidden: torch.Tensor, head_t: torch.Tensor, temperature: float, top_p: float, greedy: bool,
                 uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafter's next token per row from its final hidden states [b, H], and the sampling distribution it was
    drawn from: -> token [b], log-probs [b, V] (the q of the speculative rule)."""
    logprobs = sampling_logprobs(torch.mm(hidden, head_t), temperature, top_p)
    token = logprobs.argmax(-1) if greedy else sample_tokens(logprobs, uniforms)
    return token, logprobs


def draft_phase(g: int, sequence: torch.Tensor, column: torch.Tensor, padding: torch.Tensor, key_ok: torch.Tensor,
                width: int, length: torch.Tensor, draft_uniforms: torch.Tensor, head_t: torch.Tensor,
                drafter: ForwardWeights, shape: DecoderShape, temperature: float, top_p: float,
                greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafter's g tokens per row: its first step feeds tokens t - 2 and t - 1 (`column` [b]: where token t
    goes), each later one the previous draft; `width`: the columns the first step attends over. -> drafts [b, g],
    their distributions [b, g, V]. (`_graphed_draft_phase` is the same loop over graph replays.)"""
    rows = sequence.shape[0]
    drafts = torch.empty((rows, g), dtype=torch.long, device=sequence.device)
    draft_logprobs = torch.empty((rows, g, head_t.shape[1]), device=sequence.device)
    feed = torch.stack([column - 2, column - 1], dim=1)
    hidden = multi_token_forward(sequence.gather(1, feed), feed, padding, key_ok, width, drafter, shape)[:, -1]
    for i in range(g):
        token, logprobs = draft_sample(hidden, head_t, temperature, top_p, greedy,
                                       draft_uniforms.gather(1, (length + i)[:, None]).squeeze(1))
        drafts[:, i], draft_logprobs[:, i] = token, logprobs
        if i + 1 < g:
            feed = (column + i)[:, None]
            hidden = multi_token_forward(drafts[:, i:i + 1], feed, padding, key_ok, width + i + 1, drafter,
                                         shape)[:, 0]
    return drafts, draft_logprobs


class RoundState(NamedTuple):
    """Per slot, what the rounds update in place: the token sequence by cache column [b, S], the completion's tokens
    and full-model log-probs by position [b, W], the committed length [b] and whether the row still decodes [b];
    `counts` [3]: verified alive rows, the drafts they kept and the drafts the rule tested (each kept one and the
    first rejected one, up to the row's EOS and length limit), summed over the rounds."""
    sequence: torch.Tensor
    out_tokens: torch.Tensor
    out_logprobs: torch.Tensor
    length: torch.Tensor
    alive: torch.Tensor
    counts: torch.Tensor


class RoundRules(NamedTuple):
    """The fixed settings of the rounds: sampling (temperature, top_p, greedy), the per-slot uniforms of the
    acceptance test and of the resample / bonus draw [b, W], the EOS ids, the pad token (0-d), the completion length
    limit and the prompt width."""
    temperature: float
    top_p: float
    greedy: bool
    accept_uniforms: torch.Tensor
    resample_uniforms: torch.Tensor
    eos_ids: torch.Tensor
    pad: torch.Tensor
    limit: int
    prompt_width: int


def verify_and_commit(hidden: torch.Tensor, head_t: torch.Tensor, drafts: torch.Tensor, draft_logprobs: torch.Tensor,
                      state: RoundState, rules: RoundRules) -> None:
    """The speculative rule on the verifier's final hidden states [b, g + 1, H] at token t - 1 and the drafts, then
    the commit: the kept drafts and the new token enter `state`, up to the first EOS and the length limit."""
    rows, g = drafts.shape[0], drafts.shape[1]
    target_logprobs = sampling_logprobs(torch.mm(hidden.flatten(0, 1), head_t), rules.temperature,
                                        rules.top_p).view(rows, g + 1, -1)
    length, alive = state.length, state.alive
    offsets = torch.arange(g + 1, device=drafts.device)
    positions = length[:, None] + offsets  # completion positions the round decides, [b, g + 1]
    accepted, next_token = speculative_verify(
        target_logprobs, draft_logprobs, drafts, rules.accept_uniforms.gather(1, positions[:, :g]),
        rules.resample_uniforms.gather(1, positions), greedy=rules.greedy)
    candidates = torch.cat([drafts, drafts[:, :1]], dim=1).scatter_(1, accepted[:, None], next_token[:, None])
    candidate_logprobs = target_logprobs.gather(-1, candidates[..., None]).squeeze(-1)
    valid = (offsets <= accepted[:, None]) & (positions < rules.limit) & alive[:, None]
    is_eos = torch.isin(candidates, rules.eos_ids) & valid
    first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), torch.full_like(accepted, g + 1))
    valid &= offsets <= first_eos[:, None]
    state.out_tokens.scatter_(1, positions, torch.where(valid, candidates, rules.pad))
    state.out_logprobs.scatter_(1, positions, torch.where(valid, candidate_logprobs, torch.zeros_like(
        candidate_logprobs)))
    state.sequence.scatter_(1, rules.prompt_width + positions, torch.where(valid, candidates, rules.pad))
    # The rule tested each committed draft position (the kept ones and the first rejected one); positions after an
    # EOS or past the limit are left out: their drafts followed a context the full model never continues.
    tested = valid[:, :g]
    state.counts.add_(torch.stack([alive.sum(), (tested & (offsets[:g] < accepted[:, None])).sum(), tested.sum()]))
    length.add_(valid.sum(1))
    alive.logical_and_(torch.logical_not(is_eos.any(1)) & (length < rules.limit))


def verify_phase(drafts: torch.Tensor, draft_logprobs: torch.Tensor, column: torch.Tensor, padding: torch.Tensor,
                 key_ok: torch.Tensor, width: int, head_t: torch.Tensor, verifier: ForwardWeights,
                 shape: DecoderShape, state: RoundState, rules: RoundRules) -> None:
    """The full model over token t - 1 and the g drafts (attending over `width` columns), then
    `verify_and_commit`."""
    g = drafts.shape[1]
    feed = column[:, None] - 1 + torch.arange(g + 1, device=drafts.device)
    hidden = multi_token_forward(torch.cat([state.sequence.gather(1, feed[:, :1]), drafts], dim=1), feed, padding,
                                 key_ok, width, verifier, shape)
    verify_and_commit(hidden, head_t, drafts, draft_logprobs, state, rules)


def forward_inputs(tokens: torch.Tensor, columns: torch.Tensor, padding: torch.Tensor, key_ok: torch.Tensor,
                   width: int, embed: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                   shape: DecoderShape, cache_columns: int,
                   minimum: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every layer of a forward over tokens [b, m] at cache `columns` [b, m] reads (`multi_token_forward` has
    the arguments): the embedded tokens x [b m, H], their rotary cos / sin [b m, 1, D], where their keys go in a
    layer's cache viewed as [b Hkv S, D] (`write_index` [b m Hkv]), and the additive attention mask
    [b Hkv, m G, width] (a query sees the real columns up to its own; `minimum`, the dtype's lowest value, where
    it may not)."""
    rows, m = tokens.shape[0], tokens.shape[1]
    kv_heads, groups = shape.num_kv_heads, shape.num_heads // shape.num_kv_heads
    x = F.embedding(tokens.reshape(-1), embed)  # [b m, H]
    positions = (columns - padding[:, None]).reshape(-1)
    cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
    heads = torch.arange(kv_heads, device=tokens.device)
    slots = torch.arange(rows, device=tokens.device)[:, None, None] * kv_heads + heads  # [b, 1, Hkv]
    write_index = (slots * cache_columns + columns[:, :, None]).reshape(-1)
    visible = (torch.arange(width, device=tokens.device) <= columns[:, :, None]) & key_ok[:, None, :width]
    additive = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible, minimum)
    mask = additive[:, None, :, None, :].expand(rows, kv_heads, m, groups, width).reshape(
        rows * kv_heads, m * groups, width)
    return x, cos, sin, write_index, mask


@dataclass
class _RoundInputs:
    """The fixed-address inputs and outputs of the graphs of one (batch bucket, tokens per row m)."""
    tokens: torch.Tensor       # [b, m]
    columns: torch.Tensor      # [b, m]
    padding: torch.Tensor      # [b]
    key_ok: torch.Tensor       # [b, S]
    x: torch.Tensor            # [b m, H] the residual stream, updated in place by each layer's graph
    cos: torch.Tensor          # [b m, 1, D]
    sin: torch.Tensor          # [b m, 1, D]
    write_index: torch.Tensor  # [b m Hkv]
    mask: torch.Tensor         # [b Hkv, m G, S]
    hidden: torch.Tensor       # [b m, H] the final norm's output


class SpeculativeGraphs:
    """CUDA graphs of the speculative engine's forwards (`rollout.engine=static_graphs`), kept on the model across
    rollouts.

    Per (batch bucket, m tokens per row): a prologue graph (`forward_inputs` into fixed buffers), one graph per
    decoder layer and cache (`multi_token_layer_step` over every cache column, the unseen ones masked) and an
    epilogue (the final norm). The drafter's forwards run at m = 2 (its first step of a round) and m = 1, the verify
    forward at m = g + 1. Both caches (the drafter's and the full model's) keep a slot per decoder layer and all
    layers of a cache are captured on its first use of a (bucket, m), so a new skip set captures nothing: a rollout
    replays its kept layers' graphs on the drafter's cache and every layer's on the full model's. A rollout needing
    more rows, columns or other shapes rebuilds everything (counted as captures).

    Memory, held on the model between rollouts (training included): a copy of every layer's weights and two KV
    caches of every layer at the largest bucket and column count seen; a run whose evaluation decodes with the
    static engine's graphs (`DecodeGraphs`) holds that holder's copy and cache too."""

    def __init__(self, model: torch.nn.Module, shape: DecoderShape, rows: int, columns: int, template: LayerWeights,
                 num_layers: int, embed: torch.Tensor):
        device, dtype = embed.device, embed.dtype
        self.shape, self.rows, self.columns, self.num_layers = shape, rows, columns, num_layers
        self.caches = {name: StaticKVCache(num_layers, rows, shape.num_kv_heads, columns, shape.head_dim, dtype,
                                           device) for name in ("draft", "full")}
        self.params = GraphWeights(template, num_layers, embed, shape.hidden_size)
        self.cos_table, self.sin_table = rotary_tables(model, columns, dtype, device)
        self.eps = torch.tensor(shape.rms_norm_eps, device=device)
        self.inputs: dict[tuple[int, int], _RoundInputs] = {}
        self.graphs: dict[tuple, torch.cuda.CUDAGraph | EagerReplay] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def round_inputs(self, bucket: int, m: int) -> _RoundInputs:
        if (bucket, m) not in self.inputs:
            shape, device, dtype = self.shape, self.params.embed.device, self.params.embed.dtype
            tokens, kv_heads = bucket * m, shape.num_kv_heads
            self.inputs[bucket, m] = _RoundInputs(
                tokens=torch.zeros((bucket, m), dtype=torch.long, device=device),
                columns=torch.zeros((bucket, m), dtype=torch.long, device=device),
                padding=torch.zeros(bucket, dtype=torch.long, device=device),
                key_ok=torch.zeros((bucket, self.columns), dtype=torch.bool, device=device),
                x=torch.zeros((tokens, shape.hidden_size), dtype=dtype, device=device),
                cos=torch.zeros((tokens, 1, shape.head_dim), dtype=dtype, device=device),
                sin=torch.zeros((tokens, 1, shape.head_dim), dtype=dtype, device=device),
                write_index=torch.zeros(tokens * kv_heads, dtype=torch.long, device=device),
                mask=torch.zeros((bucket * kv_heads, m * (shape.num_heads // kv_heads), self.columns), dtype=dtype,
                                 device=device),
                hidden=torch.zeros((tokens, shape.hidden_size), dtype=dtype, device=device))
        return self.inputs[bucket, m]

    def ensure(self, cache: str, bucket: int, m: int) -> int:
        """Capture the graphs `cache`'s forwards at (bucket, m) replay unless they exist; returns the number captured.
        The round inputs must hold this call's tokens, columns, padding and visible keys: the layers' warm-up runs
        write keys at those positions in every layer of the cache, which the replay that follows overwrites in the
        layers it runs (the others' entries there are never read: a rollout writes every completion column of a
        layer before attending to it)."""
        inputs, shape = self.inputs[bucket, m], self.shape
        captured = 0

        def prologue():
            for target, value in zip((inputs.x, inputs.cos, inputs.sin, inputs.write_index, inputs.mask),
                                     forward_inputs(inputs.tokens, inputs.columns, inputs.padding, inputs.key_ok,
                                                    self.columns, self.params.embed, self.cos_table, self.sin_table,
                                                    shape, self.columns, torch.finfo(self.params.embed.dtype).min)):
                target.copy_(value)

        def epilogue():
            inputs.hidden.copy_(rms_norm(inputs.x, self.params.final_norm, self.eps))

        for name, fn in (("prologue", prologue), ("epilogue", epilogue)):
            if (name, bucket, m) not in self.graphs:
                self.graphs[name, bucket, m] = capture_graph(fn, self.pool)
                captured += 1
        if (cache, 0, bucket, m) not in self.graphs:
            # The drafter and the verifier share the round inputs of an m (g = 1: both at m = 2): recompute the
            # derived inputs from this call's tokens, or the warm-ups would write the other forward's keys.
            self.graphs["prologue", bucket, m].replay()
            for index, (keys, values) in enumerate(self.caches[cache].layer_views(bucket)):
                def layer(weights=self.params.layers[index], keys=keys, values=values):
                    inputs.x.copy_(multi_token_layer_step(inputs.x, weights, keys, values, inputs.write_index,
                                                          self.columns, inputs.cos, inputs.sin, inputs.mask, shape,
                                                          self.eps, bucket, m))
                self.graphs[cache, index, bucket, m] = capture_graph(layer, self.pool)
                captured += 1
        return captured

    def replay(self, cache: str, layers: list[int], bucket: int, m: int) -> torch.Tensor:
        """The forward of `layers` over the round inputs at (bucket, m) -> final hidden states [b m, H] (a buffer the
        next forward at these shapes reuses)."""
        self.graphs["prologue", bucket, m].replay()
        for index in layers:
            self.graphs[cache, index, bucket, m].replay()
        self.graphs["epilogue", bucket, m].replay()
        return self.inputs[bucket, m].hidden


class _GraphedForward:
    """`multi_token_forward` replayed from `SpeculativeGraphs`: the batch padded to its bucket (padding slots repeat
    the first row and write into cache slots no row uses), attention over every cache column."""

    def __init__(self, graphs: SpeculativeGraphs, cache: str, layers: list[int], stats: DecodeStats):
        self.graphs, self.cache, self.layers, self.stats = graphs, cache, list(layers), stats

    def __call__(self, tokens: torch.Tensor, columns: torch.Tensor, padding: torch.Tensor, key_ok: torch.Tensor,
                 width: int) -> torch.Tensor:
        rows, m = tokens.shape
        bucket = batch_bucket(rows)
        inputs = self.graphs.round_inputs(bucket, m)
        for target, value in ((inputs.tokens, tokens), (inputs.columns, columns), (inputs.padding, padding),
                              (inputs.key_ok, key_ok)):
            target[:rows] = value
            target[rows:] = value[:1]
        self.stats.captures += self.graphs.ensure(self.cache, bucket, m)
        return self.graphs.replay(self.cache, self.layers, bucket, m).view(bucket, m, -1)[:rows]


def _graphed_draft_phase(drafter: _GraphedForward, g: int, sequence: torch.Tensor, column: torch.Tensor,
                         padding: torch.Tensor, key_ok: torch.Tensor, width: int, length: torch.Tensor,
                         draft_uniforms: torch.Tensor, head_t: torch.Tensor, temperature: float, top_p: float,
                         greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`draft_phase` with the drafter's forwards replayed from graphs (a replay is a host call, which TorchScript
    cannot make)."""
    rows = sequence.shape[0]
    drafts = torch.empty((rows, g), dtype=torch.long, device=sequence.device)
    draft_logprobs = torch.empty((rows, g, head_t.shape[1]), device=sequence.device)
    feed = torch.stack([column - 2, column - 1], dim=1)
    hidden = drafter(sequence.gather(1, feed), feed, padding, key_ok, width)[:, -1]
    for i in range(g):
        drafts[:, i], draft_logprobs[:, i] = draft_sample(hidden, head_t, temperature, top_p, greedy,
                                                          draft_uniforms.gather(1, (length + i)[:, None]).squeeze(1))
        if i + 1 < g:
            feed = (column + i)[:, None]
            hidden = drafter(drafts[:, i:i + 1], feed, padding, key_ok, width + i + 1)[:, 0]
    return drafts, draft_logprobs


def multi_token_layer_steps(x: torch.Tensor, weights: list[LayerWeights], keys: list[torch.Tensor],
                            values: list[torch.Tensor], write_index: torch.Tensor, width: int, cos: torch.Tensor,
                            sin: torch.Tensor, mask: torch.Tensor, shape: DecoderShape, eps: torch.Tensor, rows: int,
                            m: int) -> torch.Tensor:
    """`multi_token_layer_step` through the layers in order (the i-th cache with the i-th weights)."""
    for i in range(len(weights)):
        x = multi_token_layer_step(x, weights[i], keys[i], values[i], write_index, width, cos, sin, mask, shape, eps,
                                   rows, m)
    return x


def multi_token_layer_step(x: torch.Tensor, w: LayerWeights, keys: torch.Tensor, values: torch.Tensor,
                            write_index: torch.Tensor, width: int, cos: torch.Tensor, sin: torch.Tensor,
                            mask: torch.Tensor, shape: DecoderShape, eps: torch.Tensor, rows: int,
                            m: int) -> torch.Tensor:
    """One decoder layer over m tokens per row: x [b m, H] -> [b m, H]. The tokens' keys and values go to rows
    `write_index` of `keys` / `values` [b Hkv, S, D] viewed as [b Hkv S, D]; attention spans columns [0, width) under
    `mask` [b Hkv, m G, width]."""
    kv_heads, head_dim = shape.num_kv_heads, shape.head_dim
    groups = shape.num_heads // kv_heads
    query, key, value = rotated_qkv(x, w, cos, sin, shape, eps)  # [b m Hkv, G, D], [b m, Hkv, D] x 2
    keys.view(-1, head_dim).index_copy_(0, write_index, key.reshape(-1, head_dim))
    values.view(-1, head_dim).index_copy_(0, write_index, value.reshape(-1, head_dim))
    query = query.view(rows, m, kv_heads, groups, head_dim).transpose(1, 2).reshape(rows * kv_heads, m * groups,
                                                                                     head_dim)
    scores = torch.baddbmm(mask, query, keys[:, :width].transpose(1, 2), alpha=head_dim ** -0.5)
    attended = torch.bmm(attention_probs(scores), values[:, :width])  # [b Hkv, m G, D]
    attended = attended.view(rows, kv_heads, m, groups, head_dim).transpose(1, 2).reshape(
        rows * m, shape.num_heads * head_dim)
    return output_and_mlp(x, w, attended, eps)


@torch.no_grad()
def speculative_generate(model: torch.nn.Module, input_ids: torch.Tensor, prompt_mask: torch.Tensor, plan: SkipPlan,
                         *, draft_length: int, max_new_tokens: int, temperature: float, top_p: float,
                         eos_ids: torch.Tensor, pad_token_id: int, greedy: bool, seed: int, row_keys: torch.Tensor,
                         group_size: int, compact_below: float, step_mode: str = "scripted",
                         stats: DecodeStats | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, completion mask and the full model's log-probs [B, max_new_tokens] of the sampled tokens
    (`rollout.generate`'s contract, arguments checked there): completions drawn from the full model by
    self-speculative sampling with `plan`'s nested model as drafter. Every layer's weights must be whole (under
    ZeRO-3 gather every layer: the verifier runs them all). `step_mode`: "scripted" runs the round's two phases under
    TorchScript (`decode.scripted`), "eager" runs them eagerly (`rollout.engine=static_eager`), "graphs" replays
    `SpeculativeGraphs` (`rollout.engine=static_graphs`; off CUDA the graphs replay eagerly, see
    `decode.capture_graph`)."""
    if not 1 <= draft_length <= MAX_DRAFT_LENGTH:
        raise ValueError(f"speculative decoding: draft_length must be in [1, {MAX_DRAFT_LENGTH}], got {draft_length}")
    if step_mode not in SPECULATIVE_STEP_MODES:
        raise ValueError(f"speculative decoding: step_mode must be one of {SPECULATIVE_STEP_MODES}, got {step_mode!r}")
    stats = stats if stats is not None else DecodeStats()
    shape = decoder_shape(model)
    g, limit = draft_length, max_new_tokens
    batch_size, prompt_width = input_ids.shape
    device = input_ids.device
    columns = prompt_width + limit + g + 1  # the last verify of a row at `limit` tokens reaches column P + limit + g
    if shape.sliding_window is not None and columns > shape.sliding_window:
        raise UnsupportedModelError(f"speculative decoding: {columns} columns reach the sliding window "
                                    f"({shape.sliding_window})")
    parent, attr = decoder_layers(model)
    all_layers = getattr(parent, attr)
    weights = [layer_weights(layer, shape, f"layers.{i}") for i, layer in enumerate(all_layers)]
    embed, final_norm, head = outer_weights(model)
    head_t = head.t()
    dtype = embed.dtype

    # Prefill both models over the prompts (one per group with shared prefill); the full model's last logits give
    # each row's first token.
    shared = group_size > 1
    prefill_ids = input_ids[::group_size] if shared else input_ids
    prefill_mask = prompt_mask[::group_size] if shared else prompt_mask
    positions = (prefill_mask.cumsum(-1) - 1).clamp(min=0)
    sources = torch.arange(batch_size, device=device) // group_size if shared else torch.arange(batch_size,
                                                                                                  device=device)
    graphs = None
    if step_mode == "graphs":  # fixed addresses: caches with a slot per decoder layer, every column rounded up
        columns = -(-columns // COLUMN_BUCKET) * COLUMN_BUCKET
        graphs = held_graphs(SpeculativeGraphs, model, shape, batch_bucket(batch_size), columns, weights[0],
                             len(all_layers), embed)
        graphs.params.load(dict(enumerate(weights)), embed, final_norm, head)
        full_cache, draft_cache, columns = graphs.caches["full"], graphs.caches["draft"], graphs.columns
        draft_slots = list(plan.kept)  # the drafter's i-th layer lives in its decoder layer's slot
    else:
        full_cache = StaticKVCache(len(all_layers), batch_size, shape.num_kv_heads, columns, shape.head_dim, dtype,
                                   device)
        draft_cache = StaticKVCache(len(plan.kept), batch_size, shape.num_kv_heads, columns, shape.head_dim, dtype,
                                    device)
        draft_slots = list(range(len(plan.kept)))
    for cache, view_plan, slots in ((full_cache, SkipPlan(len(all_layers)), range(len(all_layers))),
                                    (draft_cache, plan, draft_slots)):
        with nested_view(model, view_plan):
            prefill = DynamicCache(config=text_config(model))
            out = model(input_ids=prefill_ids, attention_mask=prefill_mask, position_ids=positions, cache=prefill,
                        use_cache=True, logits_to_keep=1)
        for slot, layer in zip(slots, prefill.layers):
            cache.fill(slot, layer.keys, layer.values, sources)
        if cache is full_cache:
            first_logits = out.logits[:, -1].index_select(0, sources)
        del prefill, out
    stats.prefill_rows += 2 * prefill_ids.shape[0]
    compilations_before = COMPILATIONS[0]
    if graphs is not None:
        full = _GraphedForward(graphs, "full", range(len(all_layers)), stats)
        draft = _GraphedForward(graphs, "draft", plan.kept, stats)
    else:
        cos_table, sin_table = rotary_tables(model, columns, dtype, device)
        eps = torch.tensor(shape.rms_norm_eps, device=device)
        full = _CachedLayers(weights, full_cache, embed, final_norm, cos_table, sin_table, eps)
        draft = _CachedLayers([weights[i] for i in plan.kept], draft_cache, embed, final_norm, cos_table, sin_table,
                              eps)
        script = step_mode == "scripted"
        run_draft_phase = scripted(draft_phase) if script else draft_phase
        run_verify_phase = scripted(verify_phase) if script else verify_phase
    stats.compilations += COMPILATIONS[0] - compilations_before  # the scripted phases, once per process

    # Per-slot state (slots are the rows still in the batch; `slot_rows` maps them to output rows).
    width_out = limit + g + 1
    # Three streams per position: uniform (row, t, stream) is keyed position 3 t + stream of the row.
    uniforms = list(keyed_uniform_table(seed, row_keys, 3 * width_out).view(batch_size, width_out, 3).unbind(-1))
    slot_rows = torch.arange(batch_size, device=device)
    padding = prompt_width - prompt_mask.long().sum(-1)
    key_ok = torch.ones((batch_size, columns), dtype=torch.bool, device=device)
    key_ok[:, :prompt_width] = prompt_mask.bool()
    sequence = torch.full((batch_size, columns), pad_token_id, dtype=torch.long, device=device)
    sequence[:, :prompt_width] = input_ids
    out_tokens = torch.full((batch_size, width_out), pad_token_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((batch_size, width_out), device=device)
    final_tokens, final_logprobs = out_tokens.clone(), out_logprobs.clone()
    final_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    first = sampling_logprobs(first_logits, temperature, top_p)
    token = first.argmax(-1) if greedy else sample_tokens(first, uniforms[_RESAMPLE][:, 0])
    out_tokens[:, 0], out_logprobs[:, 0] = token, first.gather(-1, token[:, None]).squeeze(-1)
    sequence[:, prompt_width] = token
    length = torch.ones(batch_size, dtype=torch.long, device=device)
    state = RoundState(sequence, out_tokens, out_logprobs, length, ~torch.isin(token, eos_ids) & (length < limit),
                       torch.zeros(3, dtype=torch.long, device=device))
    rules = RoundRules(float(temperature), float(top_p), bool(greedy), uniforms[_ACCEPT], uniforms[_RESAMPLE],
                       eos_ids, torch.tensor(pad_token_id, device=device), limit, prompt_width)
    draft_uniforms = uniforms[_DRAFT]

    def flush() -> None:
        final_tokens.index_copy_(0, slot_rows, state.out_tokens)
        final_logprobs.index_copy_(0, slot_rows, state.out_logprobs)
        final_lengths.index_copy_(0, slot_rows, state.length)

    live = batch_size
    while True:
        alive_host, length_host = torch.stack([state.alive.long(), state.length]).cpu()  # the round's one device read
        stats.host_reads += 1
        alive_slots = alive_host.nonzero().squeeze(-1)
        if not len(alive_slots):
            break
        if compact_below > 0 and len(alive_slots) <= compact_below * live and len(alive_slots) < len(slot_rows):
            flush()
            keep = alive_slots.to(device)
            full_cache.compact(keep, range(len(all_layers)))
            draft_cache.compact(keep, draft_slots)
            slot_rows, padding, key_ok, draft_uniforms = (t.index_select(0, keep) for t in (slot_rows, padding, key_ok,
                                                                                        draft_uniforms))
            state = state._replace(**{name: getattr(state, name).index_select(0, keep)  # counts stay: batch sums
                                      for name in ("sequence", "out_tokens", "out_logprobs", "length", "alive")})
            rules = rules._replace(accept_uniforms=rules.accept_uniforms.index_select(0, keep),
                                   resample_uniforms=rules.resample_uniforms.index_select(0, keep))
            length_host, live = length_host[alive_slots], len(alive_slots)
            stats.compactions += 1
        rows, longest = len(slot_rows), int(length_host.max())
        step_rows = batch_bucket(rows) if graphs is not None else rows  # rows a forward runs, padding included
        column = prompt_width + state.length  # [b] where the next token goes
        width = prompt_width + longest  # the columns the drafter's first step attends over

        drafting = time.perf_counter()
        if graphs is None:
            with torch.jit.optimized_execution(False):  # the plain interpreter (see `decode.scripted`)
                drafts, draft_logprobs = run_draft_phase(g, state.sequence, column, padding, key_ok, width,
                                                         state.length, draft_uniforms, head_t, draft.at(rows), shape,
                                                         rules.temperature, rules.top_p, rules.greedy)
        else:
            drafts, draft_logprobs = _graphed_draft_phase(draft, g, state.sequence, column, padding, key_ok, width,
                                                          state.length, draft_uniforms, head_t, rules.temperature,
                                                          rules.top_p, rules.greedy)
        verifying = time.perf_counter()
        stats.draft_s += verifying - drafting
        if graphs is None:
            with torch.jit.optimized_execution(False):
                run_verify_phase(drafts, draft_logprobs, column, padding, key_ok, width + g, head_t, full.at(rows),
                                 shape, state, rules)
        else:
            feed = column[:, None] - 1 + torch.arange(g + 1, device=device)
            hidden = full(torch.cat([state.sequence.gather(1, feed[:, :1]), drafts], dim=1), feed, padding, key_ok,
                          width + g)
            verify_and_commit(hidden, head_t, drafts, draft_logprobs, state, rules)
        stats.verify_s += time.perf_counter() - verifying
        stats.steps += g + 1
        stats.row_steps += (g + 1) * step_rows
        stats.verify_passes += 1
    flush()
    verified_rows, accepted_drafts, tested_drafts = state.counts.tolist()
    stats.verified_rows += verified_rows
    stats.drafted_tokens += g * verified_rows
    stats.accepted_drafts += accepted_drafts
    stats.tested_drafts += tested_drafts
    completion_mask = (torch.arange(limit, device=device) < final_lengths[:, None]).long()
    return final_tokens[:, :limit], completion_mask, final_logprobs[:, :limit] * completion_mask
