"""Fault injection, the test hook for fail-stop and resume: `NESTED_REFT_FAULT=RANK:POINT:STEP:KIND[,...]`.

POINT is where the fault fires on rank RANK:
    sft       after the forward/backward of SFT warm-up step STEP, before it is logged
    rl        after the rollout and reward of RL step STEP, before its backward
    checkpoint  while the checkpoint of progress STEP (RL step, or SFT step when RL has not begun) is being
              written: after this rank's shard is on disk, before `latest` moves
KIND is `raise` (a RuntimeError, as a bug would), `kill` (SIGKILL of this process, as the OOM killer or a
lost node would) or `enospc` (an OSError "No space left on device", as a full disk would where a small tmpfs cannot
be mounted). Unset, nothing happens and nothing is parsed beyond one environment lookup.
"""
from __future__ import annotations

import errno
import os
import signal

from .config import ConfigError

ENV = "NESTED_REFT_FAULT"
POINTS = ("sft", "rl", "checkpoint")
KINDS = ("raise", "kill", "enospc")


class InjectedFault(RuntimeError):
    """Raised by `maybe_fail` for KIND `raise`."""


def parse_faults(spec: str) -> list[tuple[int, str, int, str]]:
    """`RANK:POINT:STEP:KIND[,...]` -> [(rank, point, step, kind)]; a malformed entry is a ConfigError."""
    faults = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        fields = entry.split(":")
        if len(fields) != 4 or fields[1] not in POINTS or fields[3] not in KINDS \
                or not fields[0].isdigit() or not fields[2].isdigit():
            raise ConfigError(f"{ENV}={spec!r}: expected RANK:POINT:STEP:KIND with POINT one of {POINTS} and "
                              f"KIND one of {KINDS}, e.g. 1:rl:3:raise")
        faults.append((int(fields[0]), fields[1], int(fields[2]), fields[3]))
    return faults


def check_fault_ranks(world: int) -> None:
    """Refuse a NESTED_REFT_FAULT entry naming a rank the job does not have: it would never fire, and the test
    that set it would pass without its fault."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for rank, point, step, kind in parse_faults(spec):
        if rank >= world:
            raise ConfigError(f"{ENV}={spec!r}: rank {rank} in {rank}:{point}:{step}:{kind} does not exist "
                              f"(world size {world}: ranks 0..{world - 1})")


def maybe_fail(point: str, step: int, rank: int) -> None:
    """Fire the fault named for (rank, point, step) in NESTED_REFT_FAULT, if any."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for fault_rank, fault_point, fault_step, kind in parse_faults(spec):
        if (fault_rank, fault_point, fault_step) == (rank, point, step):
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "enospc":
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {point} step {step} on rank "
                                            f"{rank}, {ENV}={spec})")
            raise InjectedFault(f"injected fault at {point} step {step} on rank {rank} ({ENV}={spec})")
