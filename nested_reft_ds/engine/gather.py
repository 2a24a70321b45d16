"""Rollout under ZeRO-3: make the nested behaviour model decodable, decode, hand everything back as it was.

Modes (`rollout.gather`):
- "once" (default): one coalesced all-gather of the kept decoder layers plus everything outside the decoder
  stack (embeddings, final norm, LM head) that is partitioned; skipped layers' parameters are never moved.
  ZeRO-3's module hooks and the engine's root forward hooks are taken off for the duration, so decoding runs
  no collective at all (each rank decodes its own prompts to its own EOS: unequal lengths cannot deadlock)
  and nothing is released and re-fetched per token. On exit, even on an exception, exactly the gathered
  parameters are re-partitioned and the same hook objects go back in place (`hooks.hooks_suspended`): ZeRO-3's
  recorded trace stays valid, so the next training step fetches exactly what it would have without the rollout.
- "streamed": for targets whose kept layers do not fit on the device; hooks stay on, layers are fetched per
  decode step and skipped layers never (see `streamed.py`); ranks decode in lockstep (`lockstep_for`).
- "auto": "once" if the bytes to gather fit in `memory_fraction` (`rollout.gather_memory_fraction`) of the
  smallest free device memory over ranks, else "streamed"; the choice is logged.
With ZeRO stage 0-2 parameters are already local and every mode only checks the plan.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import psutil
import torch
import torch.distributed as dist
from torch import nn

from ..nested import SkipPlan, decoder_layers
from .distributed import check_same_plan, device
from .hooks import engine_root_hook_handles, hooks_suspended, zero3_coordinator, zero3_hook_handles
from .internals import (ZeroParamStatus, clean_inflight, full_numel, gather_params, inflight_registry, param_status,
                        partition_of, release_params)
from .streamed import lockstep_done, lockstep_for, streamed_decoding

__all__ = ["AUTO_MEMORY_FRACTION", "MODES", "choose_gather_mode", "free_device_memory", "gather_bytes",
           "kept_parameters", "lockstep_done", "lockstep_for", "skip_aware_gather", "zero3_coordinator"]

log = logging.getLogger(__name__)

MODES = ("once", "streamed", "auto")
# Gather-once holds the gathered kept layers for the whole rollout next to the KV cache and activations.
AUTO_MEMORY_FRACTION = 0.5


def kept_parameters(model: nn.Module, plan: SkipPlan) -> list[nn.Parameter]:
    """Every parameter the nested model touches: all but those of skipped decoder layers."""
    parent, attr = decoder_layers(model)
    layers = getattr(parent, attr)
    skipped = {id(p) for i in plan.skipped for p in layers[i].parameters()}
    return [p for p in model.parameters() if id(p) not in skipped]


def gather_bytes(params: list[nn.Parameter]) -> int:
    """Bytes an all-gather of `params` materialises: the full size of each one that is still partitioned."""
    return sum(full_numel(p) * partition_of(p).element_size() for p in params
               if param_status(p) == ZeroParamStatus.NOT_AVAILABLE)


def free_device_memory(dev: torch.device) -> int:
    """Bytes this process could still allocate on `dev`: free CUDA memory plus what PyTorch's allocator holds
    unused, or the host's available memory on CPU."""
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return psutil.virtual_memory().available


def choose_gather_mode(needed_bytes: int, free_bytes: int, fraction: float = AUTO_MEMORY_FRACTION) -> str:
    """'once' if gathering `needed_bytes` takes at most `fraction` of `free_bytes`, else 'streamed'. Pure."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if needed_bytes < 0 or free_bytes < 0:
        raise ValueError(f"byte counts must be >= 0, got needed_bytes={needed_bytes}, free_bytes={free_bytes}")
    return "once" if needed_bytes <= fraction * free_bytes else "streamed"


def _auto_mode(model: nn.Module, plan: SkipPlan, fraction: float) -> str:
    """Collective (one all-reduce MIN): every rank must pick the same mode, or one rank decodes with
    collectives while another does not and they deadlock; so the decision uses the smallest free memory."""
    needed = gather_bytes(kept_parameters(model, plan))
    free = torch.tensor([free_device_memory(device())], dtype=torch.int64, device=device())
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    mode = choose_gather_mode(needed, int(free.item()), fraction)
    log.info("rollout.gather=auto -> %s: %.1f MiB to gather for %d kept layers, min free memory over ranks "
             "%.1f MiB (threshold %.0f%%)", mode, needed / 2**20, len(plan.kept), free.item() / 2**20,
             100 * fraction)
    return mode


@contextmanager
def _gathered_once(engine, plan: SkipPlan) -> Iterator[nn.Module]:
    model = engine.module
    if len(inflight_registry(model)):
        # Prefetches still in flight: settle them now, as the next forward's reset_step would.
        clean_inflight(zero3_coordinator(engine).get_param_coordinator())
    # Only what is partitioned now is gathered and later released: persistent parameters (and any the
    # trace keeps resident) stay in the state the next training step expects.
    to_gather = [p for p in kept_parameters(model, plan) if param_status(p) == ZeroParamStatus.NOT_AVAILABLE]
    with hooks_suspended(zero3_hook_handles(engine) + engine_root_hook_handles(engine)):
        if to_gather:
            gather_params(to_gather)
        try:
            yield model
        finally:
            if to_gather:
                release_params(to_gather)


@contextmanager
def skip_aware_gather(engine, plan: SkipPlan, mode: str = "once",
                      memory_fraction: float = AUTO_MEMORY_FRACTION) -> Iterator[nn.Module]:
    """Context in which `engine.module` decodes through `nested_view(model, plan)` without fetching skipped layers.

    Collective: every rank must enter it with the same mode and the same plan (checked: a plan mismatch raises
    on every rank; "auto" decides on all-reduced numbers, so all ranks pick alike). Streamed decoding runs
    collectives and must stay in lockstep: the yielded model then carries its lockstep rule, which
    `rollout.generate` applies by itself (`lockstep_for` tells which case applies). Any other forward inside
    the block (e.g. scoring) must be run the same number of times on every rank in streamed mode.
    """
    if mode not in MODES:
        raise ValueError(f"rollout.gather must be one of {MODES}, got {mode!r}")
    check_same_plan(plan)
    if engine.zero_optimization_stage() != 3:
        yield engine.module
        return
    if mode == "auto":
        mode = _auto_mode(engine.module, plan, memory_fraction)
    with (_gathered_once(engine, plan) if mode == "once" else streamed_decoding(engine)) as model:
        yield model
