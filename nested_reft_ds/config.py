"""Experiment configuration: YAML + dotted overrides -> frozen, validated dataclasses.

This is the only place configuration is parsed. Every section is a frozen dataclass; `Literal[...]` fields
list their allowed values, and `__post_init__` checks ranges. Errors are `ConfigError` (a ValueError) whose
message names the dotted key, the bad value and what is allowed, so the CLI can print one line and exit 2.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data.synthetic import STEP_LABELS
from .data.templates import NAMED_TEMPLATES, is_template
from .errors import ConfigError



def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' has invalid value {value!r}: expected {expected}")


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    """A local HF checkpoint directory; None builds the embedded tiny model (see nested_reft_ds.model)."""
    arch: Literal["qwen2", "llama", "qwen3", "mistral"] = "qwen2"
    """Architecture and size of the embedded model (ignored when `path` is set)."""
    hidden_size: int = 128
    """Hidden size of the embedded model."""
    num_layers: int = 6
    """Decoder layers of the embedded model."""
    num_heads: int = 4
    """Attention heads of the embedded model (hidden_size must divide by it)."""
    num_kv_heads: int = 2
    """Key/value heads of the embedded model (grouped-query attention; divides num_heads)."""
    intermediate_size: int = 384
    """MLP width of the embedded model."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel: "auto" picks flash_attention_2 on CUDA when flash-attn imports, else sdpa."""

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, key)
            _require(value >= 1, f"model.{key}", value, "an integer >= 1")
        _require(self.hidden_size % self.num_heads == 0, "model.hidden_size", self.hidden_size,
                 f"a multiple of model.num_heads={self.num_heads}")
        _require(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads", self.num_kv_heads,
                 f"a divisor of model.num_heads={self.num_heads}")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "gsm8k", "math500", "svamp", "aime24", "amc23", "asdiv", "mawps", "json"] = \
        "synthetic"
    """Built-in source name, or "json" for a local JSONL/JSON/parquet file given by `path`."""
    path: str | None = None
    """Data file (JSONL/JSON/parquet) or a hub dataset id; required for every source but "synthetic"."""
    split: str = "train"
    """Split of a hub dataset id (file sources ignore it)."""
    question_field: str | None = None
    """Field holding the question, for "json" sources (built-in sources know their own layout)."""
    answer_field: str | None = None
    """Field holding the reference answer, for "json" sources."""
    answer_format: Literal["plain", "gsm8k"] = "plain"
    """How to read the reference answer out of `answer_field`: as is, or after GSM8K's "#### "."""
    num_problems: int = 4000
    """Training problems: how many synthetic problems to draw, or at most how many rows of a file train."""
    eval_problems: int = 128
    """Held-out problems, evaluated greedily before and after RL (and every logging.eval_every steps): fresh
    synthetic draws, or the first rows of a file (the rest train)."""
    min_operand: int = 1
    """Smallest operand of the synthetic task."""
    max_operand: int = 20
    """Largest operand of the synthetic task."""
    min_steps: int = 1
    """Fewest arithmetic steps in a synthetic problem."""
    max_steps: int = 2
    """Most arithmetic steps in a synthetic problem."""
    step_continue_probability: float | None = None
    """Synthetic chain lengths. null: the step count is uniform in [min_steps, max_steps]; q in [0, 1): min_steps plus a geometric count
    (each further step with probability q) capped at max_steps, a long-tailed chain length."""
    solution_error_rate: float = 0.0
    """Imperfect demonstrator: this fraction of the synthetic worked solutions (SFT targets only; reference answers
    stay true) computes the last step off by one. SFT then imitates the mistake at that rate and RL, rewarded
    against the true answer, has a verifiable error to remove, as ReFT does beyond SFT."""
    step_labels: bool = False
    """Synthetic steps lettered (a), (b), ... in the question and the worked solution alike (one letter per step)."""
    restate_steps: bool = False
    """Synthetic worked solutions repeat each step's sentence before its arithmetic (`synthetic_problems`)."""
    prompt_template: str = "auto"
    """Prompt template: "auto" uses the tokenizer's chat template when it has one, else the plain template;
    "plain", "chat", or a custom template string with a {question} (and optionally {instruction}) placeholder."""

    def __post_init__(self) -> None:
        if self.source != "synthetic":
            _require(self.path is not None, "data.path", self.path,
                     f"a data file or dataset id (required when data.source={self.source!r})")
        _require(self.num_problems >= 1, "data.num_problems", self.num_problems, "an integer >= 1")
        _require(self.eval_problems >= 0, "data.eval_problems", self.eval_problems, "an integer >= 0")
        _require(0 <= self.min_operand <= self.max_operand, "data.max_operand", self.max_operand,
                 f"an integer >= data.min_operand={self.min_operand} >= 0")
        _require(1 <= self.min_steps <= self.max_steps, "data.max_steps", self.max_steps,
                 f"an integer >= data.min_steps={self.min_steps} >= 1")
        _require(self.step_continue_probability is None or 0.0 <= self.step_continue_probability < 1.0,
                 "data.step_continue_probability", self.step_continue_probability, "null or a float in [0, 1)")
        _require(not self.step_labels or self.max_steps <= len(STEP_LABELS), "data.max_steps", self.max_steps,
                 f"an integer <= {len(STEP_LABELS)} when data.step_labels is true (one letter per step)")
        _require(0.0 <= self.solution_error_rate <= 1.0, "data.solution_error_rate", self.solution_error_rate,
                 "a float in [0, 1]")
        _require(is_template(self.prompt_template), "data.prompt_template", self.prompt_template,
                 f"one of {', '.join(NAMED_TEMPLATES)} or a template string with a {{question}} placeholder")


