"""Batched sampling from the nested behaviour model with a KV cache.

`generate` returns, besides the tokens, the behaviour log-probabilities of the sampled tokens under the
distribution they were actually drawn from (after temperature and top-p): the denominator of every
off-policy correction. Under ZeRO-3 the caller wraps it in `engine.skip_aware_gather`. In gather-once mode
the kept parameters are local and decoding runs no collective, so each rank decodes its own prompts to its own
EOS. In streamed mode every forward runs collectives; the yielded model then carries its lockstep rule
(`mark_lockstep`), and `generate` always obeys it, so no call site can forget it and deadlock the job.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from .config import DecodeEngine, GenerationSettings
from .decode import DecodeStats, static_generate
from .nested import SkipPlan, nested_view
from .rl.logprobs import head_logprobs, token_logprobs
from .speculative import speculative_generate
from .sampling import keyed_uniforms, sample_tokens, sampling_logprobs


# The attribute under which a model that decodes with collectives carries its `all_ranks_done` rule.
_LOCKSTEP_ATTR = "_nested_reft_all_ranks_done"


def mark_lockstep(model: torch.nn.Module, all_ranks_done: Callable[[bool], bool] | None) -> None:
    """Declare that `model`'s forward runs collectives (`all_ranks_done` set) or no longer does (None).

    While marked, every `generate` on it decodes in lockstep: every rank runs the same number of forwards."""
    if all_ranks_done is None:
        model.__dict__.pop(_LOCKSTEP_ATTR, None)
    else:
        model.__dict__[_LOCKSTEP_ATTR] = all_ranks_done


def lockstep_rule(model: torch.nn.Module) -> Callable[[bool], bool] | None:
    """The `all_ranks_done` rule `model` was marked with (`mark_lockstep`), or None: ranks decode independently."""
    return model.__dict__.get(_LOCKSTEP_ATTR)


@dataclass
class Rollout:
    sequences: torch.Tensor          # [B, P + T] left-padded prompt followed by the completion (pad after EOS)
    prompt_mask: torch.Tensor        # [B, P] 1 for prompt tokens, 0 for left padding
    completion_mask: torch.Tensor    # [B, T] 1 for sampled tokens up to and including EOS
    behavior_logprobs: torch.Tensor  # [B, T] log beta(token) after temperature/top-p; 0 where masked

    @property
    def prompt_length(self) -> int:
        return self.prompt_mask.shape[1]

    @property
    def completions(self) -> torch.Tensor:  # [B, T]
        return self.sequences[:, self.prompt_length:]

    @property
    def attention_mask(self) -> torch.Tensor:  # [B, P + T]
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout of `rows` (an index tensor) trimmed to the columns those rows use: the prompt padding left
        of their longest prompt and the completion padding right of their longest completion are dropped.

        Dropped columns are masked for every selected row, so a forward over the trimmed rows computes the same
        per-token values as over the full width (up to the summation order of a shorter attention row)."""
        prompt_mask, completion_mask = self.prompt_mask[rows], self.completion_mask[rows]
        used = prompt_mask.any(dim=0)  # left padded: the used prompt columns are a suffix
        start = int(used.long().argmax()) if bool(used.any()) else self.prompt_length
        width = max(int(completion_mask.sum(dim=1).max()), 1) if len(rows) else 1
        sequences = torch.cat([self.sequences[rows, start:self.prompt_length], self.completions[rows, :width]], dim=1)
        return Rollout(sequences=sequences, prompt_mask=prompt_mask[:, start:],
                       completion_mask=completion_mask[:, :width],
                       behavior_logprobs=self.behavior_logprobs[rows, :width])


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(tokenizer, prompts: Sequence[str], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt texts -> left-padded input ids and attention mask [B, P], the layout `generate` and `Rollout` use.

    No special tokens are added: the prompt template (`format_prompt`) already wrote every token the model sees."""
    enc = tokenizer(list(prompts), padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def completion_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float, *,
                        chunked_head: bool = True) -> torch.Tensor:
    """Log-probs [B, T] of the completion tokens of `rollout` under `model`, at `temperature`.

    Differentiable when called with grad. Only positions P-1 .. P+T-2 (those that predict a completion token)
    reach the output head. With `chunked_head` the model returns its final hidden states and the head runs a
    chunk of positions at a time (`head_logprobs`): no [B, T, V] logits exist at once, in forward or backward.
    That calls the output head outside the model's forward, so callers whose parameters are partitioned (ZeRO-3)
    pass False and get the head's logits for the completion positions in one piece. Select and trim rows first
    (`Rollout.select`)."""
    mask = rollout.attention_mask
    new_tokens = rollout.completions.shape[1]
    inputs = dict(input_ids=rollout.sequences, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                  use_cache=False)
    if not chunked_head:
        logits = model(**inputs, logits_to_keep=new_tokens + 1).logits  # [B, T + 1, V]
        return token_logprobs(logits[:, :-1], rollout.completions, temperature)
    # An empty index keeps no logits; the last hidden state is the final norm's output (what the head reads).
    out = model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=mask.device),
                output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -(new_tokens + 1):-1]  # [B, T, H]
    head = getattr(model, "module", model).get_output_embeddings()  # a DeepSpeed engine wraps the model
    return head_logprobs(head, hidden, rollout.completions, temperature)


def stop_token_ids(model: torch.nn.Module, eos_token_id: int | Sequence[int]) -> list[int]:
    """`eos_token_id` and every EOS id of `model`'s generation config, in that order without repeats.

    Chat models end a turn with one token and a document with another (Qwen: `<|im_end|>` and `<|endoftext|>`, both
    listed in generation_config.json); the tokenizer names only one of them as its EOS."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    generation_config = getattr(getattr(model, "module", model), "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    ids += [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return list(dict.fromkeys(ids))


# `generate`'s engines, each static one with its layer-step mode (decode.STEP_MODES). "static" (decode.py) is the
# default: its decode steps between two host reads run under TorchScript's interpreter; "static_eager" runs the
# same Python functions eagerly (same floats, slower; for debugging the step and wherever TorchScript is
# unavailable);
# "static_compiled" runs its layer step under torch.compile and "static_graphs" replays CUDA graphs of it (both
# opt-in: docs/results/decode_cpu.md has what compiling buys on the CPU; the graphs have not run on a GPU yet);
# "reference" is the transformers-forward loop below, which every static decode is tested against and which also
# serves what the static engines do not: lockstep (streamed ZeRO-3) decoding, `use_cache=False`, and models
# outside `decode.ARCHITECTURES`.
STATIC_ENGINES = {"static": "scripted", "static_eager": "eager", "static_compiled": "compiled",
                  "static_graphs": "graphs"}
ENGINES = typing.get_args(DecodeEngine)  # STATIC_ENGINES and "reference"


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: SkipPlan,
             settings: GenerationSettings | None = None, *, eos_token_id: int | Sequence[int], pad_token_id: int,
             seed: int = 0, row_keys: torch.Tensor | None = None, group_size: int = 1, use_cache: bool = True,
             all_ranks_done: Callable[[bool], bool] | None = None, stats: DecodeStats | None = None,
             **overrides) -> Rollout:
    """Sample one completion per row of the left-padded `input_ids` [B, P] from `model` viewed through `plan`.

    `settings` (`config.GenerationSettings`: max_new_tokens, temperature, top_p, greedy, compact_below, engine) say
    how to decode; any of those fields may also be given as a keyword, which overrides `settings` (without
    `settings`, max_new_tokens is required and the rest take GenerationSettings' defaults).

    Stops a row at EOS (the EOS token is part of its completion): any of `eos_token_id` and the EOS ids of the
    model's generation config (`stop_token_ids`); and the batch when every row has stopped or after
    `max_new_tokens`. `greedy` takes the argmax but still reports temperature-scaled log-probs.

    Sampling is keyed (`sampling.keyed_uniforms`): the token at position t of row r reads the uniform of
    (`seed`, `row_keys[r]`, t) (default keys 0..B-1), so a row's tokens do not depend on the rest of the batch.
    That makes two savings exact:
    - `group_size` G > 1 declares that rows come in groups of G identical prompts (a GRPO group): each prompt is
      prefilled once and its KV cache repeated for its G samples.
    - compaction: once the rows still decoding are at most `compact_below` of the rows in the batch, the
      finished ones leave it (KV cache and per-row state), so later steps cost what is alive. 0 never compacts.

    `engine` (`rollout.engine`): "static" decodes with static shapes over the model's own weights (decode.py;
    qwen2 / qwen3 / llama / mistral, anything else is refused with an error naming the reference engine),
    "static_compiled" likewise with its layer step under torch.compile, "static_graphs" (CUDA) with CUDA graphs;
    "reference" with the model's forward and a growing cache. Both give the same tokens and behaviour log-probs
    (up to float summation order). The static engine hands over to the reference one by itself where it cannot
    run: a model that decodes with collectives (streamed ZeRO-3: its parameters are fetched by per-module hooks,
    which a functional step over the weights would bypass), an explicit `all_ranks_done`, and `use_cache=False`.
    `stats.engine` says which engine ran.

    `use_cache=False` recomputes the whole prefix each step (slow; the reference the cached path is tested
    against). `all_ranks_done(local_done) -> global_done` makes decoding lockstep across ranks (for modes whose
    forward runs collectives): a rank whose rows have all stopped keeps stepping on one row until it returns
    True. A model marked with `mark_lockstep` always decodes with its own rule; passing a different one is an
    error. `stats`, if given, is filled with the token-steps computed and needed.
    """
    if settings is None and "max_new_tokens" not in overrides:
        raise TypeError("generate: give settings (a GenerationSettings) or max_new_tokens")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(GenerationSettings)})
    if unknown:
        raise TypeError(f"generate: unexpected keyword arguments {unknown}")
    settings = dataclasses.replace(settings or GenerationSettings(), **overrides)
    max_new_tokens, temperature, top_p = settings.max_new_tokens, settings.temperature, settings.top_p
    greedy, compact_below, engine = settings.greedy, settings.compact_below, settings.engine
    marked = lockstep_rule(model)
    if marked is not None:
        if all_ranks_done is not None and all_ranks_done is not marked:
            raise ValueError("generate: this model decodes with collectives and carries its own lockstep rule; "
                             "do not pass a different all_ranks_done")
        all_ranks_done = marked
    batch_size, device = input_ids.shape[0], input_ids.device
    if group_size < 1 or batch_size % group_size:
        raise ValueError(f"generate: group_size must be >= 1 and divide the batch ({batch_size}), got {group_size}")
    if not 0.0 <= compact_below <= 1.0:
        raise ValueError(f"generate: compact_below must be in [0, 1], got {compact_below}")
    prompt_mask = attention_mask.long()
    if group_size > 1:
        grouped_ids = input_ids.view(-1, group_size, input_ids.shape[1])
        grouped_mask = prompt_mask.view(-1, group_size, input_ids.shape[1])
        if not (torch.equal(grouped_ids, grouped_ids[:, :1].expand_as(grouped_ids))
                and torch.equal(grouped_mask, grouped_mask[:, :1].expand_as(grouped_mask))):
            raise ValueError(f"generate: group_size={group_size} but the rows of a group are not the same prompt")
    row_keys = torch.arange(batch_size, device=device) if row_keys is None else row_keys.to(device)
    if row_keys.shape != (batch_size,):
        raise ValueError(f"generate: row_keys must have shape ({batch_size},), got {tuple(row_keys.shape)}")
    stats = stats if stats is not None else DecodeStats()
    eos_ids = torch.tensor(stop_token_ids(model, eos_token_id), device=device)
    # The functional engines (static and speculative) run on whole weights with a KV cache, outside lockstep.
    functional = bool(batch_size) and use_cache and all_ranks_done is None
    if engine == "static_graphs" and device.type != "cuda" and functional:
        raise ValueError(f"generate: CUDA graphs (rollout.engine=static_graphs) need a CUDA device, not {device}")
    if settings.draft_length and batch_size:
        if not functional:
            raise ValueError("generate: speculative decoding (draft_length > 0) runs on whole weights with a KV cache; "
                             "it cannot decode in lockstep (streamed ZeRO-3) or with use_cache=False")
        tokens, completion_mask, behavior_logprobs = speculative_generate(
            model, input_ids, prompt_mask, plan, draft_length=settings.draft_length, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, eos_ids=eos_ids, pad_token_id=pad_token_id, greedy=greedy,
            seed=seed, row_keys=row_keys, group_size=group_size, compact_below=compact_below,
            step_mode={"static_eager": "eager", "static_graphs": "graphs"}.get(engine, "scripted"), stats=stats)
        stats.engine = "speculative"
        steps_taken = max_new_tokens
    elif engine in STATIC_ENGINES and functional:
        tokens, completion_mask, behavior_logprobs = static_generate(
            model, input_ids, prompt_mask, plan, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, eos_ids=eos_ids, pad_token_id=pad_token_id, greedy=greedy, seed=seed, row_keys=row_keys,
            group_size=group_size, compact_below=compact_below, step_mode=STATIC_ENGINES[engine], stats=stats)
        stats.engine = engine
        steps_taken = max_new_tokens
    else:
        tokens, completion_mask, behavior_logprobs, steps_taken = _reference_decode(
            model, input_ids, prompt_mask, plan, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, eos_ids=eos_ids, pad_token_id=pad_token_id, greedy=greedy, seed=seed, row_keys=row_keys,
            group_size=group_size, compact_below=compact_below, use_cache=use_cache, all_ranks_done=all_ranks_done,
            stats=stats)
        stats.engine = "reference"
    # In lockstep a rank keeps stepping after its own rows have ended, and the static engine runs up to
    # `sync_every` steps past the last row's end: keep only the columns some row used, so the rollout is the same
    # tensor whatever the engine and whether or not decoding was lockstep.
    width = max(int(completion_mask.sum(dim=1).max()), 1) if batch_size else steps_taken
    stats.alive_row_steps += int(completion_mask[:, 1:].sum())  # every decode step's alive rows, after the prefill
    return Rollout(sequences=torch.cat([input_ids, tokens[:, :width]], dim=1), prompt_mask=prompt_mask,
                   completion_mask=completion_mask[:, :width], behavior_logprobs=behavior_logprobs[:, :width])


