"""DeepSpeed JSON: load a user's config, fill its "auto" values from the experiment config, check batch math.

Rollout size and train micro-batch are independent knobs; gradient accumulation follows from them:
  sequences per rank per step = prompts_per_step / world_size * group_size = micro_batch * grad_accum
  train_batch_size            = micro_batch * grad_accum * world_size       (one optimizer step per rollout)
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ExperimentConfig


def batch_layout(cfg: ExperimentConfig, world_size: int) -> tuple[int, int, int]:
    """(micro_batch, grad_accum, train_batch) per DeepSpeed's definitions, or a ConfigError naming the knob."""
    prompts, group = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    if prompts % world_size:
        raise ConfigError(f"config key 'rollout.prompts_per_step' has invalid value {prompts}: expected a "
                          f"multiple of the data-parallel world size {world_size}")
    local_sequences = prompts // world_size * group
    micro = min(cfg.train.micro_batch_size, local_sequences)
    if local_sequences % micro:
        raise ConfigError(f"config key 'train.micro_batch_size' has invalid value {micro}: expected a divisor of "
                          f"the {local_sequences} sequences each rank trains on per step "
                          f"(rollout.prompts_per_step / world_size * rollout.group_size)")
    return micro, local_sequences // micro, local_sequences * world_size


def use_bf16(cfg: ExperimentConfig) -> bool:
    if cfg.train.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cfg.train.precision == "bf16"


def load_ds_config(path: str | Path | None, cfg: ExperimentConfig) -> dict[str, Any]:
    """The user's DeepSpeed JSON, or the built-in one (ZeRO stage `train.zero_stage`, everything "auto").

    The built-in optimizer is torch's AdamW on every device: no CUDA op to JIT-build (DeepSpeed's FusedAdam
    compiles one with nvcc at first use unless its ops were prebuilt), and one optimizer on CPU and GPU hosts, so a
    warm-up made on a GPU resumes on a CPU with the same update rule and state layout."""
    if path is None:
        return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                "zero_optimization": {"stage": cfg.train.zero_stage, "stage3_param_persistence_threshold": "auto"},
                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
                "bf16": {"enabled": "auto"}}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {err}") from None


def _fill(section: dict[str, Any], key: str, value: Any) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value


def fill_ds_config(ds_config: dict[str, Any], cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """A copy of `ds_config` with every "auto" replaced from `cfg`; explicit values are checked, not changed."""
    out = copy.deepcopy(ds_config)
    if "hybrid_engine" in out and out["hybrid_engine"].get("enabled", False):
        raise ConfigError("ds_config 'hybrid_engine' is not used by nested_reft_ds: generation runs in our own "
                          "gather-once mode (rollout.gather=once|streamed|auto), which supports every "
                          "architecture and never gathers skipped layers; remove the 'hybrid_engine' block")
    out.pop("hybrid_engine", None)
    micro, accum, train_batch = batch_layout(cfg, world_size)
    _fill(out, "train_micro_batch_size_per_gpu", micro)
    _fill(out, "gradient_accumulation_steps", accum)
    _fill(out, "train_batch_size", out["train_micro_batch_size_per_gpu"] * out["gradient_accumulation_steps"]
          * world_size)
    _fill(out, "gradient_clipping", cfg.train.grad_clip)
    explicit = (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"])
    if explicit != (micro, accum, train_batch):
        raise ConfigError(
            "DeepSpeed batch sizes disagree with the experiment config: ds_config has train_micro_batch_size_per_gpu="
            f"{explicit[0]} x gradient_accumulation_steps={explicit[1]} x world_size={world_size} "
            f"(train_batch_size={explicit[2]}), but rollout.prompts_per_step x rollout.group_size = {train_batch} "
            f"sequences per step need micro={micro} x accum={accum} x world_size={world_size}; set them to \"auto\"")
    optimizer = out.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", cfg.train.lr)
    _fill(params, "weight_decay", cfg.train.weight_decay)
    if not torch.cuda.is_available() and optimizer.get("type", "").lower() in ("adam", "adamw"):
        offload = out.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if offload == "none":
            params.setdefault("torch_adam", True)  # FusedAdam needs CUDA; DeepSpeedCPUAdam serves offload
    bf16 = out.setdefault("bf16", {})
    _fill(bf16, "enabled", use_bf16(cfg))
    if "fp16" in out:
        _fill(out["fp16"], "enabled", False)
    zero = out.setdefault("zero_optimization", {"stage": 0})
    if zero.get("stage") == 3:
        # Small parameters (norms, biases) stay gathered: fewer tiny all-gathers per forward.
        _fill(zero, "stage3_param_persistence_threshold", 10_000)
        _fill(zero, "stage3_prefetch_bucket_size", 5e7)
        _fill(zero, "reduce_bucket_size", 5e7)
        _fill(zero, "stage3_gather_16bit_weights_on_model_save", False)
    else:
        zero.pop("stage3_param_persistence_threshold", None)
    out.setdefault("steps_per_print", 10 ** 9)  # we log ourselves
    out.setdefault("wall_clock_breakdown", False)
    leftover = [key for key, value in _walk(out) if value == "auto"]
    if leftover:
        raise ConfigError(f"ds_config key '{leftover[0]}' is \"auto\" but nested_reft_ds does not know how to fill "
                          "it; give an explicit value")
    return out


def _walk(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def inference_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """A (filled) training DeepSpeed config made inference-only: no optimizer or scheduler (so nothing allocates
    gradients or optimizer state), the same ZeRO-3 partitioning and parameter offload. Idempotent."""
    out = copy.deepcopy(ds_config)
    out.pop("optimizer", None)
    out.pop("scheduler", None)
    out.get("zero_optimization", {}).pop("offload_optimizer", None)
    return out
