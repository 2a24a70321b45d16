"""Adaptive skip ratio (`skip.schedule: adaptive`) and learned layer selection (`skip.strategy: learned`).

Both are pure and deterministic in their inputs. The training loop all-reduces the statistics it feeds them
(ESS, KL, the drafter's rejection rate) before calling, so every rank computes the same ratio and the same layer
weights with no communication here; both round-trip through `state_dict()` so a resumed run continues the same
sequence.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch


class AdaptiveSkipController:
    """Moves the skip ratio toward the largest value whose off-policyness stays inside a target band.

    It reads the raw ratio statistics of the behaviour samples, which do not depend on the correction: the raw
    token-level ESS/N of rho_t = pi_prox / beta (`ess_tok_raw`, before truncation or masking; one unit, tokens,
    whatever the correction) and the per-token KL(beta || pi_prox). Each is smoothed by an exponential moving
    average (weight `smoothing` on the newest step), and the controller acts on the off-policyness
    d = 1 - ESS/N and d = KL against their targets t = 1 - target_ess and t = target_kl, with a hysteresis band
    of relative half-width `tolerance`:
        any smoothed d > t (1 + tolerance)  -> the ratio falls by `step_size` (too far off-policy)
        every smoothed d < t (1 - tolerance) -> the ratio rises by `step_size` (room to skip more)
        otherwise                            -> the ratio holds
    and stays in [ratio_min, ratio_max]. Inside the band nothing moves, so per-step noise in the statistics does
    not make the ratio oscillate around the boundary. A non-finite statistic counts as too far off-policy.
    """

    def __init__(self, ratio_init: float, ratio_min: float, ratio_max: float, *, target_ess: float | None = None,
                 target_kl: float | None = None, step_size: float = 0.05, smoothing: float = 0.3,
                 tolerance: float = 0.5) -> None:
        if not 0.0 <= ratio_min <= ratio_init <= ratio_max < 1.0 or ratio_min == ratio_max:
            raise ValueError(f"adaptive skip needs 0 <= ratio_min <= ratio_init <= ratio_max < 1 and ratio_min < "
                             f"ratio_max, got ratio_min={ratio_min}, ratio_init={ratio_init}, ratio_max={ratio_max}")
        if target_ess is None and target_kl is None:
            raise ValueError("adaptive skip needs a target: target_ess and/or target_kl")
        if target_ess is not None and not 0.0 < target_ess < 1.0:
            raise ValueError(f"target_ess must be in (0, 1) (the raw ESS/N reaches 1 only on-policy), got {target_ess}")
        if target_kl is not None and not target_kl > 0.0:
            raise ValueError(f"target_kl must be > 0, got {target_kl}")
        if not 0.0 < step_size <= ratio_max - ratio_min:
            raise ValueError(f"step_size must be in (0, ratio_max - ratio_min = {ratio_max - ratio_min:g}], "
                             f"got {step_size}")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
        self.ratio_min, self.ratio_max = ratio_min, ratio_max
        self.target_ess, self.target_kl, self.step_size = target_ess, target_kl, step_size
        self.smoothing, self.tolerance = smoothing, tolerance
        self.ratio = ratio_init
        self.steps = 0
        self.smoothed: dict[str, float] = {}  # statistic name -> its moving average of off-policyness d

    def _targets(self) -> dict[str, float]:
        targets = {}
        if self.target_ess is not None:
            targets["ess"] = 1.0 - self.target_ess
        if self.target_kl is not None:
            targets["kl"] = self.target_kl
        return targets

    def update(self, ess: float | None = None, kl: float | None = None) -> float:
        """Feed this step's (all-reduced) raw ESS/N and per-token KL(beta || pi); returns the ratio for the next
        step. A configured target needs its statistic."""
        observed = {"ess": None if ess is None else 1.0 - ess, "kl": kl}
        direction = 1
        for name, target in self._targets().items():
            value = observed[name]
            if value is None:
                raise ValueError(f"the controller has a {name} target but update() got {name}=None")
            if not math.isfinite(value):
                value = math.inf
            previous = self.smoothed.get(name)
            smoothed = value if previous is None else previous + self.smoothing * (value - previous)
            self.smoothed[name] = smoothed if math.isfinite(smoothed) else (previous if previous is not None
                                                                            else target)
            if not smoothed <= target * (1 + self.tolerance):
                direction = -1
            elif direction == 1 and not smoothed < target * (1 - self.tolerance):
                direction = 0
        self.ratio = min(self.ratio_max, max(self.ratio_min, self.ratio + direction * self.step_size))
        self.steps += 1
        return self.ratio

    def metrics(self) -> dict[str, float]:
        """The smoothed statistics the controller acts on, for logging."""
        out = {}
        if "ess" in self.smoothed:
            out["controller_ess"] = 1.0 - self.smoothed["ess"]
        if "kl" in self.smoothed:
            out["controller_kl"] = self.smoothed["kl"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "steps": self.steps, "smoothed": dict(self.smoothed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.ratio_min <= state["ratio"] <= self.ratio_max:
            raise ValueError(f"saved skip ratio {state['ratio']} is outside [{self.ratio_min}, {self.ratio_max}]")
        self.ratio, self.steps = float(state["ratio"]), int(state["steps"])
        self.smoothed = {k: float(v) for k, v in state.get("smoothed", {}).items()}


class LayerCostTracker:
    """Running per-layer estimates of the divergence that skipping each layer costs, from per-step (skipped set,
    divergence). The training loop feeds the per-token KL(beta || pi) of nested rollouts, and for speculative ones
    (whose samples are the full model's, KL 0) the drafter's per-token rejection rate 1 - a, the mean total variation
    distance between the drafter's and the full model's next-token distributions: the layers whose skipping makes
    the drafter disagree most are then kept most often.

    A step only reveals the divergence of its whole skipped set, so costs are attributed by discounted ridge
    regression on the additive model divergence ~ sum_{l in skipped} c_l: each step adds its indicator row with
    weight 1 and every older step is discounted by `decay`. The ridge (`prior_strength` pseudo-observations
    per layer) shrinks toward the average cost per skipped layer, so an unseen layer costs the average.
    """

    def __init__(self, num_layers: int, decay: float = 0.9, prior_strength: float = 1.0) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if not prior_strength > 0.0:
            raise ValueError(f"prior_strength must be > 0, got {prior_strength}")
        self.num_layers, self.decay, self.prior_strength = num_layers, decay, prior_strength
        # float64 sums on CPU: identical arithmetic on every rank.
        self.gram = torch.zeros(num_layers, num_layers, dtype=torch.float64)  # [L, L] sum d^k x x^T
        self.moment = torch.zeros(num_layers, dtype=torch.float64)            # [L] sum d^k x divergence
        self.divergence_sum = 0.0  # sum d^k divergence
        self.size_sum = 0.0  # sum d^k |skipped|
        self.updates = 0

    def update(self, skipped_layers: Iterable[int], divergence: float) -> None:
        """Record that skipping `skipped_layers` cost `divergence` (all-reduced, per token) this step.

        Steps that skipped nothing or measured a non-finite divergence carry no information and are ignored.
        """
        layers = sorted(set(skipped_layers))
        if any(not 0 <= layer < self.num_layers for layer in layers):
            raise ValueError(f"skipped layers {layers} out of range for {self.num_layers} layers")
        if not layers or not math.isfinite(divergence):
            return
        x = torch.zeros(self.num_layers, dtype=torch.float64)
        x[layers] = 1.0
        self.gram = self.decay * self.gram + torch.outer(x, x)
        self.moment = self.decay * self.moment + x * divergence
        self.divergence_sum = self.decay * self.divergence_sum + divergence
        self.size_sum = self.decay * self.size_sum + len(layers)
        self.updates += 1

    def costs(self) -> list[float]:
        """Estimated divergence cost of skipping each layer, [L]."""
        prior = self.divergence_sum / self.size_sum if self.size_sum > 0 else 0.0
        ones = torch.ones(self.num_layers, dtype=torch.float64)
        system = self.gram + self.prior_strength * torch.eye(self.num_layers, dtype=torch.float64)
        deviation = torch.linalg.solve(system, self.moment - self.gram @ ones * prior)
        return (prior + deviation).tolist()

    def sampling_weights(self, protected: Iterable[int], temperature: float = 1.0,
                         explore: float = 0.1) -> list[float]:
        """One weight per layer for `sample_skip_plan(strategy="learned")`: 0 for protected layers, and for
        the others softmax(-(c_l / mean c - 1) / temperature) mixed with `explore` of the uniform distribution,
        so cheap layers are preferred, every unprotected layer keeps a positive chance and the estimates of
        the others keep being refreshed. Uniform until some divergence has been recorded.
        """
        if not temperature > 0.0 or not 0.0 < explore <= 1.0:
            raise ValueError(f"need temperature > 0 and explore in (0, 1], got {temperature}, {explore}")
        blocked = set(protected)
        candidates = [layer for layer in range(self.num_layers) if layer not in blocked]
        if not candidates:
            raise ValueError(f"every one of the {self.num_layers} layers is protected")
        cost = torch.tensor(self.costs(), dtype=torch.float64)[candidates]
        scale = cost.mean().abs().item()
        if scale < 1e-12:
            probs = torch.full((len(candidates),), 1.0 / len(candidates), dtype=torch.float64)
        else:
            probs = torch.softmax(-(cost / scale - 1.0) / temperature, dim=0)
        probs = (1.0 - explore) * probs + explore / len(candidates)
        weights = [0.0] * self.num_layers
        for layer, p in zip(candidates, probs.tolist()):
            weights[layer] = p
        return weights

    def metrics(self) -> dict[str, float]:
        """Per-layer cost estimates for logging, keyed `layer_cost/<index>`."""
        return {f"layer_cost/{layer}": cost for layer, cost in enumerate(self.costs())}

    def state_dict(self) -> dict[str, Any]:
        return {"gram": self.gram.tolist(), "moment": self.moment.tolist(), "divergence_sum": self.divergence_sum,
                "size_sum": self.size_sum, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gram = torch.tensor(state["gram"], dtype=torch.float64)
        if gram.shape != (self.num_layers, self.num_layers):
            raise ValueError(f"saved layer-cost state is for {gram.shape[0]} layers, this model has {self.num_layers}")
        self.gram, self.moment = gram, torch.tensor(state["moment"], dtype=torch.float64)
        # Checkpoints written before speculative steps fed the rejection rate saved the sum as "kl_sum" (a
        # speculative run's sums there are of its zero KL: the decay forgets them within a few tens of steps).
        divergence_sum = state["divergence_sum"] if "divergence_sum" in state else state["kl_sum"]
        self.divergence_sum, self.size_sum = float(divergence_sum), float(state["size_sum"])
        self.updates = int(state["updates"])
