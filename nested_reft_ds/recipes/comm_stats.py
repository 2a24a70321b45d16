"""Counting collectives (calls and bytes per kind) for tests and benchmarks: measured, not assumed.

`install()` wraps the collective functions of `torch.distributed` so that every call made while a
`CommRecorder` is active is counted. It must run before `deepspeed.init_distributed`: DeepSpeed's comm layer
caches `torch.distributed.all_gather_into_tensor` when it initialises, and a wrapper installed later never sees
ZeRO-3's parameter all-gathers. Only the outermost call is counted (`all_gather_object` runs an `all_gather`
inside; that is one collective from the caller's point of view).

Bytes are those of the collective's result: the whole output buffer of an all-gather (all ranks' shards,
including ZeRO's alignment padding), the tensor of an all-reduce or broadcast.
"""
from __future__ import annotations

import functools
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

ALL_GATHERS = ("all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather", "all_gather_coalesced",
               "all_gather_object")
COLLECTIVES = ALL_GATHERS + (
    "all_reduce", "all_reduce_coalesced", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base", "all_to_all", "all_to_all_single",
    "gather", "gather_object", "scatter", "scatter_object_list", "barrier", "monitored_barrier")

_active: list["CommRecorder"] = []
_local = threading.local()


class CommRecorder:
    """Calls and bytes of each collective kind seen while recording (see `record`)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def all_gather_calls(self) -> int:
        return sum(self.calls[name] for name in ALL_GATHERS)

    @property
    def all_gather_bytes(self) -> int:
        return sum(self.bytes[name] for name in ALL_GATHERS)

    def as_dict(self) -> dict:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes), "total_calls": self.total_calls,
                "all_gather_calls": self.all_gather_calls, "all_gather_bytes": self.all_gather_bytes}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _counting(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        outermost = not getattr(_local, "inside", False)
        if outermost and _active:
            # The first argument (or its keyword) is the result buffer of every counted collective.
            first = args[0] if args else next(iter(kwargs.values()), None)
            for recorder in _active:
                recorder.calls[name] += 1
                recorder.bytes[name] += _nbytes(first)
        _local.inside = True
        try:
            return fn(*args, **kwargs)
        finally:
            if outermost:
                _local.inside = False

    wrapper.__comm_stats_original__ = fn
    return wrapper


def install() -> None:
    """Wrap torch.distributed's collectives (idempotent). Call before `deepspeed.init_distributed`."""
    if installed():
        return
    if dist.is_initialized():
        raise RuntimeError("comm_stats.install() must run before the process group (and DeepSpeed's comm layer) "
                           "is initialised, or ZeRO-3's cached all-gather function escapes the count")
    for name in COLLECTIVES:
        fn = getattr(c10d, name, None)
        if fn is None:
            continue
        wrapped = _counting(name, fn)
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)


def installed() -> bool:
    return hasattr(dist.all_gather_into_tensor, "__comm_stats_original__")


@contextmanager
def record() -> Iterator[CommRecorder]:
    """Count this rank's collectives inside the block (recorders nest: each sees every call)."""
    if not installed():
        raise RuntimeError("call nested_reft_ds.recipes.comm_stats.install() before deepspeed.init_distributed")
    recorder = CommRecorder()
    _active.append(recorder)
    try:
        yield recorder
    finally:
        _active.remove(recorder)