# No model this package trains has a context this long; a larger value is a typo (1e10), refused before anything
# is built. The model's own max_position_embeddings bounds it further once the model is known (`checks`).
MAX_NEW_TOKENS = 1 << 20
# Longest speculative draft per round (rollout.draft_length).
MAX_DRAFT_LENGTH = 16
# Sampling keys are built from the seed as non-negative int64 (`recipes.train.sampling_keys`: seed * 1_000_003 + step).
MAX_SEED = 2**32 - 1


DecodeEngine = Literal["static", "static_eager", "static_compiled", "static_graphs", "reference"]


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are decoded: what `rollout.generate` takes, and what training (`RolloutConfig.generation`),
    held-out evaluation, `nested-reft eval` and the benchmarks hand it. Build variants with `dataclasses.replace`."""
    max_new_tokens: int = 48
    """Longest completion; a row that has not emitted EOS by then stops there."""
    temperature: float = 1.0
    """Sampling temperature; behaviour log-probs are taken at it (also under greedy decoding)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: the whole vocabulary)."""
    greedy: bool = False
    """Take the most likely token instead of sampling."""
    compact_below: float = 0.75
    """Finished rows leave the batch once the rows still decoding are at most this fraction of it (0: never)."""
    engine: DecodeEngine = "static"
    """The decode engine (`rollout.engine`)."""
    draft_length: int = 0
    """0: sample from the model viewed through the skip plan. g >= 1: self-speculative sampling (speculative.py):
    the model viewed through the plan drafts g tokens per round and the full model verifies them, so completions are
    distributed as the full model's; decoded by speculative.py, each round's draft and verify phases under
    TorchScript (eagerly with engine "static_eager", from CUDA graphs with "static_graphs")."""

    def __post_init__(self) -> None:
        _require(1 <= self.max_new_tokens <= MAX_NEW_TOKENS, "generation.max_new_tokens", self.max_new_tokens,
                 f"an integer in [1, {MAX_NEW_TOKENS}]")
        _require(self.temperature > 0, "generation.temperature", self.temperature, "a float > 0")
        _require(0 < self.top_p <= 1, "generation.top_p", self.top_p, "a float in (0, 1]")
        _require(0 <= self.compact_below <= 1, "generation.compact_below", self.compact_below, "a float in [0, 1]")
        _require(self.engine in typing.get_args(DecodeEngine), "generation.engine", self.engine,
                 f"one of {', '.join(typing.get_args(DecodeEngine))}")
        _require(0 <= self.draft_length <= MAX_DRAFT_LENGTH, "generation.draft_length", self.draft_length,
                 f"an integer in [0, {MAX_DRAFT_LENGTH}]")


@dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 16
    """Prompts per optimizer step, summed over all data-parallel ranks (must divide evenly by the world size)."""
    group_size: int = 8
    """Samples per prompt (G): the group whose rewards give each other's advantages."""
    max_new_tokens: int = 48
    """Longest completion; a row that has not emitted EOS by then stops there."""
    temperature: float = 1.0
    """Sampling temperature; every policy's log-probs are taken at it."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: the whole vocabulary). Below 1 only with algorithm.correction: none
    (docs/estimators.md)."""
    gather: Literal["once", "streamed", "auto"] = "once"
    """ZeRO-3 parameter handling during generation (see nested_reft_ds.engine.gather)."""
    gather_memory_fraction: float = 0.5
    """With rollout.gather "auto": gather once when the kept layers take at most this fraction of the smallest
    free device memory over ranks (gather-once holds them next to the KV cache and activations), else stream."""
    compact_below: float = 0.75
    """Exact decode saving (sampling noise is keyed per token, so it changes no sampled token): finished rows
    leave the batch once the rows still decoding are at most this fraction of it (0: never)."""
    shared_prefill: bool = True
    """Prefill each prompt once for its group_size samples (exact: sampling is keyed per token)."""
    mode: Literal["nested", "speculative"] = "nested"
    """How completions are sampled. "nested": from the nested model of the step's skip plan (off-policy, weighted by
    algorithm.correction; plain ReFT is "nested" at skip.ratio 0). "speculative": the nested model drafts
    rollout.draft_length tokens per round and the full model verifies them with the speculative sampling rule
    (nested_reft_ds/speculative.py), so completions are distributed as the full model's and training is on-policy
    (algorithm.correction none); under ZeRO-3 every layer is gathered for the rollout, the verifier runs them all."""
    draft_length: int = 4
    """With rollout.mode "speculative": tokens the nested model drafts per verify forward of the full model (with
    rollout.adaptive_draft, the first step's)."""
    adaptive_draft: bool = False
    """With rollout.mode "speculative": each step's draft length is the g in [1, rollout.max_draft_length] that
    maximises the predicted speed-up (1 - a^(g+1)) / ((1 - a) (g c + 1)), with a the per-token draft acceptance rate
    of the earlier steps (drafts kept / drafts tested; a moving average of their all-reduced rates, weight 0.3 on the
    newest) and c the kept share of the step's
    layers (the cost model of a memory-bound decode). Every rank chooses the same g; a resumed run continues the
    same sequence."""
    max_draft_length: int = 8
    """Longest draft length rollout.adaptive_draft may choose."""
    engine: DecodeEngine = "static"
    """Decode engine of `rollout.generate`. "static": static shapes over the model's own weights
    (nested_reft_ds/decode.py; qwen2 / qwen3 / llama / mistral, other models are refused), its decode steps run by
    TorchScript's interpreter; "static_eager": the same Python layer step run eagerly (same floats, slower: for
    debugging, or where TorchScript is unavailable); "static_compiled": the layer step under torch.compile
    (compiles once per batch bucket, never per skip set; opt-in, see docs/results/decode_cpu.md); "static_graphs"
    (CUDA): the layer step replayed from one CUDA graph per decoder layer and batch bucket, never recaptured for a
    new skip set, in speculative mode the drafter's and verifier's forwards too (opt-in until it has passed
    scripts/gpu_check.sh on a GPU); "reference": the model's forward with
    a growing cache, for any model. Same tokens and behaviour log-probs (up to float summation order); streamed
    ZeRO-3 decoding always runs the reference engine. With rollout.mode "speculative", "static_eager" and
    "static_graphs" choose how its rounds run and every other engine runs them scripted."""

    @property
    def generation(self) -> GenerationSettings:
        """The decode settings of every RL rollout."""
        return GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                  top_p=self.top_p, compact_below=self.compact_below, engine=self.engine,
                                  draft_length=self.draft_length if self.mode == "speculative" else 0)

    def __post_init__(self) -> None:
        _require(0 <= self.compact_below <= 1, "rollout.compact_below", self.compact_below, "a float in [0, 1]")
        _require(0 < self.gather_memory_fraction <= 1, "rollout.gather_memory_fraction",
                 self.gather_memory_fraction, "a float in (0, 1]")
        _require(self.prompts_per_step >= 1, "rollout.prompts_per_step", self.prompts_per_step, "an integer >= 1")
        _require(self.group_size >= 2, "rollout.group_size", self.group_size,
                 "an integer >= 2 (group-relative advantages need at least two samples)")
        _require(1 <= self.max_new_tokens <= MAX_NEW_TOKENS, "rollout.max_new_tokens", self.max_new_tokens,
                 f"an integer in [1, {MAX_NEW_TOKENS}] (and below the model's max_position_embeddings)")
        _require(self.temperature > 0, "rollout.temperature", self.temperature, "a float > 0")
        _require(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "a float in (0, 1]")
        _require(1 <= self.draft_length <= MAX_DRAFT_LENGTH, "rollout.draft_length", self.draft_length,
                 f"an integer in [1, {MAX_DRAFT_LENGTH}]")
        _require(1 <= self.max_draft_length <= MAX_DRAFT_LENGTH, "rollout.max_draft_length", self.max_draft_length,
                 f"an integer in [1, {MAX_DRAFT_LENGTH}]")
        if self.adaptive_draft:
            _require(self.mode == "speculative", "rollout.adaptive_draft", self.adaptive_draft,
                     "false unless rollout.mode='speculative' (only speculative rollouts draft)")
            _require(self.draft_length <= self.max_draft_length, "rollout.draft_length", self.draft_length,
                     f"an integer <= rollout.max_draft_length={self.max_draft_length} with rollout.adaptive_draft")


