"""The static decode engine: `rollout.generate(..., engine="static")`.

Decoding a small batch is bound by per-operation overhead, not arithmetic: transformers' decoder layer runs about
260 aten calls per layer-step (cache growth by concatenation, mask construction, casts, rotary, RMSNorm), while the
seven matmuls of a layer-step are a few percent of the time. This engine drives the model's own weights through a
functional per-layer step with static shapes:

- the prompt is prefilled by the model's own forward (the very call the reference engine makes, so the first token
  and the prompt's keys and values are the reference's), then copied into a static KV cache;
- the KV cache holds the kept layers only (`StaticKVCache`; the CUDA graphs keep a slot per decoder layer, see
  `DecodeGraphs`), every row writes its next key at the same column (rows are left padded to one prompt width)
  while its rotary position is its own (`position`, a tensor per row);
- per layer-step: one fused q/k/v matmul, one RMSNorm call per norm (QK-norm for Qwen3 on q and k together),
  rotary by a precomputed cos/sin table, an in-place cache write, attention over the filled columns only (on the
  CPU attending to every slot of a static cache costs a third of the step), and the output and down projections
  fused with their residual adds (`addmm`);
- sampling, behaviour log-probs and EOS bookkeeping are tensor operations into preallocated [B, T] buffers; the
  keyed uniforms of every (row, position) are computed once before the loop (`sampling.keyed_uniform_table`);
- the batch runs at a size from `BATCH_BUCKETS`: padding slots repeat a real row and write to a discarded output
  row, so compaction moves the batch to a smaller bucket, never to a new shape;
- the host reads one device value (which rows are still alive) every `sync_every` steps: finished rows keep
  producing padding until then, and compaction happens at those reads.

By default the decode steps between two host reads (embedding, the kept layers, head, sampling and bookkeeping:
`decode_steps`) run under TorchScript's interpreter (`scripted(decode_steps)`: compiled once per process, the same
kernels as the eager Python functions without a Python frame per operation or per step;
`rollout.engine=static_eager` runs those functions eagerly). A fixed-shape variant (`fixed_layer_step`: the write
column a tensor, attention over every cache column with the unfilled ones masked) runs under `torch.compile`
(`rollout.engine=static_compiled`) or as CUDA graphs captured per decoder layer and batch bucket (`DecodeGraphs`,
`rollout.engine=static_graphs`); neither compiles nor captures anything for a new skip set. Measurements:
docs/results/decode_cpu.md.

Sampling is keyed per (row, position), so the tokens and behaviour log-probs equal the reference engine's up to
float summation order (tests/test_decode.py). Supported architectures: qwen2, qwen3, llama, mistral (checked
against the model's config: activation, rotary type, sliding window); any other model is refused with an error
that names `rollout.engine=reference`.
"""

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .nested import SkipPlan, decoder_layers, nested_view
from .sampling import keyed_uniform_table, sample_tokens, sampling_logprobs

ARCHITECTURES = ("qwen2", "qwen3", "llama", "mistral")
# Rotary types whose frequencies do not depend on the sequence length seen so far ("dynamic" and "longrope" rescale
# with it, so a table computed once would differ from the reference's per-step values).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Batch sizes a decode step runs at: powers of two and 1.5 times powers of two (at most a third of a step is
# padding). A compiled step or a captured graph is specialised on the batch size, so every batch is padded up to a
# bucket, and compaction moves to a smaller bucket.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# Decode steps between two host reads of the rows still alive (each read is a device->host sync on a GPU).
SYNC_EVERY = 8


