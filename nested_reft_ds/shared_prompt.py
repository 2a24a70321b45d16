"""Shared-prompt training forward (the "Prefix Grouper" idea, arXiv 2506.05433): a prompt's G samples are scored in
one sequence `[prompt, c_1, ..., c_G]`, so the prompt is encoded once instead of G times.

Each completion attends to the prompt and to itself (a block attention mask: causal inside the prompt and inside
each completion, nothing across completions) and its positions continue from the prompt's end, as if it followed
the prompt alone. Every completion token therefore sees exactly the keys, values and positions it sees in the plain
layout, and the log-probs and their gradients equal the plain path's up to float summation order (the prompt's
gradient is the sum of its samples' contributions, which is what the plain path computes too). Packing also drops
every padding position of the plain layout except the tail of the shorter packed sequences.

The mask is a dense [n, 1, S, S] tensor handed to the model as is (transformers uses a 4-D mask unchanged), so the
attention kernel computes all S x S pairs of a packed sequence: it pays where the prompt is long next to the
completions, and costs more where long completions make S^2 outgrow the plain layout's b (P + T)^2. `packing_pays`
compares the two from the model's shape. SDPA (boolean mask) and eager (additive mask) attention are supported;
flash-attention-2 takes no custom masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rl.logprobs import head_logprobs, token_logprobs
from .rollout import Rollout

PROMPT, PADDING = 0, -1  # segment ids; the samples of a packed sequence are segments 1, 2, ...


@dataclass
class PackedGroups:
    """Rows of a rollout packed one sequence per prompt. n packed sequences of width S, B rows of T tokens."""
    input_ids: torch.Tensor     # [n, S] prompt, then each sample's completion, then right padding
    position_ids: torch.Tensor  # [n, S] the plain layout's positions: 0.. in the prompt, continuing in each sample
    segments: torch.Tensor      # [n, S] PROMPT, sample number (1..), or PADDING
    predictor: torch.Tensor     # [B, T] flat index into [n * S] of the position whose output predicts each token

    @property
    def num_positions(self) -> int:
        return self.input_ids.numel()


def pack_groups(rollout: Rollout, group_ids: torch.Tensor) -> PackedGroups:
    """Pack the rows of `rollout` one sequence per distinct `group_ids` value ([B]; rows with equal ids must hold the
    same prompt), in order of first appearance. A completion's first token is predicted by the prompt's last
    position; each later token by the completion's previous token."""
    ids_list = group_ids.tolist()
    if len(ids_list) != rollout.sequences.shape[0]:
        raise ValueError(f"pack_groups: {len(ids_list)} group ids for {rollout.sequences.shape[0]} rows")
    members: dict[int, list[int]] = {}
    for row, group in enumerate(ids_list):
        members.setdefault(group, []).append(row)
    prompt_lengths = rollout.prompt_mask.sum(dim=1).tolist()
    completion_lengths = rollout.completion_mask.sum(dim=1).tolist()
    _, width = packed_shape(rollout, group_ids)
    device, prompt_width = rollout.sequences.device, rollout.prompt_length
    input_ids = torch.zeros((len(members), width), dtype=torch.long, device=device)
    position_ids = torch.zeros_like(input_ids)
    segments = torch.full_like(input_ids, PADDING)
    predictor = torch.zeros(rollout.completion_mask.shape, dtype=torch.long, device=device)
    for packed_row, rows in enumerate(members.values()):
        prompt_length = prompt_lengths[rows[0]]
        prompt = rollout.sequences[rows[0], prompt_width - prompt_length:prompt_width]  # left padded
        if prompt_length == 0:
            raise ValueError(f"pack_groups: row {rows[0]} has an empty prompt; no position predicts its first token")
        for row in rows[1:]:
            if prompt_lengths[row] != prompt_length or not torch.equal(
                    rollout.sequences[row, prompt_width - prompt_length:prompt_width], prompt):
                raise ValueError(f"pack_groups: rows {rows[0]} and {row} share group id {ids_list[row]} but not "
                                 "their prompt")
        base = packed_row * width
        input_ids[packed_row, :prompt_length] = prompt
        position_ids[packed_row, :prompt_length] = torch.arange(prompt_length, device=device)
        segments[packed_row, :prompt_length] = PROMPT
        start = prompt_length
        for sample, row in enumerate(rows, start=1):
            length = completion_lengths[row]
            end = start + length
            input_ids[packed_row, start:end] = rollout.completions[row, :length]
            position_ids[packed_row, start:end] = torch.arange(prompt_length, prompt_length + length, device=device)
            segments[packed_row, start:end] = sample
            if length:
                predictor[row, 0] = base + prompt_length - 1
                predictor[row, 1:length] = base + torch.arange(start, end - 1, device=device)
            start = end
    return PackedGroups(input_ids=input_ids, position_ids=position_ids, segments=segments, predictor=predictor)


