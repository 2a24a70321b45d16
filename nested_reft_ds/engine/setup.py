"""Building the DeepSpeed engine around a HF causal LM."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import deepspeed
import torch

from ..model import load_model_and_tokenizer

log = logging.getLogger(__name__)

# transformers partitions weights at load time (zero.Init) while an HfDeepSpeedConfig with ZeRO-3 is alive;
# it is kept for the life of the process, as transformers requires.
_live_hf_ds_config = None


def load_model_for_engine(path: str | Path, ds_config: dict[str, Any], attn_implementation: str):
    """Load model + tokenizer so that under ZeRO-3 no rank ever materialises the full model."""
    global _live_hf_ds_config
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig
        _live_hf_ds_config = HfDeepSpeedConfig(ds_config)
    return load_model_and_tokenizer(path, attn_implementation, dtype=torch.bfloat16 if bf16 else torch.float32)


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any]):
    """deepspeed.initialize with our filled config; only trainable parameters go to the optimizer."""
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    log.info("DeepSpeed engine: ZeRO stage %d, micro batch %d, grad accum %d, world %d, bf16 %s",
             engine.zero_optimization_stage(), engine.train_micro_batch_size_per_gpu(),
             engine.gradient_accumulation_steps(), engine.world_size, engine.bfloat16_enabled())
    return engine


def set_learning_rate(engine, lr: float) -> None:
    """Our schedule is a pure function of the step (so resume needs no scheduler state): set it directly."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def loss_scale_for_engine(engine) -> float:
    """Factor that undoes DeepSpeed's averaging, so a loss normalised by global counts gets the exact gradient.

    DeepSpeed divides each micro-batch loss by the gradient-accumulation steps and averages gradients over the
    data-parallel ranks; our losses are already each micro-batch's share of the global objective.
    """
    return float(engine.gradient_accumulation_steps() * engine.world_size)