@dataclass(frozen=True)
class SkipConfig:
    ratio: float = 0.25
    """Fraction of decoder layers the behaviour model skips (0 = standard ReFT, on-policy); the starting ratio of
    the adaptive schedule."""
    strategy: Literal["random", "contiguous", "learned"] = "random"
    """Which layers: uniform subset, one contiguous block, or weighted toward layers whose skipping cost the least
    measured divergence so far ("learned": per-token KL(beta || pi) of nested rollouts; with rollout.mode
    "speculative", whose samples are the full model's, the drafter's rejection rate, so the drafter keeps the
    layers it agrees best with)."""
    schedule: Literal["fixed", "linear", "adaptive"] = "fixed"
    """How the ratio evolves: "fixed", `ratio` every step; "linear", ramped from 0 to `ratio` over `ramp_steps`;
    "adaptive", moved toward the largest ratio whose raw token ESS/N stays near target_ess and KL(beta || pi) near
    target_kl (nested.controller.AdaptiveSkipController: smoothed statistics, a hysteresis band)."""
    ramp_steps: int = 0
    """Steps over which the "linear" schedule ramps the ratio from 0 to `ratio`."""
    ratio_min: float = 0.0
    """Lowest ratio the adaptive schedule may choose."""
    ratio_max: float = 0.5
    """Highest ratio the adaptive schedule may choose."""
    target_ess: float | None = None
    """Target of the adaptive schedule: the raw (untruncated) token-level ESS/N of pi_prox / beta, whatever the
    correction (null: not a target)."""
    target_kl: float | None = None
    """Target of the adaptive schedule: per-token KL(beta || pi_prox) (null: not a target)."""
    step_size: float = 0.05
    """How far the adaptive ratio moves in one step."""
    smoothing: float = 0.3
    """Weight of the newest step in the moving average of each statistic the adaptive schedule reads."""
    tolerance: float = 0.5
    """Relative half-width of the band around each target inside which the adaptive ratio holds."""
    protect_first: int = 1
    """The first this many decoder layers are never skipped."""
    protect_last: int = 1
    """The last this many decoder layers are never skipped."""

    def __post_init__(self) -> None:
        _require(0.0 <= self.ratio < 1.0, "skip.ratio", self.ratio, "a float in [0, 1)")
        _require(self.ramp_steps >= 0, "skip.ramp_steps", self.ramp_steps, "an integer >= 0")
        _require(self.protect_first >= 0, "skip.protect_first", self.protect_first, "an integer >= 0")
        _require(self.protect_last >= 0, "skip.protect_last", self.protect_last, "an integer >= 0")
        _require(self.schedule != "linear" or self.ramp_steps > 0, "skip.ramp_steps", self.ramp_steps,
                 "an integer > 0 when skip.schedule='linear'")
        if self.schedule == "adaptive":
            _require(0.0 <= self.ratio_min <= self.ratio <= self.ratio_max < 1.0, "skip.ratio_min/ratio/ratio_max",
                     (self.ratio_min, self.ratio, self.ratio_max), "0 <= ratio_min <= ratio <= ratio_max < 1")
            _require(self.target_ess is not None or self.target_kl is not None, "skip.target_ess/target_kl",
                     (self.target_ess, self.target_kl), "at least one target when skip.schedule='adaptive'")
            _require(self.ratio_min < self.ratio_max, "skip.ratio_max", self.ratio_max,
                     f"a float > skip.ratio_min={self.ratio_min} (the adaptive ratio could not move)")
            _require(0 < self.step_size <= self.ratio_max - self.ratio_min, "skip.step_size", self.step_size,
                     f"a float in (0, ratio_max - ratio_min = {self.ratio_max - self.ratio_min:g}]")
            _require(0 < self.smoothing <= 1, "skip.smoothing", self.smoothing, "a float in (0, 1]")
            _require(0 <= self.tolerance < 1, "skip.tolerance", self.tolerance, "a float in [0, 1)")
        _require(self.target_ess is None or 0 < self.target_ess < 1, "skip.target_ess", self.target_ess,
                 "null or a float in (0, 1) (the raw ESS/N reaches 1 only on-policy)")
        _require(self.target_kl is None or self.target_kl > 0, "skip.target_kl", self.target_kl, "null or a float > 0")