def batch_bucket(rows: int) -> int:
    """The smallest bucket >= `rows` (a multiple of 1024 past the table)."""
    if rows < 1:
        raise ValueError(f"batch_bucket: rows must be >= 1, got {rows}")
    for bucket in BATCH_BUCKETS:
        if bucket >= rows:
            return bucket
    return -(-rows // 1024) * 1024


class UnsupportedModelError(ValueError):
    """The static engine cannot decode this model; the reference engine (`rollout.engine=reference`) can."""


class DecoderShape(NamedTuple):
    """What the functional step needs to know of a model's text config (a NamedTuple: TorchScript reads it)."""
    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qk_norm: bool
    sliding_window: int | None  # the smallest window of any layer, None if no layer slides


def text_config(model: torch.nn.Module):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def decoder_shape(model: torch.nn.Module) -> DecoderShape:
    """The shape of `model`'s decoder, or UnsupportedModelError naming what the static engine cannot run."""
    config = text_config(model)
    model_type = getattr(config, "model_type", type(model).__name__)
    refuse = "; decode it with rollout.engine=reference"
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(f"the static decode engine supports {', '.join(ARCHITECTURES)}, not "
                                    f"model_type={model_type!r}{refuse}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"static decode engine: hidden_act={config.hidden_act!r} is not 'silu'{refuse}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(f"static decode engine: rope_type={rope_type!r} rescales with the sequence "
                                    f"length (supported: {', '.join(STATIC_ROPE_TYPES)}){refuse}")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if model_type in ("qwen2", "qwen3") and not (layer_types and "sliding_attention" in layer_types):
        window = None
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return DecoderShape(model_type=model_type, hidden_size=config.hidden_size, num_heads=heads,
                        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                        rms_norm_eps=config.rms_norm_eps, qk_norm=model_type == "qwen3", sliding_window=window)


def whole(param: torch.Tensor | None, name: str) -> torch.Tensor | None:
    # A ZeRO-3 parameter outside `engine.skip_aware_gather` is an empty placeholder: reading it would decode garbage.
    if param is not None and param.numel() == 0:
        raise ValueError(f"static decode engine: parameter {name} is partitioned (ZeRO-3); decode inside "
                         "engine.skip_aware_gather, which gathers the kept layers")
    return param


def outer_weights(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weights around the decoder layers: the token embedding [V, H], the final norm [H] and the output head
    [V, H] (the embedding itself when tied), each checked whole."""
    base = getattr(model, "model", model)
    return (whole(base.embed_tokens.weight, "embed_tokens.weight"), whole(base.norm.weight, "norm.weight"),
            whole(model.get_output_embeddings().weight, "lm_head.weight"))


class LayerWeights(NamedTuple):
    """One decoder layer's weights laid out for the functional step: projections transposed to [in, out] (one `mm`
    or `addmm` each, no transpose per call), q/k/v fused and gate/up fused. Copies, made once per rollout. A
    NamedTuple, so that the scripted decode steps (`scripted(decode_steps)`) take a list of them."""
    input_norm: torch.Tensor        # [H]
    qkv: torch.Tensor               # [H, (Hq + 2 Hkv) D]
    qkv_bias: torch.Tensor | None   # [(Hq + 2 Hkv) D]
    qk_norm: torch.Tensor | None    # [Hq + Hkv, D]: q_norm's weight for each query head, then k_norm's (Qwen3)
    o: torch.Tensor                 # [Hq D, H]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor         # [H]
    gate_up: torch.Tensor           # [H, 2 I]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor              # [I, H]
    down_bias: torch.Tensor | None


def _cat_bias(*linears: torch.nn.Linear) -> torch.Tensor | None:
    biases = [linear.bias for linear in linears]
    if all(bias is None for bias in biases):
        return None
    return torch.cat([bias if bias is not None else torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                                 device=linear.weight.device)
                      for bias, linear in zip(biases, linears)])


def layer_weights(layer: torch.nn.Module, shape: DecoderShape, name: str) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    for param_name, param in layer.named_parameters():
        whole(param, f"{name}.{param_name}")
    qk_norm = None
    if shape.qk_norm:
        qk_norm = torch.cat([attn.q_norm.weight.expand(shape.num_heads, -1),
                             attn.k_norm.weight.expand(shape.num_kv_heads, -1)])
    return LayerWeights(
        input_norm=layer.input_layernorm.weight,
        qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t().contiguous(),
        qkv_bias=_cat_bias(attn.q_proj, attn.k_proj, attn.v_proj), qk_norm=qk_norm,
        o=attn.o_proj.weight.t().contiguous(), o_bias=attn.o_proj.bias,
        post_norm=layer.post_attention_layernorm.weight,
        gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t().contiguous(),
        gate_up_bias=_cat_bias(mlp.gate_proj, mlp.up_proj),
        down=mlp.down_proj.weight.t().contiguous(), down_bias=mlp.down_proj.bias)


class StaticKVCache:
    """Keys and values of the kept layers only, [kept layers, rows x KV heads, columns, head dim] each, allocated once
    per rollout at the batch's bucket. Columns are shared by all rows (left padding aligns them) while each row's
    rotary position is its own; a smaller bucket's views are the leading rows, so compaction copies rows forward and
    every step runs at the shapes of a bucket.

    Why not `deepspeed.utils.static_cache.DeepSpeedStaticCache`: its per-row `update` checks the positions'
    bounds by reading them on the host at every call outside graph capture (one device sync per layer-step in eager
    mode), returns the whole `max_cache_len` slab (attention then spans every slot, which on the CPU is a third of the
    step), sizes itself from `num_hidden_layers` (all layers, not the kept ones), is updated one layer at a time
    (here one view per step serves every layer), and importing it imports DeepSpeed, which rollout code outside
    `engine/` must not (`nested-reft eval` on plain processes never imports it)."""

    def __init__(self, layers: int, rows: int, kv_heads: int, columns: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.kv_heads = kv_heads
        self.keys = torch.zeros((layers, rows * kv_heads, columns, head_dim), dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)

    def fill(self, layer: int, keys: torch.Tensor, values: torch.Tensor, sources: torch.Tensor) -> None:
        """Write a prefill's keys/values [b, Hkv, P, D] into columns [0, P) of `layer`: slot i gets row sources[i]."""
        rows, width = len(sources) * self.kv_heads, keys.shape[2]
        self.keys[layer, :rows, :width] = keys.index_select(0, sources).flatten(0, 1)
        self.values[layer, :rows, :width] = values.index_select(0, sources).flatten(0, 1)

    def compact(self, slots: torch.Tensor, layers: Sequence[int]) -> None:
        """Slot i takes what slot `slots[i]` held, for i < len(slots), in the cache slots of `layers` (the layers a
        rollout runs: a graph holder's cache keeps a slot for every decoder layer)."""
        heads = torch.arange(self.kv_heads, device=slots.device)
        rows = (slots[:, None] * self.kv_heads + heads).flatten()
        for layer in layers:
            self.keys[layer, :len(rows)] = self.keys[layer].index_select(0, rows)
            self.values[layer, :len(rows)] = self.values[layer].index_select(0, rows)

    def layer_views(self, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per kept layer, the keys and values [rows Hkv, S, D] of the first `rows` slots (fixed-shape steps)."""
        count = rows * self.kv_heads
        return list(zip(self.keys[:, :count].unbind(0), self.values[:, :count].unbind(0)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm over the last dimension, `weight` * x / sqrt(mean(x^2) + eps), normalised in float32 and
    cast back before the weight. `weight` is the last dimension's size or broadcasts to `x`'s trailing dimensions
    (the per-head QK-norm weights); `eps` a 0-d float32 tensor. Five aten calls in float32 (the fused `rms_norm`
    makes about ten on the CPU)."""
    h = x if x.dtype == torch.float32 else x.float()
    norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    scale = torch.addcmul(eps, norm, norm, value=1.0 / h.shape[-1]).rsqrt_()
    return weight * (h * scale) if x.dtype == torch.float32 else weight * (h * scale).to(x.dtype)


def rotated_qkv(x: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor, shape: DecoderShape,
                 eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input norm, the fused q/k/v projection, QK-norm (Qwen3) and rotary: x [b, H] -> query [b Hkv, G, D] (the
    query heads of one KV head form its block, so attention runs on the KV heads without repeating them), key and
    value [b, Hkv, D]. `cos`, `sin` [b, 1, D]: the rows' rotary tables, `sin` with its first half negated, so that
    rotate_half(q) * sin is flip(q) * sin."""
    heads, kv_heads, head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    rows = x.shape[0]
    h = rms_norm(x, w.input_norm, eps)
    bias, qk_norm = w.qkv_bias, w.qk_norm  # locals: TorchScript refines Optional locals, not attributes
    qkv = torch.mm(h, w.qkv) if bias is None else torch.addmm(bias, h, w.qkv)
    qkv = qkv.view(rows, heads + 2 * kv_heads, head_dim)
    qk = qkv[:, :heads + kv_heads]
    if qk_norm is not None:
        qk = rms_norm(qk, qk_norm, eps)
    flipped = qk.unflatten(-1, [2, head_dim // 2]).flip([-2]).flatten(-2)
    qk = torch.addcmul(qk * cos, flipped, sin)
    query = qk[:, :heads].reshape(rows * kv_heads, heads // kv_heads, head_dim)
    return query, qk[:, heads:], qkv[:, heads + kv_heads:]


def _attention_and_mlp(x: torch.Tensor, w: LayerWeights, query: torch.Tensor, keys_t: torch.Tensor,
                       values: torch.Tensor, mask: torch.Tensor, shape: DecoderShape,
                       eps: torch.Tensor) -> torch.Tensor:
    """Attention of `query` [b Hkv, G, D] over `keys_t` [b Hkv, D, n] and `values` [b Hkv, n, D] with the additive
    `mask` [b Hkv, 1, n], the output projection and residual, the post-attention norm and the MLP: -> x [b, H]."""
    rows = x.shape[0]
    scores = torch.baddbmm(mask, query, keys_t, alpha=shape.head_dim ** -0.5)  # [b Hkv, G, n]
    probs = attention_probs(scores)
    return output_and_mlp(x, w, torch.bmm(probs, values).view(rows, shape.num_heads * shape.head_dim), eps)


def attention_probs(scores: torch.Tensor) -> torch.Tensor:
    """Softmax of attention scores over the keys, in float32 whatever their dtype (as transformers does), returned
    in the scores' dtype. One call in float32."""
    if scores.dtype == torch.float32:
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


def output_and_mlp(x: torch.Tensor, w: LayerWeights, attended: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The attention's output projection and residual, the post-attention norm and the MLP with its residual:
    x, attended [b, H], [b, Hq D] -> x [b, H]."""
    o_bias, gate_up_bias, down_bias = w.o_bias, w.gate_up_bias, w.down_bias
    x = torch.addmm(x, attended, w.o) if o_bias is None else x + torch.addmm(o_bias, attended, w.o)
    h = rms_norm(x, w.post_norm, eps)
    gate_up = torch.mm(h, w.gate_up) if gate_up_bias is None else torch.addmm(gate_up_bias, h, w.gate_up)
    half = gate_up.shape[-1] // 2
    act = F.silu(gate_up[:, :half]) * gate_up[:, half:]
    return torch.addmm(x, act, w.down) if down_bias is None else x + torch.addmm(down_bias, act, w.down)


def layer_step(x: torch.Tensor, w: LayerWeights, new_key: torch.Tensor, new_value: torch.Tensor,
               keys_t: torch.Tensor, values: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
               shape: DecoderShape, eps: torch.Tensor) -> torch.Tensor:
    """One decoder layer for one new token per row, attending over the filled columns only: x [b, H] -> [b, H].

    The token's rotated key and its value are written into `new_key` / `new_value` [b, Hkv, D] (views of the cache
    column being filled), then attention runs over `keys_t` [b Hkv, D, n], `values` [b Hkv, n, D] (views of the
    cache including that column) with the additive `mask` [b Hkv, 1, n] (0 where a key may be attended to, the
    dtype's minimum on left padding)."""
    query, key, value = rotated_qkv(x, w, cos, sin, shape, eps)
    new_key.copy_(key)
    new_value.copy_(value)
    return _attention_and_mlp(x, w, query, keys_t, values, mask, shape, eps)


def fixed_layer_step(x: torch.Tensor, w: LayerWeights, keys: torch.Tensor, values: torch.Tensor,
                     column: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                     shape: DecoderShape, eps: torch.Tensor) -> torch.Tensor:
    """`layer_step` with every shape fixed for the rollout, for `torch.compile` and CUDA-graph capture: the key and
    value go to the column held in the tensor `column` [1] (a graph reads its current value at replay), and
    attention spans every column of `keys` / `values` [b Hkv, S, D], the `mask` [b Hkv, 1, S] hiding the columns not
    filled yet."""
    query, key, value = rotated_qkv(x, w, cos, sin, shape, eps)
    keys.index_copy_(1, column, key.reshape(-1, 1, shape.head_dim))
    values.index_copy_(1, column, value.reshape(-1, 1, shape.head_dim))
    return _attention_and_mlp(x, w, query, keys.transpose(1, 2), values, mask, shape, eps)


def layer_steps(x: torch.Tensor, weights: list[LayerWeights], new_keys: list[torch.Tensor],
                new_values: list[torch.Tensor], keys_t: list[torch.Tensor], values: list[torch.Tensor],
                cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, shape: DecoderShape,
                eps: torch.Tensor) -> torch.Tensor:
    """`layer_step` through the kept layers in order (the i-th cache views with the i-th weights): x [b, H] ->
    [b, H]. One decode step's layers in `decode_steps`."""
    for i in range(len(weights)):
        x = layer_step(x, weights[i], new_keys[i], new_values[i], keys_t[i], values[i], cos, sin, mask, shape, eps)
    return x


def step_views(keys: torch.Tensor, values: torch.Tensor, rows: int, kv_heads: int,
               column: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per kept layer of a `StaticKVCache`'s `keys` / `values` [layers, slots Hkv, S, D], for a step of `rows` slots
    writing column `column`: where the new key and value go ([rows, Hkv, D] each), and the filled keys transposed
    ([rows Hkv, D, column + 1]) and values ([rows Hkv, column + 1, D]) the step attends over. A handful of view
    operations per step for all layers."""
    keys, values = keys[:, :rows * kv_heads], values[:, :rows * kv_heads]
    layers, head_dim = keys.shape[0], keys.shape[-1]
    return (keys[:, :, column].view(layers, rows, kv_heads, head_dim).unbind(0),
            values[:, :, column].view(layers, rows, kv_heads, head_dim).unbind(0),
            keys[:, :, :column + 1].transpose(2, 3).unbind(0), values[:, :, :column + 1].unbind(0))


def per_kv_head(additive: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, 1, 1, n] per-slot mask -> [b Hkv, 1, n], the layout of the attention's batched matmuls."""
    rows, width = additive.shape[0], additive.shape[-1]
    return additive.expand(rows, kv_heads, 1, width).reshape(rows * kv_heads, 1, width)


class StepOutputs(NamedTuple):
    """Where decode steps write: the output rows' tokens, behaviour log-probs and completion mask [B + 1, T] (row B
    is the discarded row padding slots write to), and per slot the output row it writes to and whether it is alive
    (updated in place)."""
    tokens: torch.Tensor
    logprobs: torch.Tensor
    completion_mask: torch.Tensor
    slot_rows: torch.Tensor
    alive: torch.Tensor


class Sampler(NamedTuple):
    """How a decode step picks its token: temperature / top-p sampling at the slots' keyed uniforms [b, T] (float64),
    or the argmax (`greedy`); `eos_ids` end a row, whose later tokens are `pad` with log-prob `zero` (0-d tensors)."""
    temperature: float
    top_p: float
    greedy: bool
    uniforms: torch.Tensor
    eos_ids: torch.Tensor
    pad: torch.Tensor
    zero: torch.Tensor


def record_step(logits: torch.Tensor, t: int, sampler: Sampler, out: StepOutputs) -> torch.Tensor:
    """Sample each slot's token at completion position `t` from `logits` [b, V], write it, its behaviour log-prob
    and its mask bit into column `t` of the slots' output rows, and retire the slots that produced EOS: -> token [b]."""
    step_logprobs = sampling_logprobs(logits, sampler.temperature, sampler.top_p)  # [b, V]
    if sampler.greedy:
        token = step_logprobs.argmax(-1)
    else:
        token = sample_tokens(step_logprobs, sampler.uniforms[:, t])
    token_logprob = step_logprobs.gather(-1, token[:, None]).squeeze(-1)
    alive = out.alive
    out.tokens[:, t].index_copy_(0, out.slot_rows, torch.where(alive, token, sampler.pad))
    out.logprobs[:, t].index_copy_(0, out.slot_rows, torch.where(alive, token_logprob, sampler.zero))
    out.completion_mask[:, t].index_copy_(0, out.slot_rows, alive.long())
    alive.logical_and_(torch.logical_not(torch.isin(token, sampler.eos_ids)))
    return token


def decode_steps(first: int, stop: int, token: torch.Tensor, position: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, additive: torch.Tensor, weights: list[LayerWeights], embed: torch.Tensor,
                 final_norm: torch.Tensor, head_t: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 prompt_width: int, sampler: Sampler, out: StepOutputs, shape: DecoderShape,
                 eps: torch.Tensor) -> torch.Tensor:
    """Decode steps `first` .. `stop` - 1 of the slots fed `token` [b] at rotary `position` [b] (advanced in place):
    embedding, the kept layers over `keys` / `values` (a `StaticKVCache`'s tensors), the final norm and head, and
    `record_step`: -> the last token fed back [b]. The whole stretch between two host reads, so that, scripted, it
    runs without a Python frame per operation or per step."""
    rows = token.shape[0]
    for t in range(first, stop):
        column = prompt_width + t - 1  # where the fed token's key goes
        x = F.embedding(token, embed)
        cos, sin = cos_table[position].unsqueeze(1), sin_table[position].unsqueeze(1)
        mask = per_kv_head(additive[:rows, :, :, :column + 1], shape.num_kv_heads)
        new_keys, new_values, keys_t, filled_values = step_views(keys, values, rows, shape.num_kv_heads, column)
        x = layer_steps(x, weights, new_keys, new_values, keys_t, filled_values, cos, sin, mask, shape, eps)
        logits = torch.mm(rms_norm(x, final_norm, eps), head_t)
        position.add_(1)
        token = record_step(logits, t, sampler, out)
    return token


_SCRIPTED: dict = {}  # function -> its TorchScript compilation, in this process


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:  # not a plain file (a zipped install): nothing to compare
        return None
    return stat.st_mtime_ns, stat.st_size


# TorchScript compiles a function from its source file as it is on disk when `scripted` runs, not from the code
# this process imported: the files the scripted functions come from, stamped when this module is imported, so that
# a package updated on disk under a running job (an editable install, a shared checkout) fails loudly instead of
# compiling other code than the one running.
_SCRIPTED_SOURCES = {path: _file_stamp(path) for path in
                     (Path(__file__), Path(__file__).with_name("sampling.py"),
                      Path(__file__).with_name("speculative.py"))}


def scripted(fn):
    """`fn` compiled by TorchScript (once per process; no recompilation for any shape, skip set or dtype).

    A decode step at RL batch sizes is bound by per-operation overhead; TorchScript's interpreter dispatches the
    ~35 operations per layer and the step's sampling and bookkeeping without a Python frame each, with the same
    kernels as the eager functions, so the same floats (docs/results/decode_cpu.md has what it buys). Call the
    result under `torch.jit.optimized_execution(False)`: the optimising executor would re-profile at every new
    attention width and, on CUDA, fuse elementwise ops into kernels with other floats than eager's."""
    if fn not in _SCRIPTED:
        changed = [path.name for path, stamp in _SCRIPTED_SOURCES.items() if _file_stamp(path) != stamp]
        if changed:
            raise RuntimeError(f"static decode engine: {', '.join(changed)} changed on disk since this process "
                               "imported nested_reft_ds; TorchScript compiles from the files on disk, so it would "
                               "compile other code than the one running. Restart the process (or decode with "
                               "rollout.engine=static_eager)")
        try:
            _SCRIPTED[fn] = torch.jit.script(fn)
        except Exception as error:  # TorchScript missing or changed in this torch build
            raise RuntimeError(f"static decode engine: TorchScript could not compile {fn.__name__} ({error}); "
                               "decode with rollout.engine=static_eager (the same step, run eagerly)") from error
        COMPILATIONS[0] += 1
    return _SCRIPTED[fn]


def rotary_tables(model: torch.nn.Module, length: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, D] of positions 0..length-1 from the model's own rotary module (its scaling included);
    sin's first half negated (see `layer_step`)."""
    rotary = getattr(model, "model", model).rotary_emb
    positions = torch.arange(length, device=device)[None]
    cos, sin = rotary(torch.zeros((), dtype=dtype, device=device), positions)
    half = sin.shape[-1] // 2
    sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
    return cos[0].contiguous(), sin.contiguous()


@dataclass
class DecodeStats:
    """What one `generate` call computed: token-steps of the rows in the batch vs those still alive."""
    steps: int = 0                # decode forwards after the prefill
    row_steps: int = 0            # sum over decode forwards of the rows the forward ran (padding slots included)
    alive_row_steps: int = 0      # of those, rows that had not finished (the tokens that were needed)
    prefill_rows: int = 0         # rows the prefill forward ran (one per prompt with shared prefill)
    compactions: int = 0
    host_reads: int = 0           # device values the host read while decoding (each one a sync on a GPU)
    compilations: int = 0         # torch.compile graphs ("static_compiled"), TorchScript compilations ("static",
                                  # and the speculative engine's two scripted phases)
    captures: int = 0             # CUDA graphs captured while decoding ("static_graphs", either engine)
    # Speculative decoding (speculative.py): verify forwards, the alive rows they scored, the drafts those rows
    # proposed, the drafts kept, and the drafts the rule tested (up to a row's first rejection, EOS or length limit:
    # accepted / tested is the per-token acceptance rate, the a of `speculative.predicted_speedup`).
    verify_passes: int = 0
    verified_rows: int = 0
    drafted_tokens: int = 0
    accepted_drafts: int = 0
    tested_drafts: int = 0
    draft_s: float = 0.0          # host time in the drafter's steps and in the verify forwards (with the rule and
                                  # the commit)
    verify_s: float = 0.0
    engine: str = ""              # the engine that decoded (rollout.ENGINES)

    def add(self, other: "DecodeStats") -> None:
        """Accumulate `other`'s counts and timers into these (the engine name is kept)."""
        for item in fields(self):
            if item.name != "engine":
                setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


# How the per-layer step runs. "eager": `decode_steps` (`layer_step` through the kept layers), attention over the
# filled columns only. "scripted": the same steps compiled by TorchScript (`scripted(decode_steps)`). "fixed":
# `fixed_layer_step` eagerly (every shape fixed for the rollout; what "compiled" and "graphs" run). "compiled":
# `fixed_layer_step` under `torch.compile` (inductor, static shapes): one compilation per (batch bucket, cache
# length bucket, dtype, architecture), shared by every layer and every skip set, because the layer's weights are
# inputs of the compiled graph, not constants in it. "graphs" (CUDA): `fixed_layer_step` captured in one CUDA graph
# per decoder layer and batch bucket, plus one for the embedding and one for the head per bucket (`DecodeGraphs`);
# a rollout replays the graphs of its kept layers, so no skip set needs a capture of its own.
STEP_MODES = ("eager", "scripted", "fixed", "compiled", "graphs")
# The compiled step's cache length is rounded up to a multiple of this, so rollouts with different prompt widths
# reuse one compilation.
COLUMN_BUCKET = 64
_compiled_layer_step = None
COMPILATIONS = [0]  # graphs compiled so far by `_compiled_layer_step` and TorchScript, in this process


def _counting_inductor(graph_module, example_inputs):
    """torch.compile backend: inductor, counting every graph it compiles (a recompilation is one more)."""
    from torch._inductor.compile_fx import compile_fx

    COMPILATIONS[0] += 1
    return compile_fx(graph_module, example_inputs)


def compiled_layer_step():
    """`fixed_layer_step` compiled (built on first use; compilation happens at each call with new shapes)."""
    global _compiled_layer_step
    if _compiled_layer_step is None:
        _compiled_layer_step = torch.compile(fixed_layer_step, dynamic=False, backend=_counting_inductor)
    return _compiled_layer_step


class GraphWeights:
    """Fixed-address copies of a model's weights for CUDA graphs to read: every decoder layer's `LayerWeights`, the
    embedding, final norm and head. A rollout copies its weights in (`load`): ZeRO-3 gathers them to fresh storage
    at every rollout, and a graph reads the addresses it was captured with."""

    def __init__(self, template: LayerWeights, num_layers: int, embed: torch.Tensor, hidden_size: int):
        # Zeros, not uninitialised memory: capturing a bucket runs every layer's step once, loaded or not, and writes
        # its keys and values into that layer's cache slot. A fixed-shape step later attends over every column, the
        # unfilled ones masked, and a masked NaN still poisons the softmax and the values' product; zero weights keep
        # those writes finite.
        self.layers = [LayerWeights(**{name: None if value is None else torch.zeros_like(value)
                                       for name, value in template._asdict().items()}) for _ in range(num_layers)]
        self.embed = torch.zeros_like(embed)
        self.final_norm = torch.zeros(hidden_size, dtype=embed.dtype, device=embed.device)
        self.head = torch.zeros_like(embed)

    def fits(self, template: LayerWeights, num_layers: int, embed: torch.Tensor) -> bool:
        return (num_layers == len(self.layers) and embed.shape == self.embed.shape and embed.dtype == self.embed.dtype
                and embed.device == self.embed.device
                and all((value is None) == (getattr(self.layers[0], name) is None)
                        and (value is None or value.shape == getattr(self.layers[0], name).shape)
                        for name, value in template._asdict().items()))

    def load(self, layers: dict[int, LayerWeights], embed: torch.Tensor, final_norm: torch.Tensor,
             head: torch.Tensor) -> None:
        """Copy this rollout's weights (the layers it runs, by decoder layer index) into the buffers."""
        for index, weights in layers.items():
            for name, value in weights._asdict().items():
                if value is not None:
                    getattr(self.layers[index], name).copy_(value)
        self.embed.copy_(embed)
        self.final_norm.copy_(final_norm)
        self.head.copy_(head)


class EagerReplay:
    """What `capture_graph` returns off CUDA: `replay()` runs the function again, eagerly. It lets the CPU tests
    drive the graph paths' fixed buffers, padding and capture bookkeeping; only the capture itself needs a GPU."""

    def __init__(self, fn):
        self.replay = fn


def capture_graph(fn, pool) -> "torch.cuda.CUDAGraph | EagerReplay":
    """Run `fn` once, then capture it in a CUDA graph on the memory `pool` (a replay re-runs its kernels on the
    same buffers). The first run is the warm-up capture requires (allocator and library handles), on a side stream;
    its writes happen, the capture's do not. Off CUDA (`pool` None) the warm-up run happens and an `EagerReplay`
    is returned."""
    if pool is None:
        fn()
        return EagerReplay(fn)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


@dataclass
class _BucketInputs:
    """The fixed-address inputs and outputs of one batch bucket's graphs."""
    token: torch.Tensor     # [b] the fed tokens
    position: torch.Tensor  # [b] their rotary positions
    mask: torch.Tensor      # [b Hkv, 1, S] additive attention mask
    x: torch.Tensor         # [b, H] the residual stream, updated in place by each layer's graph
    cos: torch.Tensor       # [b, 1, D]
    sin: torch.Tensor       # [b, 1, D]
    logits: torch.Tensor    # [b, V]


class DecodeGraphs:
    """CUDA graphs of the fixed-shape decode step of one model, kept on the model across rollouts.

    One graph per (decoder layer, batch bucket), captured for every layer when a bucket is first used, plus an
    embedding graph and a head graph per bucket. A rollout copies its kept layers' weights into the fixed buffers
    the graphs read (one pass over the kept weights, as ZeRO-3 gathers them to fresh storage each rollout anyway)
    and replays the graphs of its kept layers only: a new skip set captures nothing. The KV cache has a slot for
    every decoder layer (the graphs' addresses must not depend on the skip set), at the largest bucket and cache
    length seen; a rollout needing more rebuilds everything (counted as captures)."""

    def __init__(self, model: torch.nn.Module, shape: DecoderShape, rows: int, columns: int, template: LayerWeights,
                 num_layers: int, embed: torch.Tensor):
        device, dtype = embed.device, embed.dtype
        self.shape, self.rows, self.columns, self.dtype, self.num_layers = shape, rows, columns, dtype, num_layers
        self.cache = StaticKVCache(num_layers, rows, shape.num_kv_heads, columns, shape.head_dim, dtype, device)
        self.params = GraphWeights(template, num_layers, embed, shape.hidden_size)
        self.eps = torch.tensor(shape.rms_norm_eps, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.cos_table, self.sin_table = rotary_tables(model, columns, dtype, device)
        self.inputs: dict[int, _BucketInputs] = {}
        self.graphs: dict[tuple, torch.cuda.CUDAGraph | EagerReplay] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def ensure_bucket(self, bucket: int) -> int:
        """Capture the graphs of `bucket` unless they exist; returns the number captured. `self.column` must hold the
        column the next step writes: each layer's warm-up writes garbage there, which that step overwrites."""
        if bucket in self.inputs:
            return 0
        shape, device = self.shape, self.params.embed.device
        inputs = _BucketInputs(
            token=torch.zeros(bucket, dtype=torch.long, device=device),
            position=torch.zeros(bucket, dtype=torch.long, device=device),
            mask=torch.zeros((bucket * shape.num_kv_heads, 1, self.columns), dtype=self.dtype, device=device),
            x=torch.zeros((bucket, shape.hidden_size), dtype=self.dtype, device=device),
            cos=torch.zeros((bucket, 1, shape.head_dim), dtype=self.dtype, device=device),
            sin=torch.zeros((bucket, 1, shape.head_dim), dtype=self.dtype, device=device),
            logits=torch.zeros((bucket, self.params.embed.shape[0]), dtype=self.dtype, device=device))
        self.inputs[bucket] = inputs

        def embed_step():
            inputs.x.copy_(F.embedding(inputs.token, self.params.embed))
            inputs.cos.copy_(self.cos_table[inputs.position].unsqueeze(1))
            inputs.sin.copy_(self.sin_table[inputs.position].unsqueeze(1))

        def head_step():
            inputs.logits.copy_(torch.mm(rms_norm(inputs.x, self.params.final_norm, self.eps), self.params.head.t()))

        self.graphs["embed", bucket] = capture_graph(embed_step, self.pool)
        for index, (keys, values) in enumerate(self.cache.layer_views(bucket)):
            def layer(weights=self.params.layers[index], keys=keys, values=values):
                inputs.x.copy_(fixed_layer_step(inputs.x, weights, keys, values, self.column, inputs.cos, inputs.sin,
                                                inputs.mask, shape, self.eps))
            self.graphs[index, bucket] = capture_graph(layer, self.pool)
        self.graphs["head", bucket] = capture_graph(head_step, self.pool)
        return self.num_layers + 2

    def step(self, bucket: int, kept: Sequence[int], token: torch.Tensor, position: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        """One decode step of the kept layers at `bucket` rows: -> logits [b, V] (a buffer the next step reuses)."""
        inputs = self.inputs[bucket]
        inputs.token.copy_(token)
        inputs.position.copy_(position)
        inputs.mask.copy_(mask)
        self.graphs["embed", bucket].replay()
        for index in kept:
            self.graphs[index, bucket].replay()
        self.graphs["head", bucket].replay()
        return inputs.logits


HELD_GRAPHS = "_nested_reft_graphs"  # model attribute: {graph holder class: its instance for this model}


def held_graphs(cls, model: torch.nn.Module, shape: DecoderShape, rows: int, columns: int, template: LayerWeights,
                num_layers: int, embed: torch.Tensor):
    """The model's `cls` (`DecodeGraphs`, `speculative.SpeculativeGraphs`), built, or rebuilt with its graphs
    captured anew, when this rollout needs more rows, columns or other shapes than the one it holds."""
    held = model.__dict__.setdefault(HELD_GRAPHS, {})
    graphs = held.get(cls)
    if (graphs is None or rows > graphs.rows or columns > graphs.columns
            or not graphs.params.fits(template, num_layers, embed)):
        held.pop(cls, None)  # free the old buffers and graph pool before allocating new ones
        graphs = held[cls] = cls(model, shape, rows, columns, template, num_layers, embed)
    return graphs


@torch.no_grad()
def static_generate(model: torch.nn.Module, input_ids: torch.Tensor, prompt_mask: torch.Tensor, plan: SkipPlan, *,
                    max_new_tokens: int, temperature: float, top_p: float, eos_ids: torch.Tensor, pad_token_id: int,
                    greedy: bool, seed: int, row_keys: torch.Tensor, group_size: int, compact_below: float,
                    step_mode: str = "scripted", sync_every: int = SYNC_EVERY,
                    stats: DecodeStats | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, completion mask and behaviour log-probs [B, T] of `rollout.generate`'s contract (arguments checked
    there): padded to `max_new_tokens` columns, the caller trims them."""
    if sync_every < 1:
        raise ValueError(f"static decode engine: sync_every must be >= 1, got {sync_every}")
    if step_mode not in STEP_MODES:
        raise ValueError(f"static decode engine: step_mode must be one of {STEP_MODES}, got {step_mode!r}")
    stats = stats if stats is not None else DecodeStats()
    shape = decoder_shape(model)
    batch_size, prompt_width = input_ids.shape
    device = input_ids.device
    fixed = step_mode in ("fixed", "compiled", "graphs")  # every shape fixed for the rollout
    needed = prompt_width + max_new_tokens
    columns = -(-needed // COLUMN_BUCKET) * COLUMN_BUCKET if fixed else needed
    if shape.sliding_window is not None and needed >= shape.sliding_window:
        raise UnsupportedModelError(f"static decode engine: {needed} tokens reach the sliding window "
                                    f"({shape.sliding_window}); decode with rollout.engine=reference")
    parent, attr = decoder_layers(model)
    all_layers = getattr(parent, attr)
    weights = [layer_weights(all_layers[i], shape, f"layers.{i}") for i in plan.kept]
    embed, final_norm, head = outer_weights(model)
    head_t = head.t()

    # Prefill: the model's own forward over the prompts (one per group with shared prefill), as the reference does.
    shared = group_size > 1
    prefill_ids = input_ids[::group_size] if shared else input_ids
    prefill_mask = prompt_mask[::group_size] if shared else prompt_mask
    positions = (prefill_mask.cumsum(-1) - 1).clamp(min=0)
    with nested_view(model, plan):
        prefill_cache = DynamicCache(config=text_config(model))
        out = model(input_ids=prefill_ids, attention_mask=prefill_mask, position_ids=positions, cache=prefill_cache,
                    use_cache=True, logits_to_keep=1)
    stats.prefill_rows += prefill_ids.shape[0]
    first_logits = out.logits[:, -1]
    if shared:
        first_logits = first_logits.repeat_interleave(group_size, dim=0)

    # Slots: the rows of the running batch. slot_rows[i] is the output row slot i writes to (batch_size: discarded).
    bucket = batch_bucket(batch_size)
    slot_rows = torch.cat([torch.arange(batch_size, device=device),
                           torch.full((bucket - batch_size,), batch_size, device=device)])
    slot_sources = torch.cat([torch.arange(batch_size, device=device),
                              torch.zeros(bucket - batch_size, dtype=torch.long, device=device)])
    dtype = embed.dtype
    graphs = None
    if step_mode == "graphs":  # off CUDA the graphs replay eagerly (`capture_graph`; rollout.generate refuses it)
        graphs = held_graphs(DecodeGraphs, model, shape, bucket, columns, weights[0], len(all_layers), embed)
        graphs.params.load(dict(zip(plan.kept, weights)), embed, final_norm, head)
        cache, cache_layers, columns = graphs.cache, plan.kept, graphs.columns
    else:
        cache = StaticKVCache(len(plan.kept), bucket, shape.num_kv_heads, columns, shape.head_dim, dtype, device)
        cache_layers = range(len(plan.kept))
    prefill_sources = slot_sources // group_size if shared else slot_sources
    for i, layer in zip(cache_layers, prefill_cache.layers):
        cache.fill(i, layer.keys, layer.values, prefill_sources)
    del prefill_cache, out
    # The attention mask as added to the scores, per slot: 0 where a key may be attended to, the dtype's minimum on
    # left padding and (fixed shapes) on the columns not filled yet.
    minimum = torch.finfo(dtype).min
    additive = torch.zeros((bucket, 1, 1, columns), dtype=dtype, device=device)
    additive[:, 0, 0, :prompt_width].masked_fill_(prompt_mask.index_select(0, slot_sources) == 0, minimum)
    compilations_before = COMPILATIONS[0]
    if fixed:
        additive[:, :, :, prompt_width:] = minimum
        step = compiled_layer_step() if step_mode == "compiled" else fixed_layer_step
        column_index = torch.zeros(1, dtype=torch.long, device=device)
    else:
        run_steps = scripted(decode_steps) if step_mode == "scripted" else decode_steps
    position = prompt_mask.long().sum(-1).index_select(0, slot_sources)  # rotary position of the next fed token
    cos_table, sin_table = rotary_tables(model, columns, dtype, device)
    eps = torch.tensor(shape.rms_norm_eps, device=device)
    uniforms = keyed_uniform_table(seed, row_keys, max_new_tokens)  # [B, T] float64
    sampler = Sampler(float(temperature), float(top_p), bool(greedy), uniforms.index_select(0, slot_sources),
                      eos_ids, torch.tensor(pad_token_id, device=device), torch.zeros((), device=device))
    out = StepOutputs(torch.full((batch_size + 1, max_new_tokens), pad_token_id, dtype=torch.long, device=device),
                      torch.zeros((batch_size + 1, max_new_tokens), device=device),
                      torch.zeros((batch_size + 1, max_new_tokens), dtype=torch.long, device=device),
                      slot_rows, slot_rows < batch_size)
    live = batch_size  # real rows in the batch (alive or not), as the host last saw them

    token = record_step(first_logits.index_select(0, slot_sources), 0, sampler, out)
    layer_caches = cache.layer_views(bucket)
    for first in range(1, max_new_tokens, sync_every):
        alive_host = out.alive.cpu()  # the one device read of these `sync_every` steps
        stats.host_reads += 1
        alive_slots = alive_host.nonzero().squeeze(-1)
        if not len(alive_slots):
            break
        smaller = batch_bucket(len(alive_slots))
        if compact_below > 0 and len(alive_slots) <= compact_below * live and smaller < bucket:
            # Alive slots move to the front; the rest of the smaller bucket repeats the first alive slot and writes
            # to the discarded output row.
            keep = torch.cat([alive_slots, alive_slots[:1].expand(smaller - len(alive_slots))]).to(device)
            cache.compact(keep, cache_layers)
            slot_rows, alive = out.slot_rows.index_select(0, keep), out.alive.index_select(0, keep)
            slot_rows[len(alive_slots):] = batch_size
            alive[len(alive_slots):] = False
            out = out._replace(slot_rows=slot_rows, alive=alive)
            sampler = sampler._replace(uniforms=sampler.uniforms.index_select(0, keep))
            additive[:smaller] = additive.index_select(0, keep)
            position, token = position.index_select(0, keep), token.index_select(0, keep)
            bucket, live = smaller, len(alive_slots)
            layer_caches = cache.layer_views(bucket)
            stats.compactions += 1
        stop = min(first + sync_every, max_new_tokens)
        stats.steps += stop - first
        stats.row_steps += bucket * (stop - first)
        if not fixed:
            with torch.jit.optimized_execution(False):  # the plain interpreter (see `scripted`)
                token = run_steps(first, stop, token, position, cache.keys, cache.values, additive, weights, embed,
                                  final_norm, head_t, cos_table, sin_table, prompt_width, sampler, out, shape, eps)
            continue
        for t in range(first, stop):
            column = prompt_width + t - 1  # where the fed token's key goes
            additive[:bucket, :, :, column] = 0
            if graphs is not None:
                graphs.column.fill_(column)
                stats.captures += graphs.ensure_bucket(bucket)
                logits = graphs.step(bucket, plan.kept, token, position,
                                     per_kv_head(additive[:bucket], shape.num_kv_heads))
            else:
                x = F.embedding(token, embed)
                cos, sin = cos_table[position].unsqueeze(1), sin_table[position].unsqueeze(1)
                column_index.fill_(column)
                step_mask = per_kv_head(additive[:bucket], shape.num_kv_heads)
                for w, (keys, values) in zip(weights, layer_caches):
                    x = step(x, w, keys, values, column_index, cos, sin, step_mask, shape, eps)
                logits = torch.mm(rms_norm(x, final_norm, eps), head_t)
            position += 1
            token = record_step(logits, t, sampler, out)
    stats.compilations += COMPILATIONS[0] - compilations_before
    return out.tokens[:batch_size], out.completion_mask[:batch_size], out.logprobs[:batch_size]
