"""Batched sampling from the nested behaviour model with a KV cache.

`generate` returns, besides the tokens, the behaviour log-probabilities of the sampled tokens under the
distribution they were actually drawn from (after temperature and top-p): the denominator of every
off-policy correction. Under ZeRO-3 the caller wraps it in `engine.skip_aware_gather`. In gather-once mode
the kept parameters are local and decoding runs no collective, so each rank decodes its own prompts to its own
EOS. In streamed mode every forward runs collectives; the yielded model then carries its lockstep rule
(`mark_lockstep`), and `generate` always obeys it, so no call site can forget it and deadlock the job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from .nested import SkipPlan, nested_view


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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probabilities of the distribution actually sampled from: softmax(logits / T) restricted to the top-p
    nucleus and renormalised. logits [B, V] -> [B, V] float32 (-inf outside the nucleus)."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return logprobs
    sorted_logprobs, order = logprobs.sort(dim=-1, descending=True)
    # Drop a token when the mass strictly before it already reaches top_p (the top token always stays).
    mass_before = sorted_logprobs.exp().cumsum(-1) - sorted_logprobs.exp()
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: SkipPlan, *,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int], pad_token_id: int, greedy: bool = False,
             generator: torch.Generator | None = None, use_cache: bool = True,
             all_ranks_done: Callable[[bool], bool] | None = None) -> Rollout:
    """Sample one completion per row of the left-padded `input_ids` [B, P] from `model` viewed through `plan`.

    Stops a row at EOS (the EOS token is part of its completion) and the batch when every row has stopped or
    after `max_new_tokens`. `greedy` takes the argmax but still reports temperature-scaled log-probs.
    `use_cache=False` recomputes the whole prefix each step (slow; the reference the cached path is tested
    against). `all_ranks_done(local_done) -> global_done` makes decoding lockstep across ranks (for modes whose
    forward runs collectives): a rank whose rows have all stopped keeps stepping on padding until it returns True.
    A model marked with `mark_lockstep` always decodes with its own rule; passing a different one is an error.
    """
    marked = lockstep_rule(model)
    if marked is not None:
        if all_ranks_done is not None and all_ranks_done is not marked:
            raise ValueError("generate: this model decodes with collectives and carries its own lockstep rule; "
                             "do not pass a different all_ranks_done")
        all_ranks_done = marked
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                           device=input_ids.device)
    batch_size = input_ids.shape[0]
    prompt_mask = attention_mask.long()
    tokens, logprobs, alive_masks = [], [], []
    finished = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
    with nested_view(model, plan):
        model_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        cache = DynamicCache(config=model_config) if use_cache else None
        sequences, full_mask = input_ids, prompt_mask
        step_ids, step_positions = input_ids, position_ids_from_mask(prompt_mask)
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=full_mask, position_ids=step_positions,
                        cache=cache, use_cache=use_cache, logits_to_keep=1)
            step_logprobs = sampling_logprobs(out.logits[:, -1], temperature, top_p)  # [B, V]
            if greedy:
                token = step_logprobs.argmax(-1)
            else:
                token = torch.multinomial(step_logprobs.exp(), 1, generator=generator).squeeze(-1)
            token_logprob = step_logprobs.gather(-1, token[:, None]).squeeze(-1)
            alive = ~finished
            token = torch.where(alive, token, torch.full_like(token, pad_token_id))
            tokens.append(token)
            logprobs.append(torch.where(alive, token_logprob, torch.zeros_like(token_logprob)))
            alive_masks.append(alive.long())
            finished = finished | torch.isin(token, eos_ids)
            done = bool(finished.all())
            if all_ranks_done is not None:
                done = all_ranks_done(done)
            if done:
                break
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            full_mask = torch.cat([full_mask, torch.ones_like(token[:, None])], dim=1)
            if use_cache:
                step_ids = token[:, None]
                step_positions = position_ids_from_mask(full_mask)[:, -1:]
            else:
                step_ids, step_positions = sequences, position_ids_from_mask(full_mask)
    # In lockstep a rank keeps stepping after its own rows have ended: drop those all-padding columns, so the
    # rollout is the same tensor whether or not decoding was lockstep.
    completion_mask = torch.stack(alive_masks, dim=1)  # [B, steps]
    width = max(int(completion_mask.sum(dim=1).max()), 1) if batch_size else len(tokens)
    completions = torch.stack(tokens, dim=1)[:, :width]
    return Rollout(sequences=torch.cat([input_ids, completions], dim=1), prompt_mask=prompt_mask,
                   completion_mask=completion_mask[:, :width],
                   behavior_logprobs=torch.stack(logprobs, dim=1)[:, :width])
