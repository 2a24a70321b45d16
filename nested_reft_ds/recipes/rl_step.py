"""One Nested-ReFT step in three stages: collect (plan, rollout, reward, advantages) -> update (the loss, backward and
optimizer step per micro-batch) -> step_metrics (global metrics); the adaptive schedule's feedback closes it.

Three policies are kept apart: beta, the nested behaviour model that sampled (behaviour log-probs, recorded by
`generate`); pi_prox, the full policy when the batch was sampled; pi_theta, the policy being optimised.
pi_prox is read off the update's own forward, detached: with one optimisation pass DeepSpeed steps the optimizer
only after the last micro-batch, so every micro-batch runs under the sampling-time weights and pi_prox == pi_theta
numerically, which saves one forward pass. Only when the advantages or the loss's normaliser need pi_prox before
the update (`algorithm.kl_in_reward`, `algorithm.normalize_over: kept_tokens`) does a separate no-grad pass
score it (`proximal_logprobs`).

Log-probs of every policy are taken at the rollout temperature, the distribution that was sampled from.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from .. import engine as ds
from ..config import ExperimentConfig, GenerationSettings
from ..data import MathProblem
from ..data.templates import format_prompt
from ..faults import maybe_fail
from ..nested import SkipPlan, SkipScheduler
from ..reward import score_batch_with_stats
from ..reward.score import BatchScores
from ..rl import DiagnosticParts, compute_advantages, kl_estimate, loss_token_mask, merge, policy_loss_parts
from ..rollout import DecodeStats, Rollout, completion_logprobs, encode_prompts, generate, lockstep_rule
from ..speculative import DraftLengths, predicted_speedup
from ..shared_prompt import PackedGroups, pack_groups, packing_pays, shared_prompt_logprobs, supports_block_mask
from .batching import batch_indices, local_share, micro_batches


@dataclass
class StepContext:
    """What every RL step reads: the run's engine, model inputs and settings, and where this rank sits."""
    engine: object                    # the DeepSpeed engine of the policy
    tokenizer: object
    cfg: ExperimentConfig
    problems: list[MathProblem]       # the training problems; each step draws its global batch from them
    skip: SkipScheduler               # skip plans, and the adaptive schedule fed back after each step
    rank: int
    world: int
    reference: object = None          # the frozen KL reference engine (algorithm.kl_coef > 0)
    draft: DraftLengths | None = None  # speculative draft lengths (None: rollout.draft_length at every step)


@dataclass
class BeforeUpdate:
    """Completion log-probs [B, T] of a whole rollout, scored before the update."""
    prox: torch.Tensor                # pi_prox: the full policy under its sampling-time weights
    ref: torch.Tensor | None          # the frozen KL reference, when asked for


@dataclass
class RolloutBatch:
    """What `collect` gathered on this rank: the samples, their rewards and advantages, and how they are laid out."""
    plan: SkipPlan
    rollout: Rollout                  # [B*G] rows: each prompt's G samples are contiguous
    verdicts: BatchScores             # the verifier's scores and counts
    rewards: torch.Tensor             # [B*G] verifier rewards
    kl_penalty: torch.Tensor | None   # [B*G] kl_coef x summed k1, subtracted from the rewards (kl_in_reward)
    advantages: torch.Tensor          # [B*G]
    layout: list[torch.Tensor]        # row indices of each micro-batch of the update
    group_ids: torch.Tensor           # [B*G] each row's prompt
    before_update: BeforeUpdate | None
    decode: DecodeStats
    draft_length: int                 # tokens drafted per speculative round (0: not speculative)
    lockstep: bool                    # decoding ran collectives (streamed ZeRO-3)
    rollout_s: float
    reward_s: float
    prepare_s: float                  # micro-batch layout, the pi_prox pass, advantages (counted as training)


@dataclass
class UpdateResult:
    """What `update` computed on this rank."""
    loss: float                       # this rank's share of the global objective (summed over micro-batches)
    parts: DiagnosticParts            # the estimator's diagnostics, merged over micro-batches
    grad_norm: float
    tokens_computed: int              # positions the training forwards ran
    packed_micro_batches: int
    train_s: float


