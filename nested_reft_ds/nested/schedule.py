"""The skip plan for each step, per the `skip` config: how many layers (fixed, linear warm-up, or adaptive ratio)
and which ones (random, contiguous, or learned from the measured divergence each layer's skipping costs).

Deterministic given (seed, step) and the statistics fed to `observe`; the training loop feeds statistics that
were already all-reduced, so every rank holds the same scheduler state and derives the same plan.
"""
from __future__ import annotations

from typing import Any

from ..config import SkipConfig
from .controller import AdaptiveSkipController, LayerCostTracker
from .plan import SkipPlan, num_skipped, sample_skip_plan, scheduled_ratio


class SkipScheduler:
    def __init__(self, cfg: SkipConfig, num_layers: int, seed: int):
        self.cfg, self.num_layers, self.seed = cfg, num_layers, seed
        # Fail at start-up, not mid-run, when the largest ratio cannot fit the unprotected layers.
        num_skipped(num_layers, cfg.ratio_max if cfg.schedule == "adaptive" else cfg.ratio, cfg.protect_first,
                    cfg.protect_last)
        self.controller = AdaptiveSkipController(
            cfg.ratio, cfg.ratio_min, cfg.ratio_max, target_ess=cfg.target_ess, target_kl=cfg.target_kl,
            step_size=cfg.step_size, smoothing=cfg.smoothing, tolerance=cfg.tolerance) \
            if cfg.schedule == "adaptive" else None
        self.tracker = LayerCostTracker(num_layers) if cfg.strategy == "learned" else None

    def ratio(self, step: int) -> float:
        if self.controller is not None:
            return self.controller.ratio
        return scheduled_ratio(self.cfg.ratio, step, self.cfg.schedule, self.cfg.ramp_steps)

    def plan(self, step: int) -> SkipPlan:
        cfg = self.cfg
        weights = None
        if self.tracker is not None:
            protected = list(range(cfg.protect_first)) + list(range(self.num_layers - cfg.protect_last, self.num_layers))
            weights = self.tracker.sampling_weights(protected)
        return sample_skip_plan(self.num_layers, self.ratio(step), step, self.seed, cfg.protect_first,
                                cfg.protect_last, cfg.strategy, weights)

    def observe(self, plan: SkipPlan, ess: float, kl: float, divergence: float) -> None:
        """Feed one step's (rank-reduced) statistics: the raw token ESS/N of pi_prox / beta and the per-token
        KL(behaviour || target), which the adaptive ratio reads, and the per-token divergence the skip set caused,
        which the learned strategy charges to its layers (`LayerCostTracker`)."""
        if self.controller is not None:
            self.controller.update(ess=ess, kl=kl)
        if self.tracker is not None and plan.skipped:
            self.tracker.update(plan.skipped, divergence)

    def metrics(self) -> dict[str, float]:
        out = self.controller.metrics() if self.controller is not None else {}
        return {**out, **(self.tracker.metrics() if self.tracker is not None else {})}

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict() if self.controller else None,
                "tracker": self.tracker.state_dict() if self.tracker else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.controller is not None and state.get("controller"):
            self.controller.load_state_dict(state["controller"])
        if self.tracker is not None and state.get("tracker"):
            self.tracker.load_state_dict(state["tracker"])
