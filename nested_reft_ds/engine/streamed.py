"""Streamed rollout under ZeRO-3: decoding with the module hooks on, for targets too large to gather at once.

Each decode step fetches the kept layers one by one (with prefetch) and releases them after use, as a ZeRO-3
forward does. Two things keep it from disturbing training or touching skipped layers:

- A separate parameter coordinator serves the rollout. The hooks look the coordinator up on every call
  (`get_param_coordinator()`), so swapping it in for the duration leaves the training coordinator's recorded
  fwd+bwd trace, step counter and its `lru_cache` of release decisions exactly as they were; and the decode
  coordinator's own trace holds only the modules the nested view calls, so its prefetcher can never fetch a
  skipped layer (skipped layers are not called, so their hooks never fire either).
- The forward runs collectives, so every rank must run the same number of forwards: the yielded model is
  marked (`rollout.mark_lockstep`) with `lockstep_done`, which `generate` then always uses (ranks that have
  finished keep stepping on padding until all are done).
"""
from __future__ import annotations

import functools
import types
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..rollout import lockstep_rule, mark_lockstep
from .distributed import device
from .hooks import engine_root_hook_handles, hooks_suspended, zero3_coordinator
from .internals import (PINNED_SUBMODULE, PartitionedParameterCoordinator, ZeroParamStatus, active_submodules,
                        clean_inflight, coordinator_like, forward_module_stack, param_status, release_params,
                        set_param_coordinator, set_params_to_release, uncached_params_to_release)


def lockstep_done(local_done: bool) -> bool:
    """True once every rank is done. Collective (one all-reduce MIN): every rank must call it once per step."""
    flag = torch.tensor([int(local_done)], dtype=torch.int32, device=device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def lockstep_for(model: nn.Module):
    """The lockstep rule of a model yielded by `skip_aware_gather`: `lockstep_done` while it decodes with
    collectives (streamed mode), else None (ranks decode independently: gather-once, ZeRO stage 0-2).
    `rollout.generate` applies it by itself; this tells a caller which case it is in."""
    return lockstep_rule(model)


def decode_coordinator(training: PartitionedParameterCoordinator) -> PartitionedParameterCoordinator:
    """A fresh coordinator with the training one's settings, sharing its in-flight registry and stream."""
    decode = coordinator_like(training)
    # The class-wide cache is keyed by (coordinator, module, step): it would keep every per-rollout coordinator
    # (and its trace) alive for the whole run. A per-instance cache is freed with the coordinator.
    set_params_to_release(decode, functools.lru_cache(maxsize=None)(types.MethodType(uncached_params_to_release(),
                                                                                     decode)))
    return decode


@contextmanager
def streamed_decoding(engine) -> Iterator[nn.Module]:
    """Decode `engine.module` (ZeRO-3) with its hooks on, through a rollout-only parameter coordinator.

    Collective: every rank must enter it, and inside run the same number of forwards (`generate` does so by
    itself: the yielded model is marked with `lockstep_done`; other forwards are the caller's to balance). Parameters resident at entry stay resident; on exit, even on an exception,
    every parameter is back in its entry state and the training coordinator is restored untouched. An
    exception raised on only some ranks mid-forward leaves the others waiting in a collective (the process-group
    timeout ends the job).
    """
    model = engine.module
    offload = zero3_coordinator(engine)
    training = offload.get_param_coordinator()
    params = list(model.parameters())
    entry_status = [param_status(p) for p in params]
    entry_active = [set(active_submodules(p)) for p in params]
    stack_depth = len(forward_module_stack())
    decode = decode_coordinator(training)
    try:
        # Parameters resident now (persistent ones, any the training trace keeps) stay resident: a coordinator
        # still recording its trace releases everything after use, persistent parameters included.
        for param, status in zip(params, entry_status):
            if status == ZeroParamStatus.AVAILABLE:
                active_submodules(param).add(PINNED_SUBMODULE)
        set_param_coordinator(offload, decode)
        mark_lockstep(model, lockstep_done)
        with hooks_suspended(engine_root_hook_handles(engine)):
            yield model
    finally:
        mark_lockstep(model, None)
        set_param_coordinator(offload, training)
        clean_inflight(decode)
        # An exception inside a forward skips post-forward hooks: undo their bookkeeping and release.
        del forward_module_stack()[stack_depth:]
        for param, active in zip(params, entry_active):
            active_submodules(param).clear()
            active_submodules(param).update(active)
        leftovers = [p for p, status in zip(params, entry_status)
                     if status == ZeroParamStatus.NOT_AVAILABLE and param_status(p) == ZeroParamStatus.AVAILABLE]
        if leftovers:
            release_params(leftovers)