@dataclass(frozen=True)
class AlgorithmConfig:
    """The policy-gradient estimator; docs/estimators.md gives each correction's formula and normaliser."""
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """Group-relative advantage: grpo (mean/std normalised), dr_grpo (mean-centred), rloo (leave-one-out)."""
    correction: Literal["none", "seq_is", "token_tis", "token_mis", "seq_mis"] = "token_tis"
    """Off-policy correction for behaviour (nested) samples; weights use pi_prox / behaviour, detached."""
    is_cap: float | None = 2.0
    """Truncation cap C for seq_is / token_tis (None: no cap)."""
    mask_low: float = 0.5
    """Lower end of the masking band [mask_low, mask_high] for token_mis / seq_mis."""
    mask_high: float = 2.0
    """Upper end of the masking band (see mask_low)."""
    seq_mis_geometric: bool = True
    """For seq_mis: test the geometric-mean ratio exp(mean_t log rho_t) instead of the raw product."""
    self_normalize: bool = False
    """For seq_is only: rescale the weights so each prompt group's valid sequences average 1 (biased, lower variance)."""
    clip_eps_low: float = 0.2
    """Lower PPO clip: r_t = pi_theta / pi_prox is clipped at 1 - clip_eps_low (the trust region acts on
    optimisation drift only, never on the nested-model mismatch, which the off-policy weight corrects)."""
    clip_eps_high: float = 0.28
    """Upper PPO clip: r_t is clipped at 1 + clip_eps_high."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """How token losses are aggregated: token_mean, seq_mean_token_mean, or seq_mean_token_sum_norm (Dr. GRPO);
    docs/estimators.md gives each normaliser."""
    normalize_over: Literal["completion_tokens", "kept_tokens"] = "completion_tokens"
    """What the loss aggregation counts: every completion token (a token_mis / seq_mis mask then scales the gradient
    by the kept fraction), or only the tokens the mask keeps (verl's rejection-sampling form; costs one no-grad
    forward of the policy per step, to know the kept count before the update)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the frozen reference (0: no reference model)."""
    kl_in_reward: bool = False
    """Where the penalty goes: false, a per-token loss term (weighted like the policy-gradient term); true, the
    sequence's summed k1 KL subtracted from its reward before the advantages (verl's use_kl_in_reward; costs one
    no-grad forward of the policy and the reference per step, before the update)."""
    kl_estimator: Literal["auto", "k1", "k2", "k3"] = "auto"
    """KL estimator (rl/kl.py). "auto" picks the one whose expected gradient is that of KL(pi_theta || pi_ref) where
    the penalty goes: k2 in the loss, k1 in the reward. k3 in the loss follows the forward KL(pi_ref ||
    pi_theta); k1 in the loss has zero expected gradient, and k2 / k3 in the reward follow no KL, so those are
    refused."""

    def __post_init__(self) -> None:
        _require(self.is_cap is None or self.is_cap >= 1.0, "algorithm.is_cap", self.is_cap, "null or a float >= 1")
        _require(0.0 <= self.mask_low < 1.0 < self.mask_high, "algorithm.mask_low/mask_high",
                 (self.mask_low, self.mask_high), "0 <= mask_low < 1 < mask_high")
        _require(0.0 < self.clip_eps_low < 1.0, "algorithm.clip_eps_low", self.clip_eps_low, "a float in (0, 1)")
        _require(self.clip_eps_high > 0.0, "algorithm.clip_eps_high", self.clip_eps_high, "a float > 0")
        _require(self.kl_coef >= 0.0, "algorithm.kl_coef", self.kl_coef, "a float >= 0")
        # rl.importance_weights rescales whole-sequence weights within each prompt group; no other correction has
        # a sequence weight to normalise, so this would otherwise fail at the first RL step.
        _require(not self.self_normalize or self.correction == "seq_is", "algorithm.self_normalize",
                 self.self_normalize, f"false unless algorithm.correction='seq_is' (correction is {self.correction!r})")
        _require(not self.kl_in_reward or self.kl_coef > 0, "algorithm.kl_in_reward", self.kl_in_reward,
                 "false unless algorithm.kl_coef > 0 (there is no penalty to fold into the reward)")
        if self.kl_estimator == "auto":  # frozen: resolve in place, so the saved config names the estimator used
            object.__setattr__(self, "kl_estimator", "k1" if self.kl_in_reward else "k2")
        if self.kl_in_reward:
            _require(self.kl_estimator == "k1", "algorithm.kl_estimator", self.kl_estimator,
                     "'k1' or 'auto' with algorithm.kl_in_reward=true (in the reward only k1's score-function "
                     "gradient is that of KL(pi_theta || pi_ref))")
        elif self.kl_coef > 0:
            _require(self.kl_estimator != "k1", "algorithm.kl_estimator", self.kl_estimator,
                     "'k2' (reverse KL), 'k3' (forward KL) or 'auto' for a KL loss term: k1's expected gradient "
                     "in the loss is zero (or set algorithm.kl_in_reward=true)")


@dataclass(frozen=True)
class RewardConfig:
    timeout: float = 5.0
    """Per-comparison time bound for symbolic equivalence (worker process, hard kill past it)."""
    rel_tol: float = 1e-4
    """Relative tolerance when either side is a decimal (exact numbers must match exactly)."""
    format_weight: float = 0.0
    """Added to the 0/1 correctness reward when the completion has a well-formed \boxed{} answer."""
    last_number: bool = True
    """Fall back to the last number in the completion when it states no explicit final answer."""

    def __post_init__(self) -> None:
        _require(self.timeout > 0, "reward.timeout", self.timeout, "a float > 0 (seconds)")
        _require(self.rel_tol >= 0, "reward.rel_tol", self.rel_tol, "a float >= 0")
        _require(self.format_weight >= 0, "reward.format_weight", self.format_weight, "a float >= 0")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 30
    """RL steps (0: stop after the SFT warm-up)."""
    micro_batch_size: int = 32
    """Sequences per forward/backward on each rank; gradient accumulation follows from the rollout size."""
    bucket_by_length: bool = True
    """Exact: micro-batches take rows of similar length and each is trimmed to its own longest row, so training
    computes little padding. Rows move in whole prompt groups (when a micro-batch holds whole groups) under
    algorithm.self_normalize or a shared_prompt_forward other than "never", else singly."""
    shared_prompt_forward: Literal["auto", "always", "never"] = "auto"
    """Exact: score each prompt's samples in one packed sequence [prompt, c_1 .. c_G] with a block attention mask,
    so the prompt is encoded once: "always", "never", or "auto": in the micro-batches where that computes fewer
    FLOPs. Needs SDPA or eager attention (flash-attention-2 takes no custom mask; "auto" then never packs)."""
    lr: float = 2e-4
    """RL learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_warmup_steps: int = 0
    """RL steps over which the learning rate ramps linearly to `lr` (0: none)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables clipping)."""
    seed: int = 1234
    """Seeds the data order, skip plans, sampling noise, the synthetic problems and the embedded model's initial
    weights."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage used when no DeepSpeed JSON is given (`--deepspeed`)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Precision: "auto" is bf16 on CUDA when supported, fp32 on CPU."""
    sft_steps: int = 0
    """Supervised warm-up on worked solutions before RL (gives a from-scratch model non-zero reward)."""
    sft_lr: float = 3e-3
    """Learning rate at the warm-up's first step; it decays linearly to `lr` by its last."""
    sft_layer_drop: float = 0.0
    """LayerDrop in the warm-up: every other SFT step trains a random nested view with this fraction of the decoder
    layers skipped. Pretrained LLMs tolerate skipping middle layers; a model trained from scratch without this
    does not, and its nested behaviour model would sample almost nothing correct. 0 disables."""
    sft_layer_drop_from: int = 0
    """First warm-up step of LayerDrop: the steps before it train the full model only."""
    sft_question_loss: bool = False
    """The warm-up's loss covers the prompt's tokens as well as the worked solution's (language modelling on the
    question, for a model trained from scratch); off, the prompt is only context, as in RL."""
    save_every: int = 0
    """Checkpoint every this many steps of each phase (0: only at the end of each phase)."""
    keep_checkpoints: int = 3
    """Committed checkpoints kept in <output_dir>/checkpoints, newest by commit order (0: keep all). Older ones are
    removed only after a newer one is committed; the one `latest` names is never removed."""
    output_dir: str = "runs/tiny_arith"
    """The run directory: metrics.jsonl, TensorBoard events, checkpoints, the embedded base model. One job owns it
    at a time."""
    cpu_threads: int | None = None
    """Torch intra-op CPU threads per rank (null: torch's default), capped at cores / ranks on the machine so ranks
    sharing a CPU do not oversubscribe it."""

    def __post_init__(self) -> None:
        _require(self.micro_batch_size >= 1, "train.micro_batch_size", self.micro_batch_size, "an integer >= 1")
        _require(self.steps + self.sft_steps >= 1, "train.steps", self.steps,
                 f"an integer >= 1 (0 only with train.sft_steps >= 1: SFT only; sft_steps is {self.sft_steps})")
        for key in ("steps", "lr_warmup_steps", "sft_steps", "sft_layer_drop_from", "save_every", "keep_checkpoints"):
            _require(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "an integer >= 0")
        _require(0.0 <= self.sft_layer_drop < 1.0, "train.sft_layer_drop", self.sft_layer_drop,
                 "a float in [0, 1)")
        _require(self.sft_layer_drop == 0 or self.sft_steps == 0 or self.sft_layer_drop_from < self.sft_steps,
                 "train.sft_layer_drop_from", self.sft_layer_drop_from,
                 f"an integer < train.sft_steps={self.sft_steps} (LayerDrop would never run)")
        for key in ("lr", "sft_lr"):
            _require(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "a float > 0")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "a float >= 0 (0 disables clipping)")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a float >= 0")
        _require(self.cpu_threads is None or self.cpu_threads >= 1, "train.cpu_threads", self.cpu_threads,
                 "null or an integer >= 1")
        _require(0 <= self.seed <= MAX_SEED, "train.seed", self.seed, f"an integer in [0, {MAX_SEED}]")