def block_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """[n, S] segments -> boolean [n, 1, S, S], True where a query may attend to a key: causal, and the key is in
    the prompt or in the query's own sample. Padding queries attend to themselves only (no fully masked row, which
    SDPA would turn into NaN); no real query attends to padding."""
    width = segments.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & (query != PADDING) & (key != PADDING) & ((key == PROMPT) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)
    return allowed[:, None]


def _attn_implementation(model: torch.nn.Module) -> str:
    return getattr(getattr(model, "module", model).config, "_attn_implementation", "sdpa")


def _model_attention_mask(model: torch.nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # transformers reads a 4-D mask as given: SDPA takes booleans, eager adds it to the scores.
    implementation = _attn_implementation(model)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)
    raise ValueError(f"the shared-prompt forward needs SDPA or eager attention, not {implementation!r} (custom "
                     "block masks are not supported there); set train.shared_prompt_forward=never")


def shared_prompt_logprobs(model: torch.nn.Module, rollout: Rollout, packed: PackedGroups, temperature: float, *,
                           chunked_head: bool = True) -> torch.Tensor:
    """`completion_logprobs(model, rollout, temperature)` [B, T] computed over `packed` (`pack_groups(rollout, ...)`).

    With `chunked_head` the head runs over the gathered final hidden states a chunk at a time (parameters must be
    whole); without it the model's head computes the logits of every position some token is predicted from."""
    param = next(getattr(model, "module", model).parameters())
    mask = _model_attention_mask(model, block_attention_mask(packed.segments), param.dtype)
    inputs = dict(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids, use_cache=False)
    completions = rollout.completions
    if chunked_head:
        out = model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=mask.device),
                    output_hidden_states=True)
        hidden = out.hidden_states[-1].flatten(0, 1)[packed.predictor]  # [B, T, H]
        head = getattr(model, "module", model).get_output_embeddings()
        return head_logprobs(head, hidden, completions, temperature)
    # The head keeps the same positions on every packed row: those any row predicts from.
    width = packed.input_ids.shape[1]
    keep = torch.unique(packed.predictor % width)  # sorted
    logits = model(**inputs, logits_to_keep=keep).logits  # [n, K, V]
    column = torch.searchsorted(keep, packed.predictor % width)
    flat = (packed.predictor // width) * keep.numel() + column
    return token_logprobs(logits.flatten(0, 1)[flat], completions, temperature)


def supports_block_mask(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention takes the block mask (SDPA or eager)."""
    return _attn_implementation(model) in ("sdpa", "eager")


def packed_shape(rollout: Rollout, group_ids: torch.Tensor) -> tuple[int, int]:
    """(packed sequences, their width) of `pack_groups(rollout, group_ids)`, from the lengths alone."""
    prompt_lengths = rollout.prompt_mask.sum(dim=1).tolist()
    completion_lengths = rollout.completion_mask.sum(dim=1).tolist()
    lengths: dict[int, int] = {}
    for row, group in enumerate(group_ids.tolist()):
        lengths[group] = lengths.get(group, prompt_lengths[row]) + completion_lengths[row]
    return len(lengths), max(lengths.values(), default=0)


def packing_pays(model_config, rollout: Rollout, group_ids: torch.Tensor) -> bool:
    """Whether the packed forward computes fewer FLOPs than the plain one for these rows, per decoder layer:
    2 x (layer parameters) per token position plus 4 x hidden per attention pair (QK^T and AV), where both layouts'
    masked attention computes every pair of a row. The head costs the same in both (completion positions only)."""
    hidden, inter = model_config.hidden_size, model_config.intermediate_size
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", heads) * (getattr(model_config, "head_dim", None)
                                                                 or hidden // heads)
    per_token = 2 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    per_pair = 4 * hidden
    rows, plain_width = rollout.sequences.shape
    sequences, packed_width = packed_shape(rollout, group_ids)
    plain = rows * (plain_width * per_token + plain_width**2 * per_pair)
    packed = sequences * (packed_width * per_token + packed_width**2 * per_pair)
    return packed < plain
