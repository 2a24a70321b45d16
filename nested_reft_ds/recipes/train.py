"""Nested-ReFT training recipe: `python -m nested_reft_ds.train` / `nested-reft train` / the deepspeed launcher.

One RL step, top to bottom (see `rl_step`):
    plan skip -> rollout with the nested behaviour model -> reward -> group advantages
    -> target log-probs with the full model -> off-policy corrected clipped loss -> backward/step -> log

Where this departs from the Nested-ReFT paper, and why:
- The off-policy correction is configurable (`algorithm.correction`, default per-token truncated IS,
  `token_tis`) instead of one fixed estimator: per-token forms keep variance bounded when sequence ratio
  products saturate (a per-token ratio of 1.1 is ~14,000 over 100 tokens).
- pi_prox (the full target at sampling time) is read off the training forward itself, detached. With one
  optimisation pass per rollout batch, DeepSpeed steps the optimizer only after the last micro-batch, so every
  micro-batch is computed under the sampling-time weights and pi_prox == pi_theta numerically; this saves
  one full forward pass per step. A second pass per batch would need a separate no-grad forward.
- Log-probs for both behaviour and target are taken at the rollout temperature, the distribution that was
  sampled from.
- The skip plan is a function of (seed, step) and of statistics already all-reduced (adaptive schedule, learned
  layer choice), not broadcast from rank 0: no communication, and
  resume reproduces it; agreement is still verified by a collective check each step.
- The embedded default starts from a randomly initialised tiny model, so an SFT warm-up (`train.sft_steps`)
  precedes RL to give it non-zero reward; a pretrained `model.path` sets sft_steps to 0. The warm-up uses
  LayerDrop (`train.sft_layer_drop`): a model trained from scratch without it is no usable behaviour policy
  once layers are skipped, where pretrained LLMs tolerate skipping middle layers. Its lr decays to the RL lr.
- The KL reference (`algorithm.kl_coef > 0`) is the policy as RL starts: after the SFT warm-up, or as loaded
  when there is none, rather than the pretrained base model (with a warm-up that is the model RL refines).
  It sees the full model (no skipping) and is scored at the rollout temperature, like pi_theta. It is frozen;
  every RL checkpoint carries a copy of it, so a resumed run penalises against the very same reference.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import engine as backend
from ..checks import check_model_inputs, check_output_dir, check_solutions
from ..config import ConfigError, ExperimentConfig, load_config
from ..data import MathProblem, problems_from_config
from ..data.templates import format_prompt
from ..faults import check_fault_ranks, maybe_fail
from ..fingerprint import base_model_fingerprint, check_base_model, model_fingerprint, run_fingerprint, write_fingerprint
from ..model import build_tiny_model, check_model_dir, select_attn_implementation
from ..nested import SkipPlan, SkipScheduler, nested_view, sample_skip_plan
from ..reward import score_batch_with_stats
from ..rl import compute_advantages, kl_estimate, loss_token_mask, merge, policy_loss_parts
from ..rollout import DecodeStats, Rollout, completion_logprobs, encode_prompts, generate, lockstep_rule
from ..shared_prompt import PackedGroups, pack_groups, packing_pays, shared_prompt_logprobs, supports_block_mask
from ..run_log import RunLog

log = logging.getLogger("nested_reft_ds")


# ------------------------------------------------------------------------------------------ data plumbing

def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the global batch for `step`: consecutive slices of a per-epoch seeded permutation.

    A pure function of (seed, step), so every rank and every resumed run draw the same batch."""
    indices, position = [], step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, num_items)
        order = list(range(num_items))
        random.Random(f"nested-reft-data:{seed}:{epoch}").shuffle(order)
        take = min(batch_size - len(indices), num_items - offset)
        indices += order[offset:offset + take]
        position += take
    return indices


def local_share(items: list, rank: int, world: int) -> list:
    """Rank `rank`'s contiguous slice of a global batch whose size divides by `world`."""
    size = len(items) // world
    return items[rank * size:(rank + 1) * size]