@dataclass(frozen=True)
class LoggingConfig:
    log_every: int = 1
    """Log (and print) every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard events to <output_dir>/tensorboard."""
    progress_bar: bool = True
    """Show a progress bar per phase on rank 0."""
    eval_every: int = 0
    """Held-out greedy evaluation every N RL steps (0: only before and after RL)."""
    all_ranks: bool = False
    """Every rank also prints its step lines (prefixed "[rank R]"); files are written by rank 0 only."""

    def __post_init__(self) -> None:
        _require(self.log_every >= 1, "logging.log_every", self.log_every, "an integer >= 1")
        _require(self.eval_every >= 0, "logging.eval_every", self.eval_every, "an integer >= 0")


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out problems."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling the completions of each RL step."""
    skip: SkipConfig = field(default_factory=SkipConfig)
    """Which decoder layers the behaviour model skips."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The policy-gradient estimator."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The verifier."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, phases, checkpoints and the run directory."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """What each step writes and prints."""

    def __post_init__(self) -> None:
        # Checks that span sections; each would otherwise fail only at the first RL step.
        if self.algorithm.self_normalize:
            # Self-normalisation divides by each prompt group's weight sum, so every micro-batch must hold whole
            # groups (rl.importance_weights: rows % group_size == 0). A rank's micro-batch is
            # min(train.micro_batch_size, its sequences per step); the latter is a multiple of the group size.
            micro, group = self.train.micro_batch_size, self.rollout.group_size
            _require(micro % group == 0 or micro >= self.rollout.prompts_per_step * group, "train.micro_batch_size",
                     micro, f"a multiple of rollout.group_size={group} when algorithm.self_normalize=true (each "
                     "prompt group must sit in one micro-batch)")
        # Under top-p the behaviour samples from its renormalised nucleus while pi_prox is scored on the whole
        # vocabulary, so E_beta[pi_prox / beta] = pi_prox(nucleus) < 1: every correction, and the ratio statistics
        # the adaptive schedule reads, would lose that mass (exponentially in length for sequence ratios). Scoring
        # pi on the behaviour's nucleus would need the nucleus of every sampled position; until then, refuse.
        if self.rollout.top_p < 1.0:
            _require(self.algorithm.correction == "none", "rollout.top_p", self.rollout.top_p,
                     f"1.0 with algorithm.correction={self.algorithm.correction!r} (importance ratios against a "
                     "top-p behaviour are biased by the nucleus mass); use algorithm.correction=none or top_p=1")
            _require(self.skip.schedule != "adaptive", "rollout.top_p", self.rollout.top_p,
                     "1.0 with skip.schedule='adaptive' (its ratio statistics are biased by the nucleus mass)")
        # Speculative rollouts follow the full model: there is no behaviour mismatch for a correction to weight, nor
        # for the adaptive schedule to read (its ESS is 1 and its KL 0 at any skip ratio).
        if self.rollout.mode == "speculative":
            _require(self.algorithm.correction == "none", "algorithm.correction", self.algorithm.correction,
                     "'none' with rollout.mode='speculative' (its completions are the full model's samples: "
                     "on-policy)")
            _require(self.skip.schedule != "adaptive", "skip.schedule", self.skip.schedule,
                     "'fixed' or 'linear' with rollout.mode='speculative' (the adaptive schedule reads the "
                     "behaviour/target mismatch, which speculative sampling removes)")
            _require(self.rollout.gather == "once", "rollout.gather", self.rollout.gather,
                     "'once' with rollout.mode='speculative' (drafter and verifier decode on whole weights; streamed "
                     "decoding fetches them per module)")
        _require(not (self.train.shared_prompt_forward == "always"
                      and self.model.attn_implementation == "flash_attention_2"), "train.shared_prompt_forward",
                 self.train.shared_prompt_forward, "'auto' or 'never' with model.attn_implementation="
                 "'flash_attention_2' (flash-attention-2 takes no block attention mask)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- parsing

def _allowed(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_allowed(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; accept ints for floats. Raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 as a string; accept what float() reads
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # No setting means anything at inf or nan, and either would only show up as a NaN loss (or a crash)
            # once training is under way.
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}' has invalid value {value!r}: expected a finite float")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - every annotation above is handled
        raise AssertionError(f"unsupported annotation {tp} for {key}")
    raise ConfigError(f"config key '{key}' has invalid value {value!r}: expected {_allowed(tp)}")


# Keys renamed so that each word has one meaning ("warm-up" is the SFT phase): old name -> new name.
RENAMED_KEYS = {"train.warmup_steps": "train.lr_warmup_steps", "skip.warmup_steps": "skip.ramp_steps"}


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    for key in unknown:
        if f"{prefix}{key}" in RENAMED_KEYS:
            raise ConfigError(f"config key '{prefix}{key}' is now '{RENAMED_KEYS[prefix + key]}' (the old name "
                              "meant another 'warm-up' than the SFT phase)")
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}': allowed keys in "
                          f"'{prefix.rstrip('.') or '<root>'}' are {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, values[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", values[name], tp)
    return cls(**kwargs)


def _override_value(raw: str) -> Any:
    """YAML typing for a command-line value (8 -> int, 0.5 -> float, null -> None, [1, 2] -> list). No config key
    takes a mapping, so text YAML cannot parse or reads as one (a prompt template "Q: {question}") is a string."""
    if not raw.strip():
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) else value


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value (e.g. rollout.group_size=8)")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key '{dotted}' must be section.key, e.g. rollout.group_size")
    value = _override_value(raw)
    section = tree.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"config key '{parts[0]}' must be a mapping, got {section!r}")
    section[parts[1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML experiment config (None: all defaults) and apply dotted `section.key=value` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    for override in overrides:
        _apply_override(tree, override)
    return _build(ExperimentConfig, tree, "")


def config_from_dict(tree: dict[str, Any]) -> ExperimentConfig:
    """An ExperimentConfig from a nested dict (`ExperimentConfig.to_dict`'s form), validated like a YAML file; keys
    added since the dict was written take their defaults."""
    return _build(ExperimentConfig, tree, "")


# ----------------------------------------------------------------------------------------------- reference

def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), read from the source."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for item, following in zip(body, body[1:] + [None]):
        if (isinstance(item, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[item.target.id] = " ".join(following.value.value.split())
    return docs


def reference_entries() -> list[tuple[str, str, list[tuple[str, str, str, str]]]]:
    """(section, its docstring, [(dotted key, allowed values, default as YAML, docstring)]) for every section."""
    hints = typing.get_type_hints(ExperimentConfig)
    section_docs = field_docs(ExperimentConfig)
    entries = []
    for section in dataclasses.fields(ExperimentConfig):
        cls = hints[section.name]
        docs, types_ = field_docs(cls), typing.get_type_hints(cls)
        keys = [(f"{section.name}.{item.name}", _allowed(types_[item.name]),
                 yaml.safe_dump(item.default, default_flow_style=True).strip().removesuffix("...").strip(),
                 docs.get(item.name, "")) for item in dataclasses.fields(cls)]
        entries.append((section.name, section_docs[section.name], keys))
    return entries


def reference_markdown() -> str:
    """The configuration reference as Markdown (docs/configuration.md, `nested-reft config --markdown`)."""
    out = ["# Configuration reference", "",
           "Generated by `nested-reft config --markdown` from `nested_reft_ds/config.py` (a test checks it is current).",
           "Set a key in a YAML file (`section:` then `key: value`) or with `--set section.key=value`.", ""]
    cell = lambda text: text.replace("|", "\\|")
    for section, doc, keys in reference_entries():
        out += [f"## {section}", "", doc, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        out += [f"| `{key}` | {cell(allowed)} | `{cell(default)}` | {cell(text)} |" for key, allowed, default, text in keys]
        out.append("")
    return "\n".join(out)


def reference_text() -> str:
    """The configuration reference as plain text (`nested-reft config`)."""
    out = []
    for section, doc, keys in reference_entries():
        out.append(f"{section}: {doc}")
        for key, allowed, default, text in keys:
            out += [f"  {key} = {default}    ({allowed})", f"      {text}"]
        out.append("")
    return "\n".join(out)