def rl_step(ctx: StepContext, step: int) -> dict[str, float]:
    """One Nested-ReFT step, the same on every rank (collective). Returns the step's global metrics."""
    plan = ctx.skip.plan(step)                           # 1. skip plan: a function of (seed, step) and reduced stats
    batch = collect(ctx, plan, step)                     # 2-5. rollout, reward, advantages
    result = update(ctx, batch)                          # 6. loss, backward, optimizer step
    metrics = step_metrics(ctx, batch, result)           # 7. metrics over the global batch
    ctx.skip.observe(plan, ess=metrics["ess_tok_raw"], kl=metrics["kl_behavior_k3"],  # the adaptive feedback
                     divergence=skip_divergence(ctx.cfg.rollout.mode, metrics))
    if ctx.draft is not None and metrics.get("spec_drafted_tokens"):  # the adaptive draft length's feedback
        ctx.draft.observe(metrics["spec_acceptance"])
    return {**metrics, **ctx.skip.metrics(), "skipped_layers": list(plan.skipped)}


def skip_divergence(mode: str, metrics: dict[str, float]) -> float:
    """What skipping the plan's layers cost this step, per token, for the learned skip strategy: KL(beta || pi) of
    nested rollouts; for speculative ones, whose samples are the full model's (KL 0), the drafter's rejection rate
    1 - a, the mean total-variation distance between its and the full model's next-token distributions (NaN, which
    the tracker ignores, when nothing was drafted)."""
    if mode == "speculative":
        return 1.0 - metrics["spec_acceptance"] if metrics.get("spec_drafted_tokens") else math.nan
    return metrics["kl_behavior_k3"]


# --------------------------------------------------------------------------------------------------- collect

def collect(ctx: StepContext, plan: SkipPlan, step: int) -> RolloutBatch:
    """G samples per prompt from the nested behaviour model, their rewards and group-relative advantages."""
    cfg, algo, G = ctx.cfg, ctx.cfg.algorithm, ctx.cfg.rollout.group_size
    start = time.perf_counter()
    problems = [ctx.problems[i] for i in local_share(
        batch_indices(len(ctx.problems), cfg.rollout.prompts_per_step, step, cfg.train.seed), ctx.rank, ctx.world)]
    settings = generation_settings(ctx, plan)
    rollout, decode, lockstep = sample(ctx, plan, problems, step, settings)                  # 2. rollout
    sampled = time.perf_counter()
    texts = ctx.tokenizer.batch_decode(rollout.completions, skip_special_tokens=True)
    verdicts = verify(texts, [p.answer for p in problems for _ in range(G)], cfg)          # 3. reward
    rewards = torch.tensor(verdicts.scores, dtype=torch.float32, device=ds.device())       # [B*G]
    verified = time.perf_counter()
    maybe_fail("rl", step, ctx.rank)

    # The update's micro-batches. A group-normalised correction needs each prompt group in one micro-batch, and the
    # shared-prompt forward encodes a prompt once per micro-batch it appears in; otherwise rows bucket singly.
    group_ids = torch.arange(len(texts), device=ds.device()) // G
    unit = G if algo.self_normalize or cfg.train.shared_prompt_forward != "never" else 1
    layout = micro_batches(rollout.prompt_mask.sum(dim=1), rollout.completion_mask.sum(dim=1),
                           ctx.engine.train_micro_batch_size_per_gpu(), unit, cfg.train.bucket_by_length)

    # 4. pi_prox (and the reference) before the update, only where the advantages or the normaliser need it.
    before_update = None
    if algo.kl_in_reward or algo.normalize_over == "kept_tokens":
        before_update = proximal_logprobs(ctx, ctx.reference if algo.kl_in_reward else None, rollout, layout,
                                          group_ids)
    kl_penalty = None
    if algo.kl_in_reward:  # each sequence's summed k1 = log pi_prox - log pi_ref, subtracted from its reward
        kl_penalty = algo.kl_coef * (kl_estimate(before_update.prox, before_update.ref, "k1")
                                     * rollout.completion_mask).sum(dim=1)                 # [B*G]
    penalised = rewards if kl_penalty is None else rewards - kl_penalty
    advantages = compute_advantages(penalised, G, algo.advantage)                         # 5. advantages
    return RolloutBatch(plan=plan, rollout=rollout, verdicts=verdicts, rewards=rewards, kl_penalty=kl_penalty,
                        advantages=advantages, layout=layout, group_ids=group_ids, before_update=before_update,
                        decode=decode, draft_length=settings.draft_length, lockstep=lockstep,
                        rollout_s=sampled - start, reward_s=verified - sampled,
                        prepare_s=time.perf_counter() - verified)


