"""Rollout under ZeRO-3: make the nested behaviour model's parameters local, decode, hand them back.

Gather-once (`mode="once"`): one coalesced all-gather of the kept decoder layers plus everything outside the
decoder stack (embeddings, final norm, LM head); skipped layers' parameters stay partitioned and are never
moved. DeepSpeed's ZeRO-3 module hooks are taken off for the duration, so decoding runs no collective at all
(each rank decodes its own prompts to its own EOS: unequal lengths cannot deadlock) and nothing is released
and re-fetched per token. On exit, even on an exception, the parameters are re-partitioned and the hooks put
back; re-registering invalidates ZeRO-3's prefetch trace, so the next forward records a fresh one.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import deepspeed
from torch import nn

from ..nested import SkipPlan, decoder_layers
from .distributed import check_same_plan


def zero3_coordinator(engine):
    """The object that owns the ZeRO-3 module hooks: the optimizer's parameter offload for a training engine,
    the optimizer itself for an inference-only ZeRO-3 engine."""
    optimizer = engine.optimizer
    return getattr(optimizer, "parameter_offload", None) or optimizer


def kept_parameters(model: nn.Module, plan: SkipPlan) -> list[nn.Parameter]:
    """Every parameter the nested model touches: all but those of skipped decoder layers."""
    parent, attr = decoder_layers(model)
    layers = getattr(parent, attr)
    skipped = {id(p) for i in plan.skipped for p in layers[i].parameters()}
    return [p for p in model.parameters() if id(p) not in skipped]


@contextmanager
def skip_aware_gather(engine, plan: SkipPlan, mode: str = "once") -> Iterator[nn.Module]:
    """Context in which `engine.module` can decode through `nested_view(model, plan)` with no communication.

    Collective: every rank must enter it with the same plan (checked; a mismatch raises on every rank).
    With ZeRO stage 0-2 parameters are already local and this only checks the plan.
    """
    if mode != "once":
        raise NotImplementedError(f"rollout.gather={mode!r} is not implemented yet; use 'once'")
    check_same_plan(plan)
    model = engine.module
    if engine.zero_optimization_stage() != 3:
        yield model
        return
    coordinator = zero3_coordinator(engine)
    coordinator._remove_module_hooks()
    try:
        # modifier_rank=None: read-only gather, re-partitioned on exit without a broadcast.
        with deepspeed.zero.GatheredParameters(kept_parameters(model, plan), modifier_rank=None):
            yield model
    finally:
        # _remove_module_hooks leaves the handle lists filled; empty them so they hold only live handles.
        coordinator.forward_hooks.clear()
        coordinator.backward_hooks.clear()
        coordinator.setup_zero_stage3_hooks()