def teacher_forced(tokenizer, problems: list[MathProblem], template: str, device, *,
                   question_loss: bool = False) -> tuple[Rollout, torch.Tensor]:
    """Worked solutions (+ EOS) laid out like a rollout for the SFT warm-up, and the mask [B, T] of the completion
    positions that hold the solution. The loss covers the completion: with `question_loss` that starts after the
    prompt's first token, so the question is trained on as well; without, it is the solution alone."""
    prompts = [format_prompt(p.question, tokenizer, template) for p in problems]
    targets = [tokenizer(" " + p.solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
               for p in problems]
    if question_loss:
        prompt_rows = tokenizer(prompts, add_special_tokens=False).input_ids
        prompt_ids = torch.tensor([row[:1] for row in prompt_rows], dtype=torch.long, device=device)
        prompt_mask = torch.ones_like(prompt_ids)
        questions = [row[1:] for row in prompt_rows]
    else:
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
        questions = [[] for _ in problems]
    width = max(len(q) + len(t) for q, t in zip(questions, targets))
    completions = torch.full((len(targets), width), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(targets), width), dtype=torch.long)
    solution_mask = torch.zeros((len(targets), width), dtype=torch.long)
    for row, (question, target) in enumerate(zip(questions, targets)):
        completions[row, :len(question) + len(target)] = torch.tensor(question + target)
        completion_mask[row, :len(question) + len(target)] = 1
        solution_mask[row, len(question):len(question) + len(target)] = 1
    rollout = Rollout(sequences=torch.cat([prompt_ids, completions.to(device)], 1), prompt_mask=prompt_mask,
                      completion_mask=completion_mask.to(device),
                      behavior_logprobs=torch.zeros(completions.shape, device=device))
    return rollout, solution_mask.to(device)