def generation_settings(ctx: StepContext, plan: SkipPlan) -> GenerationSettings:
    """The step's decoding settings: rollout.generation, in speculative mode with the step's draft length (the
    same on every rank: `DraftLengths` reads all-reduced acceptances)."""
    settings = ctx.cfg.rollout.generation
    if ctx.cfg.rollout.mode == "speculative" and ctx.draft is not None:
        settings = dataclasses.replace(settings, draft_length=ctx.draft.length(plan))
    return settings


def sample(ctx: StepContext, plan: SkipPlan, problems: list[MathProblem], step: int,
           settings: GenerationSettings) -> tuple[Rollout, DecodeStats, bool]:
    """G completions per problem from the nested view `plan` of the policy (rollout.mode nested), or drafted by it
    and verified by the full policy (speculative), with their behaviour log-probs. Returns the rollout, what
    decoding computed, and whether it ran in lockstep (streamed ZeRO-3)."""
    cfg, tokenizer, G = ctx.cfg, ctx.tokenizer, ctx.cfg.rollout.group_size
    prompts = [format_prompt(p.question, tokenizer, cfg.data.prompt_template) for p in problems]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, ds.device())
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    step_seed, row_keys = sampling_keys(cfg.train.seed, step, ctx.rank * len(problems) * G, len(problems) * G,
                                        ds.device())
    decode = DecodeStats()
    ctx.engine.eval()
    # Speculative rollouts verify with the full model: every layer is gathered, `plan` only says who drafts.
    gathered = SkipPlan(plan.num_layers) if cfg.rollout.mode == "speculative" else plan
    with ds.skip_aware_gather(ctx.engine, gathered, mode=cfg.rollout.gather,
                              memory_fraction=cfg.rollout.gather_memory_fraction) as model:
        rollout = generate(model, prompt_ids, prompt_mask, plan, settings,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           seed=step_seed, row_keys=row_keys, group_size=G if cfg.rollout.shared_prefill else 1,
                           stats=decode)
        lockstep = lockstep_rule(model) is not None
    return rollout, decode, lockstep


def sampling_keys(seed: int, step: int, first_row: int, num_rows: int, device) -> tuple[int, torch.Tensor]:
    """The sampling seed of `step` and the keys of this rank's rows: their positions in the global rollout batch.

    Keyed sampling (`nested_reft_ds.sampling`) makes a completion a function of (seed, step, prompt position,
    sample), independent of the world size, the micro-batching and resumption."""
    return seed * 1_000_003 + step, torch.arange(first_row, first_row + num_rows, device=device)


def verify(completions: list[str], references: list[str], cfg: ExperimentConfig) -> BatchScores:
    """The verifier's scores (+ counts of timeouts / parse failures) under the experiment's reward settings."""
    return score_batch_with_stats(completions, references, timeout=cfg.reward.timeout, rel_tol=cfg.reward.rel_tol,
                                  format_weight=cfg.reward.format_weight, last_number=cfg.reward.last_number)


@torch.no_grad()
def proximal_logprobs(ctx: StepContext, reference, rollout: Rollout, layout: list[torch.Tensor],
                      group_ids: torch.Tensor) -> BeforeUpdate:
    """pi_prox (and, given `reference`, pi_ref) of every completion token of `rollout`, one no-grad forward per
    micro-batch of `layout`, before any optimizer step. Collective under ZeRO-3: every rank runs as many
    micro-batches."""
    shape, device = rollout.completion_mask.shape, rollout.sequences.device
    prox = torch.zeros(shape, device=device)
    ref = torch.zeros(shape, device=device) if reference is not None else None
    ctx.engine.eval()
    for rows in layout:
        micro_batch = rollout.select(rows)
        width = micro_batch.completion_mask.shape[1]
        packed = packed_layout(ctx.engine, micro_batch, group_ids[rows], ctx.cfg.train.shared_prompt_forward)
        prox[rows, :width] = policy_logprobs(ctx.engine, micro_batch, packed, ctx.cfg.rollout.temperature)
        if ref is not None:
            ref[rows, :width] = policy_logprobs(reference, micro_batch, packed, ctx.cfg.rollout.temperature)
    mask = rollout.completion_mask
    return BeforeUpdate(prox=prox * mask, ref=None if ref is None else ref * mask)


