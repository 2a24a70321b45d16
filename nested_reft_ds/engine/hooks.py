"""Taking DeepSpeed's module hooks off for a while and putting the very same ones back.

DeepSpeed's own way back (`setup_zero_stage3_hooks()`) registers new hooks: it renumbers every module's
`ds_id`, pushes the root onto its forward-module stack again and invalidates ZeRO-3's recorded trace, so the
next training step runs unprefetched while it records a new one. Here the hook entries are popped out of the
modules' hook dicts and later re-inserted under their original keys and in their original order: the
handles DeepSpeed holds stay valid, nothing is re-registered, and the trace is untouched.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from torch.utils.hooks import RemovableHandle

from .internals import engine_root_hooks, hook_dicts, hook_key, zero3_module_hook_handles, zero3_offload


def zero3_coordinator(engine):
    """The object that owns the ZeRO-3 module hooks: the optimizer's parameter offload for a training engine,
    the optimizer itself for an inference-only ZeRO-3 engine."""
    return zero3_offload(engine)


def zero3_hook_handles(engine) -> list[RemovableHandle]:
    """ZeRO-3's per-module fetch/release hooks and its root hook that resets the fetch step on every forward."""
    return zero3_module_hook_handles(zero3_coordinator(engine))


def engine_root_hook_handles(engine) -> list[RemovableHandle]:
    """The engine's forward prologue/epilogue on the root module. The prologue walks every module and marks it
    "in forward", which makes any touched partitioned parameter all-gather silently; with it off, touching
    one fails loudly instead (and engine timers/throughput counters see only training forwards)."""
    return engine_root_hooks(engine)


@contextmanager
def hooks_suspended(handles: Iterable[RemovableHandle]) -> Iterator[None]:
    """Remove the hooks behind `handles` for the block; afterwards each is back under its own key at its old
    position in its dict (hooks added or removed by others meanwhile keep their changes)."""
    handles = list(handles)
    removed = {hook_key(handle) for handle in handles}
    snapshots: dict[int, tuple[dict, list]] = {}
    for handle in handles:
        for hooks in hook_dicts(handle):
            if id(hooks) not in snapshots:
                snapshots[id(hooks)] = (hooks, list(hooks.items()))
    for handle in handles:
        handle.remove()
    try:
        yield
    finally:
        for hooks, before in snapshots.values():
            known = {key for key, _ in before}
            restored = [(key, value if key in removed else hooks[key]) for key, value in before
                        if key in removed or key in hooks]
            added = [(key, value) for key, value in hooks.items() if key not in known]
            hooks.clear()
            hooks.update(restored)
            hooks.update(added)