def micro_batches(prompt_lengths: torch.Tensor, completion_lengths: torch.Tensor, micro: int, group_size: int,
                  bucket_by_length: bool) -> list[torch.Tensor]:
    """Row indices of each micro-batch of `micro` rows, given each row's prompt and completion lengths [N].

    Without bucketing: consecutive rows. With it: units of rows (whole prompt groups of `group_size`, when a
    micro-batch holds whole groups, as a group-normalised correction or the shared-prompt forward needs; else
    single rows) are ordered so that the micro-batches, each trimmed to its longest prompt plus its longest
    completion (`Rollout.select`), compute the fewest positions. A trimmed width has two parts, so no one sort key
    is best for every batch: the order as given and the units sorted (longest first, stable) by longest row, by
    longest completion then prompt, and by longest prompt then completion are costed, and the cheapest is kept
    (ties: the earlier). The loss is a sum of per-token terms with global normalisers, so the order of rows changes
    nothing but float summation order; the layout is a pure function of the lengths."""
    num_rows = prompt_lengths.numel()
    device = prompt_lengths.device
    rows = torch.arange(num_rows, device=device)
    if not bucket_by_length:
        return [rows[start:start + micro] for start in range(0, num_rows, micro)]
    unit = group_size if micro % group_size == 0 and num_rows % group_size == 0 else 1
    prompt_unit = prompt_lengths.view(-1, unit).max(dim=1).values
    completion_unit = completion_lengths.view(-1, unit).max(dim=1).values
    total_unit = (prompt_lengths + completion_lengths).view(-1, unit).max(dim=1).values

    def by(primary: torch.Tensor, secondary: torch.Tensor | None = None) -> torch.Tensor:
        order = torch.arange(primary.numel(), device=device)
        for key in ([secondary] if secondary is not None else []) + [primary]:  # least significant key first
            order = order[torch.sort(key[order], descending=True, stable=True).indices]
        return order

    def cost(order: torch.Tensor) -> int:
        candidate = (order[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
        return sum(len(piece) * int(prompt_lengths[piece].max() + completion_lengths[piece].max())
                   for piece in candidate.split(micro))

    candidates = [torch.arange(prompt_unit.numel(), device=device), by(total_unit),
                  by(completion_unit, prompt_unit), by(prompt_unit, completion_unit)]
    best = min(candidates, key=cost)  # min keeps the first of equal costs
    rows = (best[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
    return list(rows.split(micro))


def unpartitioned(model) -> bool:
    """Whether `model`'s parameters are whole on every rank (a plain module, or a DeepSpeed engine at ZeRO 0-2),
    so its output head may run outside its forward (`completion_logprobs(chunked_head=True)`)."""
    stage = getattr(model, "zero_optimization_stage", None)
    return stage is None or stage() < 3


def packed_layout(model, micro_batch: Rollout, group_ids: torch.Tensor, mode: str) -> PackedGroups | None:
    """`micro_batch` packed one sequence per prompt when train.shared_prompt_forward=`mode` scores it so, else None
    (the plain layout)."""
    if mode == "never" or (mode == "auto" and not supports_block_mask(model)):
        return None
    if mode == "auto" and not packing_pays(getattr(model, "module", model).config, micro_batch, group_ids):
        return None
    return pack_groups(micro_batch, group_ids)


def scored_logprobs(model, micro_batch: Rollout, packed: PackedGroups | None, temperature: float) -> torch.Tensor:
    """Completion log-probs [b, T] of `micro_batch` under `model`: over its packed layout, or the plain one (None)."""
    if packed is not None:
        return shared_prompt_logprobs(model, micro_batch, packed, temperature, chunked_head=unpartitioned(model))
    return completion_logprobs(model, micro_batch, temperature, chunked_head=unpartitioned(model))


@dataclass
class BeforeUpdate:
    """Completion log-probs [B, T] of a whole rollout, scored before the update."""
    prox: torch.Tensor              # pi_prox: the full policy under its sampling-time weights
    ref: torch.Tensor | None        # the frozen KL reference, when asked for


@torch.no_grad()
def proximal_logprobs(engine, reference, rollout: Rollout, layout: list[torch.Tensor], group_ids: torch.Tensor,
                      cfg: ExperimentConfig) -> BeforeUpdate:
    """pi_prox (and, given `reference`, pi_ref) of every completion token of `rollout`, one no-grad forward per
    micro-batch of `layout`, before any optimizer step. Collective under ZeRO-3: every rank runs as many
    micro-batches."""
    shape = rollout.completion_mask.shape
    prox = torch.zeros(shape, device=rollout.sequences.device)
    ref = torch.zeros(shape, device=rollout.sequences.device) if reference is not None else None
    engine.eval()
    for rows in layout:
        micro_batch = rollout.select(rows)
        width = micro_batch.completion_mask.shape[1]
        packed = packed_layout(engine, micro_batch, group_ids[rows], cfg.train.shared_prompt_forward)
        prox[rows, :width] = scored_logprobs(engine, micro_batch, packed, cfg.rollout.temperature)
        if ref is not None:
            ref[rows, :width] = scored_logprobs(reference, micro_batch, packed, cfg.rollout.temperature)
    return BeforeUpdate(prox=prox * rollout.completion_mask, ref=None if ref is None else ref * rollout.completion_mask)


def score(completions: list[str], references: list[str], cfg: ExperimentConfig):
    """Verifier scores (+ counts of timeouts / parse failures) under the experiment's reward settings."""
    return score_batch_with_stats(completions, references, timeout=cfg.reward.timeout, rel_tol=cfg.reward.rel_tol,
                                  format_weight=cfg.reward.format_weight, last_number=cfg.reward.last_number)


def sampling_keys(seed: int, step: int, first_row: int, num_rows: int, device) -> tuple[int, torch.Tensor]:
    """The sampling seed of `step` and the keys of this rank's rows: their positions in the global rollout batch.

    Keyed sampling (`nested_reft_ds.sampling`) makes a completion a function of (seed, step, prompt position,
    sample), independent of the world size, the micro-batching and resumption."""
    return seed * 1_000_003 + step, torch.arange(first_row, first_row + num_rows, device=device)


# ----------------------------------------------------------------------------------------------- phases

def sft_step(engine, tokenizer, problems: list[MathProblem], cfg: ExperimentConfig, step: int, rank: int,
             world: int) -> dict[str, float]:
    """One supervised step on worked solutions (the warm-up): token-mean cross entropy over all ranks.

    `sft_loss` is the solution's token-mean loss whether or not the question is trained on
    (`train.sft_question_loss`, which adds `sft_question_loss`), so warm-ups compare on one measure."""
    # Linear decay from sft_lr to the RL lr: annealed to 0, the warm-up would settle where the landscape is too
    # sharp for any RL step (measured on the tiny default: RL at lr 1e-4 then halved greedy accuracy).
    lr = cfg.train.sft_lr + (cfg.train.lr - cfg.train.sft_lr) * step / cfg.train.sft_steps
    backend.set_learning_rate(engine, lr)
    micro = engine.train_micro_batch_size_per_gpu()
    local_rows = micro * engine.gradient_accumulation_steps()
    chosen = batch_indices(len(problems), local_rows * world, step, cfg.train.seed + 1)
    batch, solution_mask = teacher_forced(tokenizer, [problems[i] for i in local_share(chosen, rank, world)],
                                          cfg.data.prompt_template, backend.device(),
                                          question_loss=cfg.train.sft_question_loss)
    (num_global_tokens,) = backend.all_reduce_sum([batch.num_completion_tokens])
    # Odd steps from train.sft_layer_drop_from on train a random nested view (LayerDrop), a pure function of
    # (seed, step) like RL skip plans.
    num_layers = engine.module.config.num_hidden_layers
    plan = (sample_skip_plan(num_layers, cfg.train.sft_layer_drop, step, cfg.train.seed + 2)
            if step % 2 and step >= cfg.train.sft_layer_drop_from else SkipPlan(num_layers))
    engine.train()
    # This rank's summed negative log-likelihood: all loss tokens, and the solution's (read once, after the loop).
    total_nll = solution_nll = torch.zeros((), device=solution_mask.device)
    for rows in micro_batches(batch.prompt_mask.sum(dim=1), batch.completion_mask.sum(dim=1), micro, 1,
                              cfg.train.bucket_by_length):
        micro_batch = batch.select(rows)
        with nested_view(engine.module, plan):
            logprobs = completion_logprobs(engine, micro_batch, 1.0, chunked_head=unpartitioned(engine))
        nll = -(logprobs * micro_batch.completion_mask)
        engine.backward(nll.sum() / num_global_tokens * backend.loss_scale_for_engine(engine))
        backend.optimizer_step(engine)  # skipped layers take a zero-gradient step at every ZeRO stage
        total_nll = total_nll + nll.detach().sum()
        solution_nll = solution_nll + (nll.detach() * solution_mask[rows][:, :nll.shape[1]]).sum()
    maybe_fail("sft", step, rank)
    solution_tokens = int(solution_mask.sum())
    solution_nll, total_nll, solution_tokens, total_tokens = backend.all_reduce_sum(
        [float(solution_nll), float(total_nll), solution_tokens, batch.num_completion_tokens])
    metrics = {"sft_loss": solution_nll / solution_tokens, "lr": lr, "sft_skipped": len(plan.skipped)}
    if cfg.train.sft_question_loss:
        metrics["sft_question_loss"] = (total_nll - solution_nll) / max(total_tokens - solution_tokens, 1.0)
    return metrics


def rl_step(engine, tokenizer, problems: list[MathProblem], cfg: ExperimentConfig, skip: SkipScheduler, step: int,
            rank: int, world: int, reference=None) -> dict[str, float]:
    """One Nested-ReFT step. Collective: every rank runs it for the same `step`.

    `reference`: the frozen KL reference (`backend.build_reference`), required when algorithm.kl_coef > 0."""
    timer = time.perf_counter
    t0 = timer()
    G, algo = cfg.rollout.group_size, cfg.algorithm

    # 1. Skip plan: a function of (seed, step) and rank-reduced statistics only, identical on every rank.
    plan = skip.plan(step)

    # 2. Rollout: G samples per prompt from the nested behaviour model, with their behaviour log-probs.
    chosen = batch_indices(len(problems), cfg.rollout.prompts_per_step, step, cfg.train.seed)
    batch = [problems[i] for i in local_share(chosen, rank, world)]
    prompts = [format_prompt(p.question, tokenizer, cfg.data.prompt_template) for p in batch]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, backend.device())
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    step_seed, row_keys = sampling_keys(cfg.train.seed, step, rank * len(batch) * G, len(batch) * G, backend.device())
    engine.eval()
    decode = DecodeStats()
    with backend.skip_aware_gather(engine, plan, mode=cfg.rollout.gather,
                                   memory_fraction=cfg.rollout.gather_memory_fraction) as model:
        rollout = generate(model, prompt_ids, prompt_mask, plan, max_new_tokens=cfg.rollout.max_new_tokens,
                           temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           seed=step_seed, row_keys=row_keys, group_size=G if cfg.rollout.shared_prefill else 1,
                           compact_below=cfg.rollout.compact_below, stats=decode, engine=cfg.rollout.engine)
        lockstep = lockstep_rule(model) is not None  # streamed: decoding ran collectives
    t_rollout = timer()

    # 3. Reward: verify each completion's final answer against its problem's reference.
    texts = tokenizer.batch_decode(rollout.completions, skip_special_tokens=True)
    scored = score(texts, [p.answer for p in batch for _ in range(G)], cfg)
    rewards = torch.tensor(scored.scores, dtype=torch.float32, device=backend.device())  # [B*G]
    t_reward = timer()
    maybe_fail("rl", step, rank)

    # The update's micro-batches. A group-normalised correction needs each prompt group in one micro-batch, and the
    # shared-prompt forward encodes a prompt once per micro-batch it appears in; otherwise rows bucket singly.
    group_ids = torch.arange(len(texts), device=backend.device()) // G  # each row's prompt
    unit = G if algo.self_normalize or cfg.train.shared_prompt_forward != "never" else 1
    layout = micro_batches(rollout.prompt_mask.sum(dim=1), rollout.completion_mask.sum(dim=1),
                           engine.train_micro_batch_size_per_gpu(), unit, cfg.train.bucket_by_length)

    # 4. pi_prox (and the reference) before the update, only when the advantages or the loss's normaliser need it;
    # otherwise pi_prox is read off the update's own forward (see the module docstring).
    before_update = None
    if algo.kl_in_reward or algo.normalize_over == "kept_tokens":
        before_update = proximal_logprobs(engine, reference if algo.kl_in_reward else None, rollout, layout,
                                          group_ids, cfg)
    kl_penalty = None
    if algo.kl_in_reward:  # each sequence's summed k1 = log pi_prox - log pi_ref, subtracted from its reward
        kl_penalty = algo.kl_coef * (kl_estimate(before_update.prox, before_update.ref, "k1")
                                     * rollout.completion_mask).sum(dim=1)  # [B*G]

    # 5. Group-relative advantages (each prompt's G samples are contiguous rows).
    advantages = compute_advantages(rewards if kl_penalty is None else rewards - kl_penalty, G, algo.advantage)

    # 6-7. Reference and target log-probs with the full model, corrected clipped loss (+ KL to the reference),
    # backward/step per micro-batch. The loss's counts are global: the completion tokens, or those it keeps.
    loss_mask = rollout.completion_mask.bool() if before_update is None else loss_token_mask(
        before_update.prox, rollout.behavior_logprobs, rollout.completion_mask.float(), algo, group_size=G)
    num_global_tokens, num_global_seqs = backend.all_reduce_sum([int(loss_mask.sum()),
                                                                 int(loss_mask.any(dim=1).sum())])
    engine.train()
    local_share_of_loss, micro_parts, tokens_computed, packed_micro_batches, grad_norm = 0.0, [], 0, 0, 0.0
    for rows in layout:
        micro_batch = rollout.select(rows)  # [b, P' + T'], trimmed to its own longest row
        width = micro_batch.completion_mask.shape[1]
        packed = packed_layout(engine, micro_batch, group_ids[rows], cfg.train.shared_prompt_forward)
        tokens_computed += micro_batch.sequences.numel() if packed is None else packed.num_positions
        packed_micro_batches += packed is not None
        ref_logprobs = None
        if before_update is not None and before_update.ref is not None:
            ref_logprobs = before_update.ref[rows, :width]
        elif reference is not None:  # under ZeRO-3 a collective forward: every rank, every micro-batch
            with torch.no_grad():
                ref_logprobs = scored_logprobs(reference, micro_batch, packed, cfg.rollout.temperature)  # [b, T']
        logprobs = scored_logprobs(engine, micro_batch, packed, cfg.rollout.temperature)  # [b, T'] pi_theta
        # pi_prox: the policy at sampling time. With one optimisation pass the optimizer steps after the last
        # micro-batch, so this forward runs under the sampling-time weights and pi_prox = pi_theta, detached.
        prox_logprobs = logprobs.detach() if before_update is None else before_update.prox[rows, :width]
        loss, parts = policy_loss_parts(logprobs, prox_logprobs, micro_batch.behavior_logprobs,
                                        advantages[rows], micro_batch.completion_mask.float(), algo,
                                        num_global_tokens=num_global_tokens, num_global_seqs=num_global_seqs,
                                        ref_logprobs=ref_logprobs, group_size=G,
                                        max_completion_length=cfg.rollout.max_new_tokens)
        engine.backward(loss * backend.loss_scale_for_engine(engine))
        boundary_norm = backend.optimizer_step(engine)  # the step's gradient norm, at its last micro-batch
        grad_norm = grad_norm if boundary_norm is None else boundary_norm
        local_share_of_loss += loss.item()
        micro_parts.append(parts)
    t_train = timer()

    # 7. Log. The estimator's diagnostics (ESS, ratio quantiles, KL, ...) are computed over the global batch from
    # all-reduced sums and all-gathered ratios, never averaged over micro-batches or ranks.
    diagnostics = backend.reduce_diagnostics(merge(micro_parts))
    # Each micro-batch loss is its share of the global objective: the global loss is the sum over micro-batches
    # and ranks, i.e. world x (the rank-mean of the local sums) after reduce_metrics.
    local = {"loss": local_share_of_loss * world}
    generated_tokens = rollout.num_completion_tokens
    longest_completion = rollout.completion_mask.sum(dim=1).max().item()
    local.update({key.replace("/", "_"): value for key, value in scored.log_metrics().items()})
    local.update(reward_mean=rewards.mean().item(), reward_std=rewards.std().item(),
                 sample_accuracy=scored.sample_accuracy, completion_length=generated_tokens / len(texts),
                 # This rank's longest completion; min and max over ranks show how unequal the ranks' rollouts are.
                 longest_completion_min=longest_completion, longest_completion_max=longest_completion,
                 rollout_tokens_per_s=generated_tokens * world / (t_rollout - t0),
                 train_tokens_per_s=rollout.attention_mask.sum().item() * world / (t_train - t_reward),
                 # Token positions the training forwards ran vs those holding a real token (padding overhead).
                 train_tokens_computed=tokens_computed, train_tokens_needed=rollout.attention_mask.sum().item(),
                 train_packed_micro_batches=packed_micro_batches,
                 # Decode row-steps run vs those of rows still decoding (finished rows carried along), and the
                 # rows the prefill ran (one per prompt with shared prefill).
                 decode_row_steps=decode.row_steps, decode_alive_row_steps=decode.alive_row_steps,
                 prefill_rows=decode.prefill_rows,
                 time_rollout_s=t_rollout - t0, time_reward_s=t_reward - t_rollout, time_train_s=t_train - t_reward,
                 time_step_s=t_train - t0, grad_norm=grad_norm,
                 skip_ratio=plan.ratio, rollout_lockstep=float(lockstep))
    if kl_penalty is not None:
        local["kl_penalty_mean"] = kl_penalty.mean().item()
    # With one optimisation pass pi_theta / pi_prox is 1 at every token: the PPO clip statistics carry nothing.
    for key in ("clip_frac", "ppo_ratio_mean", "ppo_ratio_min", "ppo_ratio_max"):
        diagnostics.pop(key, None)
    reduced = {**backend.reduce_metrics(local), **diagnostics}
    # The adaptive schedule's feedback: the raw ratio statistics, whatever the correction did with them.
    skip.observe(plan, ess=reduced["ess_tok_raw"], kl=reduced["kl_behavior_k3"])
    reduced.update(skip.metrics())
    reduced["skipped_layers"] = list(plan.skipped)
    return reduced


def greedy_accuracy(engine, tokenizer, problems: list[MathProblem], cfg: ExperimentConfig, rank: int,
                    world: int) -> float:
    """Held-out greedy accuracy of the full target (no skipping). Collective: one gather for the whole eval.

    Every rank runs the same number of equally sized generate calls (streamed decoding is collective): shards
    shorter than the longest are padded with copies of their first problem, which are not scored."""
    shard = problems[rank::world]
    per_rank = -(-len(problems) // world)  # the longest shard
    padded = shard + shard[:1] * (per_rank - len(shard))
    correct = 0.0
    engine.eval()
    with backend.skip_aware_gather(engine, SkipPlan(engine.module.config.num_hidden_layers), cfg.rollout.gather,
                                   memory_fraction=cfg.rollout.gather_memory_fraction) as model:
        for start in range(0, len(padded), 64):
            batch = padded[start:start + 64]
            prompts = [format_prompt(p.question, tokenizer, cfg.data.prompt_template) for p in batch]
            ids, mask = encode_prompts(tokenizer, prompts, backend.device())
            rollout = generate(model, ids, mask, SkipPlan(model.config.num_hidden_layers),
                               max_new_tokens=cfg.rollout.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, greedy=True, engine=cfg.rollout.engine)
            real = shard[start:start + 64]
            texts = tokenizer.batch_decode(rollout.completions[:len(real)], skip_special_tokens=True)
            correct += sum(score(texts, [p.answer for p in real], cfg).correct)
    (total_correct,) = backend.all_reduce_sum([correct])
    return total_correct / max(len(problems), 1)


# ----------------------------------------------------------------------------------------------- driver

@dataclass
class Progress:
    """What a checkpoint adds to DeepSpeed's own state: where in the run we are."""
    sft_step: int = 0
    rl_step: int = 0

    def tag(self) -> str:
        return f"rl_step{self.rl_step}" if self.rl_step else f"sft_step{self.sft_step}"


def prepare_model_dir(cfg: ExperimentConfig, out_dir: Path, rank: int) -> Path:
    """model.path, or the embedded tiny model built (once, by rank 0) into <output_dir>/base_model."""
    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"config key 'model.path' has invalid value {cfg.model.path!r}: expected a local "
                              "Hugging Face checkpoint directory (with config.json)")
        return check_model_dir(path)
    path = out_dir / "base_model"
    if rank == 0 and not (path / "config.json").is_file():
        build_tiny_model(cfg.model, path, cfg.train.seed)
        write_fingerprint(path, base_model_fingerprint(cfg.model, cfg.train.seed))
    backend.barrier()
    check_base_model(path, cfg.model, cfg.train.seed)  # a stale base_model: ConfigError naming keys and values
    return path


def start_reference(engine, cfg: ExperimentConfig, ds_config: dict, model_dir: Path, progress: Progress,
                    resumed_from: Path | None):
    """The frozen KL reference for the RL phase (None when algorithm.kl_coef is 0). Collective.

    At RL step 0 it is a copy of the policy now (after the SFT warm-up, or as loaded); past step 0 the policy
    has moved on, so the copy saved in the checkpoint being resumed is restored instead."""
    if cfg.algorithm.kl_coef == 0 or progress.rl_step >= cfg.train.steps:
        return None
    if progress.rl_step == 0:
        return backend.build_reference(model_dir, ds_config, cfg.model.attn_implementation, policy=engine)
    if resumed_from is None or not backend.has_saved_reference(resumed_from):
        raise ConfigError(f"config key 'algorithm.kl_coef' has invalid value {cfg.algorithm.kl_coef!r} for resuming "
                          f"from {str(resumed_from)!r}: that checkpoint holds no KL reference (it was written with "
                          "algorithm.kl_coef=0), and the reference (the policy at RL step 0) cannot be rebuilt "
                          "from a later step; resume with algorithm.kl_coef=0 or start RL from an SFT checkpoint")
    return backend.build_reference(model_dir, ds_config, cfg.model.attn_implementation, saved=resumed_from)


def run(cfg: ExperimentConfig, ds_config_path: str | None, resume: str) -> dict[str, float | None]:
    """Train per `cfg`; returns summary numbers (reward and accuracy before/after; None where nothing was held
    out). Collective."""
    check_output_dir(cfg.train.output_dir)
    if cfg.train.cpu_threads is not None:
        torch.set_num_threads(backend.cpu_threads_per_rank(cfg.train.cpu_threads))
    rank, world = backend.init_distributed()
    check_fault_ranks(world)
    backend.start_watchdog()
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.train.output_dir)
    ds_config = backend.fill_ds_config(backend.load_ds_config(ds_config_path, cfg), cfg, world)
    train_problems, eval_problems = problems_from_config(cfg.data, cfg.train.seed)
    check_solutions(cfg, train_problems)
    model_dir = prepare_model_dir(cfg, out_dir, rank)
    model, tokenizer = backend.load_model_for_engine(model_dir, ds_config, cfg.model.attn_implementation)
    warnings = check_model_inputs(cfg, model.config, tokenizer, train_problems, eval_problems)
    engine = backend.build_engine(model, ds_config)
    skip = SkipScheduler(cfg.skip, model.config.num_hidden_layers, cfg.train.seed)
    ckpt_dir = out_dir / "checkpoints"
    # What a checkpoint pins (nested_reft_ds.fingerprint): checked before a resume loads anything, recorded by
    # every save (an SFT checkpoint pins less than an RL one: RL may start from it with another rollout layout).
    model_fp = model_fingerprint(model.config, tokenizer)
    fingerprint = {phase: run_fingerprint(cfg, model_fp, world, ds_config=ds_config, problems=train_problems,
                                          phase=phase) for phase in (None, "sft", "rl")}

    progress = Progress()
    resumed_from = None  # the checkpoint directory <dir>/<tag> this run continues from
    if resume != "none":
        resume_dir = ckpt_dir if resume == "auto" else Path(resume)
        state = backend.load_checkpoint(engine, resume_dir, fingerprint=fingerprint[None])
        if state is None and resume != "auto":
            raise ConfigError(f"--resume {resume}: no committed checkpoint there")
        if state is not None:
            progress = Progress(**state["progress"])
            skip.load_state_dict(state["skip"])
            resumed_from = resume_dir / backend.latest_tag(resume_dir)
    # After the resume check, so that a refused resume never touches metrics.jsonl; records past the resume
    # point (written before a crash) are dropped, so each step is in the files once.
    run_log = RunLog(out_dir, rank == 0, tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar,
                     resume_at=(progress.sft_step, progress.rl_step),
                     echo_prefix=f"[rank {rank}] " if cfg.logging.all_ranks and rank != 0 else None)
    run_log.message(f"world {world} | ZeRO-{engine.zero_optimization_stage()} | attention "
                    f"{select_attn_implementation(cfg.model.attn_implementation)} | "
                    f"{model.config.num_hidden_layers} layers | resume at sft {progress.sft_step}, rl {progress.rl_step}")
    for warning in warnings:
        run_log.message(f"warning: {warning}")

    reference = None  # the frozen KL reference, from the start of RL on

    def checkpoint() -> None:
        def finish_tag(tag_dir: Path) -> None:  # every rank, once its shard is on disk, before the commit
            if reference is not None:
                backend.save_reference(reference, tag_dir)
            maybe_fail("checkpoint", progress.rl_step or progress.sft_step, rank)
        state = {"progress": vars(progress), "skip": skip.state_dict(), "config": cfg.to_dict()}
        backend.save_checkpoint(engine, ckpt_dir, progress.tag(), state, keep=cfg.train.keep_checkpoints,
                                fingerprint=fingerprint["rl" if progress.rl_step else "sft"], write_extra=finish_tag)

    def due(step: int, last: int) -> bool:  # a checkpoint every train.save_every steps and at the end of a phase
        return (cfg.train.save_every and step % cfg.train.save_every == 0) or step == last

    run_log.start_phase("warm-up", cfg.train.sft_steps, progress.sft_step)
    while progress.sft_step < cfg.train.sft_steps:
        metrics = sft_step(engine, tokenizer, train_problems, cfg, progress.sft_step, rank, world)
        if progress.sft_step % cfg.logging.log_every == 0:
            run_log.log(progress.sft_step, metrics, phase="sft")
        progress.sft_step += 1
        run_log.step_done()
        if due(progress.sft_step, cfg.train.sft_steps):
            checkpoint()

    def evaluate() -> float | None:
        if not eval_problems:  # n/a: an accuracy of 0 would read as a model that solves nothing
            return None
        accuracy = greedy_accuracy(engine, tokenizer, eval_problems, cfg, rank, world)
        run_log.log(progress.rl_step, {"heldout_accuracy": accuracy}, phase="eval")
        return accuracy

    reference = start_reference(engine, cfg, ds_config, model_dir, progress, resumed_from)
    summary = {"heldout_accuracy_before": evaluate()}
    first_rewards, last_rewards = [], []
    accuracy = summary["heldout_accuracy_before"]  # held-out accuracy at the current step, if measured
    run_log.start_phase("rl", cfg.train.steps, progress.rl_step)
    while progress.rl_step < cfg.train.steps:
        step = progress.rl_step
        backend.set_learning_rate(engine, cfg.train.lr * min(1.0, (step + 1) / max(cfg.train.warmup_steps, 1)))
        metrics = rl_step(engine, tokenizer, train_problems, cfg, skip, step, rank, world, reference)
        (first_rewards if step < cfg.train.steps / 2 else last_rewards).append(metrics["reward_mean"])
        if step % cfg.logging.log_every == 0:
            run_log.log(step, metrics)
        progress.rl_step += 1
        run_log.step_done()
        accuracy = None
        if cfg.logging.eval_every and progress.rl_step % cfg.logging.eval_every == 0:
            accuracy = evaluate()
        if due(progress.rl_step, cfg.train.steps):
            checkpoint()
    if progress.rl_step > 0:
        summary["heldout_accuracy_after"] = evaluate() if accuracy is None else accuracy
    if first_rewards and last_rewards:
        summary.update(reward_first_half=sum(first_rewards) / len(first_rewards),
                       reward_second_half=sum(last_rewards) / len(last_rewards))
    run_log.message("summary: " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in summary.items()))
    run_log.close()
    backend.stop_watchdog()
    backend.barrier()  # no rank tears down while another still communicates (nor while its watchdog still polls)
    return summary


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="nested-reft train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="experiment YAML (default: the embedded tiny arithmetic recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set rollout.group_size=8 (repeatable)")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON (\"auto\" values are filled from the config)")
    parser.add_argument("--resume", default="auto", metavar="auto|none|DIR",
                        help="auto: continue from <output_dir>/checkpoints if committed there (default); "
                             "none: start fresh; DIR: a checkpoint directory")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def train_main(args: argparse.Namespace) -> int:
    """Fail-stop (`engine.failstop`): a `ConfigError` on any rank is one line and exit 2; any other exception
    prints its traceback once, rank-tagged, and ends every rank of the job with exit 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return backend.fail_stop(lambda: run(load_config(args.config, args.overrides), args.deepspeed, args.resume))
    finally:
        backend.shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    return train_main(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