# ---------------------------------------------------------------------------------------------------- update

def update(ctx: StepContext, batch: RolloutBatch) -> UpdateResult:
    """Corrected clipped loss (+ KL to the reference) per micro-batch, backward, and one optimizer step at the
    last micro-batch. Every loss is its micro-batch's share of the global objective (counts all-reduced)."""
    cfg, algo, engine, rollout = ctx.cfg, ctx.cfg.algorithm, ctx.engine, batch.rollout
    start = time.perf_counter()
    prox_before = batch.before_update.prox if batch.before_update is not None else None
    loss_mask = rollout.completion_mask.bool() if prox_before is None else loss_token_mask(
        prox_before, rollout.behavior_logprobs, rollout.completion_mask.float(), algo, group_size=cfg.rollout.group_size)
    num_global_tokens, num_global_seqs = ds.all_reduce_sum([int(loss_mask.sum()), int(loss_mask.any(dim=1).sum())])
    engine.train()
    loss_sum, parts, tokens_computed, packed_count, grad_norm = 0.0, [], 0, 0, 0.0
    for rows in batch.layout:
        micro_batch = rollout.select(rows)  # [b, P' + T'], trimmed to its own longest row
        width = micro_batch.completion_mask.shape[1]
        packed = packed_layout(engine, micro_batch, batch.group_ids[rows], cfg.train.shared_prompt_forward)
        tokens_computed += micro_batch.sequences.numel() if packed is None else packed.num_positions
        packed_count += packed is not None
        ref_logprobs = reference_logprobs(ctx, batch, micro_batch, rows, packed)               # [b, T'] or None
        logprobs = policy_logprobs(engine, micro_batch, packed, cfg.rollout.temperature)       # [b, T'] pi_theta
        prox_logprobs = logprobs.detach() if prox_before is None else prox_before[rows, :width]  # pi_prox
        loss, micro_parts = policy_loss_parts(
            logprobs, prox_logprobs, micro_batch.behavior_logprobs, batch.advantages[rows],
            micro_batch.completion_mask.float(), algo, num_global_tokens=num_global_tokens,
            num_global_seqs=num_global_seqs, ref_logprobs=ref_logprobs, group_size=cfg.rollout.group_size,
            max_completion_length=cfg.rollout.max_new_tokens)
        engine.backward(loss * ds.loss_scale_for_engine(engine))
        boundary_norm = ds.optimizer_step(engine)  # the step's gradient norm, at its last micro-batch
        grad_norm = grad_norm if boundary_norm is None else boundary_norm
        loss_sum += loss.item()
        parts.append(micro_parts)
    return UpdateResult(loss=loss_sum, parts=merge(parts), grad_norm=grad_norm, tokens_computed=tokens_computed,
                        packed_micro_batches=packed_count, train_s=time.perf_counter() - start)


def reference_logprobs(ctx: StepContext, batch: RolloutBatch, micro_batch: Rollout, rows: torch.Tensor,
                       packed: PackedGroups | None) -> torch.Tensor | None:
    """pi_ref of `micro_batch`'s completion tokens: scored before the update, or now (a collective forward under
    ZeRO-3: every rank, every micro-batch); None without a reference."""
    if batch.before_update is not None and batch.before_update.ref is not None:
        return batch.before_update.ref[rows, :micro_batch.completion_mask.shape[1]]
    if ctx.reference is None:
        return None
    with torch.no_grad():
        return policy_logprobs(ctx.reference, micro_batch, packed, ctx.cfg.rollout.temperature)


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


def policy_logprobs(model, micro_batch: Rollout, packed: PackedGroups | None, temperature: float) -> torch.Tensor:
    """Completion log-probs [b, T] of `micro_batch` under `model` (the policy or the reference), over its packed
    layout or the plain one (None)."""
    if packed is not None:
        return shared_prompt_logprobs(model, micro_batch, packed, temperature, chunked_head=unpartitioned(model))
    return completion_logprobs(model, micro_batch, temperature, chunked_head=unpartitioned(model))


# ----------------------------------------------------------------------------------------------- step_metrics

# With one optimisation pass pi_theta / pi_prox is 1 at every token: the PPO clip statistics carry nothing.
_CONSTANT_UNDER_ONE_PASS = ("clip_frac", "ppo_ratio_mean", "ppo_ratio_min", "ppo_ratio_max")


