"""Which decoder layers the behaviour model skips at a given step.

A plan is a pure function of (seed, step, ratio, strategy): every rank derives the same plan with no
communication, and a resumed run derives the plan it would have used. `engine.check_same_plan` verifies
the agreement at run time (a mismatch raises on every rank rather than silently sampling different models).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SkipPlan:
    num_layers: int
    skipped: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if list(self.skipped) != sorted(set(self.skipped)):
            raise ValueError(f"SkipPlan.skipped must be sorted and unique, got {self.skipped}")
        if self.skipped and not (0 <= self.skipped[0] and self.skipped[-1] < self.num_layers):
            raise ValueError(f"SkipPlan.skipped {self.skipped} out of range for {self.num_layers} layers")
        if len(self.skipped) >= self.num_layers:
            raise ValueError(f"SkipPlan must keep at least one of {self.num_layers} layers")

    @property
    def kept(self) -> tuple[int, ...]:
        skipped = set(self.skipped)
        return tuple(i for i in range(self.num_layers) if i not in skipped)

    @property
    def ratio(self) -> float:
        return len(self.skipped) / self.num_layers

    def fingerprint(self) -> int:
        """A 62-bit integer identifying the plan; equal on two ranks iff their plans are equal (w.h.p.)."""
        digest = hashlib.sha256(f"{self.num_layers}:{self.skipped}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 2


def parse_skip_ratios(text: str, option: str = "skip ratios") -> list[float]:
    """Comma-separated skip ratios ("0,0.25,0.5"), each in [0, 1); ValueError naming `option` and the bad entry."""
    ratios = []
    for entry in (part.strip() for part in text.split(",")):
        try:
            ratio = float(entry)
        except ValueError:
            raise ValueError(f"{option}: {entry!r} in {text!r} is not a number") from None
        if not 0 <= ratio < 1:
            raise ValueError(f"{option}: skip ratio {ratio} in {text!r} is outside [0, 1)")
        ratios.append(ratio)
    return ratios


def num_skipped(num_layers: int, ratio: float, protect_first: int, protect_last: int) -> int:
    """round(ratio * num_layers), checked against the number of unprotected layers."""
    candidates = num_layers - protect_first - protect_last
    count = round(ratio * num_layers)
    if count > max(candidates, 0):
        raise ValueError(f"skip ratio {ratio} asks to skip {count} of {num_layers} layers but only {candidates} "
                         f"are unprotected (protect_first={protect_first}, protect_last={protect_last})")
    return count


def sample_skip_plan(num_layers: int, ratio: float, step: int, seed: int, protect_first: int = 1,
                     protect_last: int = 1, strategy: str = "random",
                     weights: Sequence[float] | None = None) -> SkipPlan:
    """The skip plan for `step`: round(ratio * num_layers) layers drawn from the unprotected middle.

    strategy "random": a uniform subset; "contiguous": one uniformly placed block; "learned": a subset drawn
    without replacement with probability proportional to `weights[layer]` (one weight per layer, > 0 for
    every unprotected layer), e.g. favouring layers whose skipping has cost little KL so far.
    """
    count = num_skipped(num_layers, ratio, protect_first, protect_last)
    candidates = list(range(protect_first, num_layers - protect_last))
    # A string seed is hashed with SHA-512 by `random`, so the stream is identical across processes and
    # Python runs (unlike hash()-based seeding).
    rng = random.Random(f"nested-reft-skip:{seed}:{step}")
    if count == 0:
        chosen: list[int] = []
    elif strategy == "random":
        chosen = rng.sample(candidates, count)
    elif strategy == "contiguous":
        start = rng.randrange(len(candidates) - count + 1)
        chosen = candidates[start:start + count]
    elif strategy == "learned":
        if weights is None or len(weights) != num_layers:
            raise ValueError(f"strategy='learned' needs one weight per layer ({num_layers}), got {weights!r}")
        if any(weights[i] <= 0 for i in candidates):
            raise ValueError("strategy='learned' needs a positive weight for every unprotected layer")
        # Efraimidis-Spirakis: the `count` largest keys u^(1/w) are a weighted sample without replacement.
        keys = {i: rng.random() ** (1.0 / weights[i]) for i in candidates}
        chosen = sorted(candidates, key=lambda i: keys[i], reverse=True)[:count]
    else:
        raise ValueError(f"unknown skip strategy {strategy!r}: expected 'random', 'contiguous' or 'learned'")
    return SkipPlan(num_layers, tuple(sorted(chosen)))


def scheduled_ratio(target_ratio: float, step: int, schedule: str, ramp_steps: int) -> float:
    """Skip ratio at `step`: constant ("fixed") or ramped linearly from 0 over `ramp_steps` ("linear")."""
    if schedule == "fixed" or step >= ramp_steps:
        return target_ratio
    if schedule == "linear":
        return target_ratio * step / ramp_steps
    raise ValueError(f"unknown skip schedule {schedule!r}")
