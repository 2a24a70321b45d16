"""Building the DeepSpeed engine around a HF causal LM."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import deepspeed
import torch

from transformers import AutoConfig, GenerationConfig

from ..config import ConfigError
from ..model import check_model_dir, load_tokenizer, load_model_and_tokenizer, select_attn_implementation
from .distributed import device
from .ds_config import inference_ds_config
from .internals import (build_from_config, causal_lm_class, init_buffers, no_init_weights, partition_of,
                        zero3_gradient_partitions)

log = logging.getLogger(__name__)

def _checkpoint_tensors(path: Path):
    """name -> lazy tensor loader over a HF safetensors checkpoint (single file or sharded with an index)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    if not all((path / name).is_file() for name in files):
        raise ConfigError(f"{str(path)!r} has no safetensors weights; ZeRO-3 loading reads *.safetensors")
    handles = [safe_open(str(path / name), framework="pt") for name in files]
    return {key: (handle, key) for handle in handles for key in handle.keys()}


def load_model_for_engine(path: str | Path, ds_config: dict[str, Any], attn_implementation: str):
    """Load model + tokenizer; under ZeRO-3 no rank ever materialises the full model.

    ZeRO-3: the model is constructed inside `deepspeed.zero.Init` (each parameter partitioned as it is
    created), then filled module by module: gather that module's parameters, rank 0 copies them from the
    safetensors files, re-partition. Peak memory is one module, not the model. (transformers' own ZeRO-3
    path needs accelerate, which the deepspeed launcher path avoids.)
    """
    path = check_model_dir(path)
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled", False) else torch.float32
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return load_model_and_tokenizer(path, attn_implementation, dtype=dtype)
    model_config = AutoConfig.from_pretrained(path)
    # Resolve (import) the model class first: zero.Init patches torch.Tensor.__new__, which breaks
    # transformers' lazy module imports if they happen inside it.
    model_class = causal_lm_class(model_config)
    # Random init is skipped: every weight is overwritten below (and init indexes into empty partitions).
    # No explicit dtype: DeepSpeed 0.19.8 turns dtype=float32 into bf16 on its CPU accelerator; without one the
    # parameter dtype follows the config's bf16/fp16 flags.
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_from_config(model_class, model_config, dtype=dtype,
                                  attn_implementation=select_attn_implementation(attn_implementation))
        model.tie_weights()  # a tied LM head must share the embedding's (partitioned) parameter
    tensors = _checkpoint_tensors(path)
    rank0 = torch.distributed.get_rank() == 0
    missing = []
    for module_name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            for name, param in params.items():
                key = f"{module_name}.{name}" if module_name else name
                if key not in tensors:
                    missing.append(key)
                elif rank0:
                    handle, tensor_key = tensors[key]
                    param.data.copy_(handle.get_tensor(tensor_key).to(param.dtype))
    # transformers 5 computes derived buffers (rotary inv_freq) in _init_weights, which no_init_weights
    # skipped; buffer-only modules hold no partitioned parameters, so initialising them here is safe.
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is None and next(module.buffers(recurse=False), None) is not None:
            init_buffers(model, module)
    if (path / "generation_config.json").is_file():  # from_pretrained reads it; building from the config does not
        model.generation_config = GenerationConfig.from_pretrained(path)
    tied = {"lm_head.weight"} if model_config.tie_word_embeddings else set()
    if set(missing) - tied:
        raise ConfigError(f"checkpoint {str(path)!r} lacks weights for {sorted(set(missing) - tied)[:5]}")
    log.info("loaded %s partitioned with ZeRO-3 (dtype %s)", path, dtype)
    return model, load_tokenizer(path)


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any]):
    """deepspeed.initialize with our filled config; only trainable parameters go to the optimizer."""
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    log.info("DeepSpeed engine: ZeRO stage %d, micro batch %d, grad accum %d, world %d, bf16 %s",
             engine.zero_optimization_stage(), engine.train_micro_batch_size_per_gpu(),
             engine.gradient_accumulation_steps(), engine.world_size, engine.bfloat16_enabled())
    return engine


def build_inference_engine(model: torch.nn.Module, ds_config: dict[str, Any]):
    """An inference-only DeepSpeed engine (no optimizer, nothing requires grad) around `model`, in eval mode:
    under ZeRO-3 its parameters stay partitioned and are fetched per forward (or by `skip_aware_gather`)."""
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=inference_ds_config(ds_config))
    engine.eval()
    return engine


def set_learning_rate(engine, lr: float) -> None:
    """Our schedule is a pure function of the step (so resume needs no scheduler state): set it directly."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(engine) -> float | None:
    """`engine.step()`; at the gradient-accumulation boundary, returns the global gradient norm before clipping.

    A parameter the step did not use (a layer LayerDrop skipped) has gradient zero and takes its optimizer step
    like every other: Adam's moments decay and move it, weight decay applies. ZeRO 1-3 keep gradients in flat
    buffers where an unused parameter's slice is zero, and DeepSpeed's ZeRO-0 all-reduce zero-fills missing
    gradients on more than one rank; only one ZeRO-0 process would leave them None, which torch's optimizers skip.
    Zero-filling them here gives every stage and world size the same update (one recipe, one model). ZeRO-3
    overwrites a parameter's gradient partition only when the parameter got a gradient in the window, so an unused
    one would re-apply its previous step's gradient: the partitions are cleared after each optimizer step.

    DeepSpeed keeps that norm (`get_global_grad_norm`) under ZeRO and mixed precision; with whole fp32 parameters
    (ZeRO-0) it clips without keeping it, so it is computed here from the gradients, which DeepSpeed's boundary
    backward has already averaged over the data-parallel ranks. Collective like `engine.step()`: every rank calls it.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    whole_fp32 = engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())
    norm = None
    if boundary and engine.zero_optimization_stage() == 0:
        for param in engine.module.parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
    if boundary and whole_fp32:
        norm = torch.nn.utils.get_total_norm([p.grad.detach().float() for p in engine.module.parameters()
                                              if p.grad is not None])
    engine.step()
    if not boundary:
        return None
    if engine.zero_optimization_stage() == 3:
        partitions = zero3_gradient_partitions(engine)
        if partitions is not None:
            partitions.zero_()
    if norm is None:
        norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def parameters_finite(engine) -> bool:
    """Whether every parameter of `engine`'s model is finite on every rank (under ZeRO-3 each rank checks its own
    partitions). Collective: one all-reduce."""
    zero3 = engine.zero_optimization_stage() == 3
    local = all(bool(torch.isfinite(partition_of(p) if zero3 else p.detach()).all())
                for p in engine.module.parameters())
    flag = torch.tensor([0.0 if local else 1.0], device=device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag)
    return flag.item() == 0


def last_grad_norm(engine) -> float | None:
    """The global gradient norm of the last optimizer step where DeepSpeed keeps it (ZeRO 1-3, bf16); None else."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def loss_scale_for_engine(engine) -> float:
    """Factor that undoes DeepSpeed's averaging, so a loss normalised by global counts gets the exact gradient.

    DeepSpeed divides each micro-batch loss by the gradient-accumulation steps and averages gradients over the
    data-parallel ranks; our losses are already each micro-batch's share of the global objective.
    """
    return float(engine.gradient_accumulation_steps() * engine.world_size)