def step_metrics(ctx: StepContext, batch: RolloutBatch, result: UpdateResult) -> dict[str, float]:
    """The step's metrics over the global batch. Collective. The estimator's diagnostics (ESS, ratio quantiles,
    KL, ...) come from all-reduced sums and all-gathered ratios, never averaged over micro-batches or ranks."""
    rollout, decode, world = batch.rollout, batch.decode, ctx.world
    diagnostics = ds.reduce_diagnostics(result.parts)
    for key in _CONSTANT_UNDER_ONE_PASS:
        diagnostics.pop(key, None)
    generated_tokens = rollout.num_completion_tokens
    sequences = rollout.completion_mask.shape[0]
    longest_completion = rollout.completion_mask.sum(dim=1).max().item()
    real_tokens = rollout.attention_mask.sum().item()
    train_s = batch.prepare_s + result.train_s
    # Each micro-batch loss is its share of the global objective: the global loss is the sum over micro-batches
    # and ranks, i.e. world x (the rank-mean of the local sums) after reduce_metrics.
    local = {"loss": result.loss * world}
    local.update({key.replace("/", "_"): value for key, value in batch.verdicts.log_metrics().items()})
    local.update(reward_mean=batch.rewards.mean().item(), reward_std=batch.rewards.std().item(),
                 sample_accuracy=batch.verdicts.sample_accuracy, completion_length=generated_tokens / sequences,
                 # This rank's longest completion; min and max over ranks show how unequal the ranks' rollouts are.
                 longest_completion_min=longest_completion, longest_completion_max=longest_completion,
                 rollout_tokens_per_s=generated_tokens * world / batch.rollout_s,
                 train_tokens_per_s=real_tokens * world / train_s,
                 # Token positions the training forwards ran vs those holding a real token (padding overhead).
                 train_tokens_computed=result.tokens_computed, train_tokens_needed=real_tokens,
                 train_packed_micro_batches=result.packed_micro_batches,
                 # Decode row-steps run vs those of rows still decoding (finished rows carried along), and the
                 # rows the prefill ran (one per prompt with shared prefill).
                 decode_row_steps=decode.row_steps, decode_alive_row_steps=decode.alive_row_steps,
                 prefill_rows=decode.prefill_rows,
                 # TorchScript / torch.compile compilations and CUDA graph captures this step's decoding triggered
                 # (the first steps only, unless a shape is new: a new skip set triggers none), most on any rank.
                 decode_compilations_max=decode.compilations, decode_captures_max=decode.captures,
                 time_rollout_s=batch.rollout_s, time_reward_s=batch.reward_s, time_train_s=train_s,
                 time_step_s=batch.rollout_s + batch.reward_s + train_s, grad_norm=result.grad_norm,
                 skip_ratio=batch.plan.ratio, rollout_lockstep=float(batch.lockstep))
    if batch.kl_penalty is not None:
        local["kl_penalty_mean"] = batch.kl_penalty.mean().item()
    return {**ds.reduce_metrics(local), **diagnostics, **speculative_metrics(ctx, batch)}


def speculative_metrics(ctx: StepContext, batch: RolloutBatch) -> dict[str, float]:
    """rollout.mode speculative: the step's draft length, the global per-token acceptance rate (drafts kept over
    drafts tested: a row's test stops at its first rejection), tokens committed per verify forward (a row's first
    token comes from the prefill) and the speed-up the cost model predicts from them, with the drafter's cost per
    token taken as its share of the layers and a verify forward as one decode step (a memory-bound decode).
    Collective (one all-reduce of sums); {} in nested mode."""
    if ctx.cfg.rollout.mode != "speculative":
        return {}
    decode, rollout = batch.decode, batch.rollout
    verified, drafted, accepted, tested, committed = ds.all_reduce_sum([
        decode.verified_rows, decode.drafted_tokens, decode.accepted_drafts, decode.tested_drafts,
        rollout.num_completion_tokens - rollout.completion_mask.shape[0]])
    acceptance = accepted / max(tested, 1)
    draft_length = batch.draft_length
    draft_cost = len(batch.plan.kept) / batch.plan.num_layers
    return {"spec_draft_length": draft_length, "spec_drafted_tokens": drafted, "spec_acceptance": acceptance,
            "spec_tokens_per_verify": committed / max(verified, 1),
            "spec_predicted_speedup": predicted_speedup(acceptance, draft_length, draft_cost)}
