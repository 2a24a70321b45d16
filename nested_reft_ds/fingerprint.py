"""Fingerprints: what a saved state (a built base model, a checkpoint) must agree on with the current run.

A fingerprint is a flat JSON-able dict of dotted keys -> values. It is written next to what it describes
(`<dir>/nested_reft_fingerprint.json`) and compared before anything is loaded, so an incompatible resume or a
stale `<output_dir>/base_model` is refused with one line naming each differing key and both values instead of
failing deep inside DeepSpeed, or worse, silently training something else. Only keys present on both sides are
compared, so a fingerprint with fewer keys still checks what it has; a state without one is not checked at all
(`read_fingerprint` warns that the checks are off).

What a checkpoint pins (`run_fingerprint`), and why each is in:
- the model's architecture and tokenizer (`model_fingerprint`): the saved weights/optimizer state only fit that
  shape, and token ids only mean something under that vocabulary;
- `world_size`, only under ZeRO stage >= 1: optimizer (and, for stage 3, parameter) partitions are saved per
  rank and DeepSpeed cannot re-partition them for another world size. Stage 0 saves whole states. (The data
  order is not world-size dependent: each step's global batch is a function of (seed, step) only);
- `deepspeed.zero_optimization.stage`, `deepspeed.bf16.enabled`, `deepspeed.optimizer.type`: the layout and
  dtype of the saved optimizer state (stage 0 vs sharded files, fp32 master weights under bf16, Adam moments);
- `train.seed`: the per-step data order, skip plans, sampling noise and the synthetic problems all derive from it;
  a different seed makes the step counter point into another sequence of batches;
- `train.sft_steps`: a larger value after RL started would re-enter the warm-up in the middle of RL, and the
  warm-up's lr decays over it;
- the training problems (`data.*` keys that select them, `data.prompt_template`, and a hash of the resulting
  ordered list, which also catches an edited data file): the step counter indexes into that list;
- SFT checkpoints: `sft.sequences_per_step` (rollout.prompts_per_step x rollout.group_size, the warm-up's batch
  size), which decides where in the data the warm-up's step counter points;
- RL checkpoints: `rollout.prompts_per_step` (which problems step k draws) and `rollout.group_size` (the batch
  layout of a step), `skip.schedule` and `skip.strategy` (whose state, the adaptive controller / the learned
  layer costs, is in the checkpoint and is silently dropped or left unset when they change).
  An SFT checkpoint does not pin these: no RL state exists yet, so RL may start from it with another layout.
Safe to change on resume (deliberately not in): train.steps, lr, sft_lr, lr_warmup_steps, weight_decay, grad_clip,
micro_batch_size (gradient accumulation follows; losses are normalised by global counts), save_every,
keep_checkpoints, output_dir, cpu_threads, sft_layer_drop, sft_layer_drop_from, sft_question_loss, every logging.*
key, evaluation
(data.eval_problems for the synthetic source), rollout sampling knobs (max_new_tokens, temperature, top_p, gather),
skip ratios and protected layers, algorithm.* (kl_coef is checked where the reference is restored), reward.*.

The embedded base model (`base_model_fingerprint`) pins the `model.*` settings it was built from and
`train.seed` (its initial weights).

Pure: no deepspeed, no torch.distributed, no transformers import.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .config import ConfigError, ExperimentConfig, ModelConfig

log = logging.getLogger(__name__)

FILENAME = "nested_reft_fingerprint.json"
RESUME_HINT = "start afresh with --resume none or another train.output_dir"

# Architecture fields of a Hugging Face config that decide the shape of the weights.
MODEL_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
# ModelConfig fields the embedded model is built from (path and attn_implementation do not change the weights).
EMBEDDED_FIELDS = ("arch", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
# The same, as a Hugging Face config.json names them (for a base model directory without a recorded fingerprint).
_EMBEDDED_FROM_HF = {"model_type": "arch", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
                     "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
                     "intermediate_size": "intermediate_size"}
# Data keys that select the training problems (and their SFT targets) for every source.
DATA_FIELDS = ("source", "path", "split", "question_field", "answer_field", "answer_format", "num_problems",
               "min_operand", "max_operand", "min_steps", "max_steps", "step_continue_probability",
               "solution_error_rate", "step_labels", "restate_steps",
               "prompt_template")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def model_fingerprint(model_config: Any, tokenizer: Any = None) -> dict[str, Any]:
    """Architecture of a HF model config (a `PretrainedConfig` or its dict) and, given one, the tokenizer's
    vocabulary (size, a stable hash of token -> id, eos/pad ids)."""
    fields = model_config if isinstance(model_config, dict) else model_config.to_dict()
    out = {f"model.{key}": fields[key] for key in MODEL_FIELDS if fields.get(key) is not None}
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        out.update({"tokenizer.vocab_size": len(vocab), "tokenizer.vocab_sha256": _sha(sorted(vocab.items())),
                    "tokenizer.eos_token_id": tokenizer.eos_token_id, "tokenizer.pad_token_id": tokenizer.pad_token_id})
    return out


def problems_digest(problems: list) -> str:
    """'<n> problems, sha256 <hash>' of an ordered problem list (question, answer, solution of each)."""
    rows = [[p.question, p.answer, p.solution] for p in problems]
    return f"{len(rows)} problems, sha256 {_sha(rows)}"


def run_fingerprint(cfg: ExperimentConfig, model_fp: dict[str, Any], world_size: int, *,
                    ds_config: dict[str, Any] | None = None, problems: list | None = None,
                    phase: str | None = None) -> dict[str, Any]:
    """What a checkpoint of this run pins (see the module docstring for why each key is in).

    `ds_config`: the filled DeepSpeed config (its stage/bf16/optimizer are what the engine really uses; without it
    train.zero_stage/precision stand in). `problems`: the training problems, hashed. `phase`: "sft" or "rl" for a
    checkpoint written in that phase (only that phase's keys); None for the current run (every key)."""
    assert phase in (None, "sft", "rl"), phase
    if ds_config is not None:
        stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        engine_keys = {"deepspeed.zero_optimization.stage": stage,
                       "deepspeed.bf16.enabled": bool(ds_config.get("bf16", {}).get("enabled", False)),
                       "deepspeed.optimizer.type": str(ds_config.get("optimizer", {}).get("type", "")).lower()}
    else:
        stage = cfg.train.zero_stage
        engine_keys = {"train.zero_stage": stage, "train.precision": cfg.train.precision}
    out = dict(model_fp)
    if stage >= 1:
        out["world_size"] = world_size
    out.update(engine_keys)
    out.update({"train.seed": cfg.train.seed, "train.sft_steps": cfg.train.sft_steps})
    data_fields = DATA_FIELDS if cfg.data.source == "synthetic" else DATA_FIELDS + ("eval_problems",)
    out.update({f"data.{key}": getattr(cfg.data, key) for key in data_fields})
    if problems is not None:
        out["data.train_problems"] = problems_digest(problems)
    if phase in (None, "sft"):
        out["sft.sequences_per_step"] = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if phase in (None, "rl"):
        out.update({"rollout.prompts_per_step": cfg.rollout.prompts_per_step,
                    "rollout.group_size": cfg.rollout.group_size,
                    "skip.schedule": cfg.skip.schedule, "skip.strategy": cfg.skip.strategy})
    return out


def base_model_fingerprint(model_cfg: ModelConfig, seed: int) -> dict[str, Any]:
    """What the embedded base model is built from: its `model.*` settings and the seed of its initial weights."""
    return {**{f"model.{key}": getattr(model_cfg, key) for key in EMBEDDED_FIELDS}, "train.seed": seed}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for each key both hold with different values, in the saved order."""
    return [(key, saved[key], current[key]) for key in saved if key in current and saved[key] != current[key]]


def check_compatible(saved: dict[str, Any] | None, current: dict[str, Any], what: str, *,
                     hint: str = RESUME_HINT) -> None:
    """Raise ConfigError with one line, "<what>: k was a, now b; ... (<hint>)", if `saved` and `current` differ in
    a key they both hold. `saved` None (no fingerprint recorded) passes."""
    diffs = differences(saved or {}, current)
    if diffs:
        listed = "; ".join(f"{key} was {old!r}, now {new!r}" for key, old, new in diffs)
        raise ConfigError(f"{what}: {listed} ({hint})")


def write_fingerprint(directory: str | Path, fingerprint: dict[str, Any]) -> Path:
    """Write `<directory>/nested_reft_fingerprint.json` atomically (temp file, fsync, os.replace)."""
    path = Path(directory) / FILENAME
    temp = path.with_name(f".{FILENAME}.{os.getpid()}.tmp")
    with open(temp, "w") as handle:
        json.dump(fingerprint, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    return path


def read_fingerprint(directory: str | Path) -> dict[str, Any] | None:
    """The fingerprint recorded in `directory`, or None when there is none; then a warning (rank 0 only) says that
    nothing checks the state in `directory` against this run."""
    path = Path(directory) / FILENAME
    if path.is_file():
        return json.loads(path.read_text())
    if Path(directory).is_dir() and os.environ.get("RANK", "0") == "0":
        log.warning("%s holds no %s: the checks that it matches this run (model, tokenizer, seed, data, world size) "
                    "are off", directory, FILENAME)
    return None


def check_base_model(path: str | Path, model_cfg: ModelConfig, seed: int) -> None:
    """Refuse a built embedded base model that the current `model.*` settings (or seed) would not build.

    Reads its recorded fingerprint; a base model directory without one is checked by its config.json
    (architecture only: its seed is unknown)."""
    path = Path(path)
    saved = read_fingerprint(path)
    if saved is None and (path / "config.json").is_file():
        hf = json.loads((path / "config.json").read_text())
        saved = {f"model.{ours}": hf[theirs] for theirs, ours in _EMBEDDED_FROM_HF.items() if theirs in hf}
    check_compatible(saved, base_model_fingerprint(model_cfg, seed),
                     f"{str(path)!r} was built from other settings",
                     hint=f"delete {str(path)!r} or choose another train.output_dir")