def _reference_decode(model: torch.nn.Module, input_ids: torch.Tensor, prompt_mask: torch.Tensor, plan: SkipPlan, *,
                      max_new_tokens: int, temperature: float, top_p: float, eos_ids: torch.Tensor,
                      pad_token_id: int, greedy: bool, seed: int, row_keys: torch.Tensor, group_size: int,
                      compact_below: float, use_cache: bool, all_ranks_done: Callable[[bool], bool] | None,
                      stats: DecodeStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The reference engine: the model's forward with a DynamicCache, one step at a time. Returns tokens,
    completion mask, behaviour log-probs [B, max_new_tokens] and the steps taken (arguments checked by `generate`)."""
    batch_size, device = input_ids.shape[0], input_ids.device
    # Output rows in the caller's order; `rows` maps the rows now in the batch to them.
    tokens = torch.full((batch_size, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    behavior_logprobs = torch.zeros((batch_size, max_new_tokens), device=device)
    completion_mask = torch.zeros((batch_size, max_new_tokens), dtype=torch.long, device=device)
    rows = torch.arange(batch_size, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    steps_taken = 0
    with nested_view(model, plan):
        model_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        cache = DynamicCache(config=model_config) if use_cache else None
        sequences, full_mask = input_ids, prompt_mask
        shared = use_cache and group_size > 1
        step_ids = input_ids[::group_size] if shared else input_ids
        step_mask = prompt_mask[::group_size] if shared else prompt_mask
        step_positions = position_ids_from_mask(step_mask)
        for position in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_positions,
                        cache=cache, use_cache=use_cache, logits_to_keep=1)
            last_logits = out.logits[:, -1]
            if position == 0:
                stats.prefill_rows += step_ids.shape[0]
                if shared:  # one prefill per prompt: its cache and next-token logits serve its G samples
                    cache.batch_repeat_interleave(group_size)
                    last_logits = last_logits.repeat_interleave(group_size, dim=0)
            else:
                stats.steps += 1
                stats.row_steps += rows.numel()
            step_logprobs = sampling_logprobs(last_logits, temperature, top_p)  # [b, V]
            if greedy:
                token = step_logprobs.argmax(-1)
            else:
                token = sample_tokens(step_logprobs, keyed_uniforms(seed, row_keys[rows], position))
            token_logprob = step_logprobs.gather(-1, token[:, None]).squeeze(-1)
            alive = ~finished[rows]
            tokens[rows, position] = torch.where(alive, token, torch.full_like(token, pad_token_id))
            behavior_logprobs[rows, position] = torch.where(alive, token_logprob, torch.zeros_like(token_logprob))
            completion_mask[rows, position] = alive.long()
            finished[rows] = finished[rows] | (alive & torch.isin(token, eos_ids))
            steps_taken = position + 1
            done = bool(finished.all())
            stats.host_reads += 1
            if all_ranks_done is not None:
                done = all_ranks_done(done)
            if done or position + 1 == max_new_tokens:
                break
            token = tokens[rows, position]
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            full_mask = torch.cat([full_mask, torch.ones_like(token[:, None])], dim=1)
            still = ~finished[rows]
            stats.host_reads += int(compact_below > 0 and use_cache)
            if compact_below > 0 and use_cache and int(still.sum()) <= compact_below * rows.numel():
                # Keep the alive rows (at least one: a lockstep rank with none left still runs the forwards).
                keep = still.nonzero().squeeze(-1) if bool(still.any()) else still.new_zeros(1, dtype=torch.long)
                if keep.numel() < rows.numel():
                    rows, sequences, full_mask = rows[keep], sequences[keep], full_mask[keep]
                    cache.batch_select_indices(keep)
                    stats.compactions += 1
            if use_cache:
                step_ids, step_mask = sequences[:, -1:], full_mask
                step_positions = position_ids_from_mask(full_mask)[:, -1:]
            else:
                step_ids, step_mask, step_positions = sequences, full_mask, position_ids_from_mask(full_mask)
    return tokens, completion_mask, behavior_logprobs, steps_taken
