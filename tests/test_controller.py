import json
import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nested_reft_ds.nested import sample_skip_plan
from nested_reft_ds.nested.controller import AdaptiveSkipController, LayerCostTracker


def test_ratio_rises_below_the_band_falls_above_it_and_holds_inside():
    # target_ess 0.8: off-policyness d = 1 - ESS/N against t = 0.2, band (0.1, 0.3) with tolerance 0.5;
    # smoothing 1 acts on each step's value alone.
    c = AdaptiveSkipController(0.25, 0.0, 0.5, target_ess=0.8, step_size=0.05, smoothing=1.0, tolerance=0.5)
    assert c.update(ess=0.95) == pytest.approx(0.30)   # d = 0.05 < 0.1: room to skip more
    assert c.update(ess=0.80) == pytest.approx(0.30)   # inside the band: hold
    assert c.update(ess=0.75) == pytest.approx(0.30)   # d = 0.25, still inside
    assert c.update(ess=0.60) == pytest.approx(0.25)   # d = 0.4 > 0.3: back off
    assert c.update(ess=float("nan")) == pytest.approx(0.20)  # unsure: back off
    assert c.steps == 5


def test_statistics_are_smoothed_before_the_decision():
    smooth = AdaptiveSkipController(0.25, 0.0, 0.5, target_ess=0.8, step_size=0.05, smoothing=0.25)
    raw = AdaptiveSkipController(0.25, 0.0, 0.5, target_ess=0.8, step_size=0.05, smoothing=1.0)
    for c in (smooth, raw):
        c.update(ess=0.8)                                # first value: d = 0.2, inside the band (0.1, 0.3)
    # one noisy step, d = 0.5: smoothed 0.2 + 0.25 (0.5 - 0.2) = 0.275 holds; unsmoothed backs off
    assert smooth.update(ess=0.5) == pytest.approx(0.25) and raw.update(ess=0.5) == pytest.approx(0.20)
    assert smooth.metrics()["controller_ess"] == pytest.approx(0.725)


def test_kl_target_and_both_targets():
    c = AdaptiveSkipController(0.2, 0.0, 0.5, target_kl=0.05, step_size=0.1, smoothing=1.0)
    assert c.update(kl=0.01) == pytest.approx(0.3)
    assert c.update(kl=0.2) == pytest.approx(0.2)
    both = AdaptiveSkipController(0.2, 0.0, 0.5, target_ess=0.8, target_kl=0.05, step_size=0.1, smoothing=1.0)
    assert both.update(ess=0.95, kl=0.2) == pytest.approx(0.1)  # one target too far off-policy: back off
    assert both.update(ess=0.95, kl=0.05) == pytest.approx(0.1)  # one inside its band: hold
    assert both.update(ess=0.95, kl=0.01) == pytest.approx(0.2)  # every one below its band: rise
    with pytest.raises(ValueError, match="kl"):
        both.update(ess=0.9)


def test_ratio_stays_in_bounds():
    c = AdaptiveSkipController(0.3, 0.1, 0.4, target_ess=0.8, step_size=0.07)
    assert max(c.update(ess=1.0) for _ in range(20)) == 0.4
    assert min(c.update(ess=0.0) for _ in range(20)) == 0.1


@pytest.mark.parametrize("seed", range(5))
def test_closed_loop_with_noise_stays_inside_the_band(seed):
    # Simulated plant: the raw ESS/N falls with the ratio, 1 - 2 r^2 (0.9 at r = 0.22), measured with noise of
    # standard deviation 0.05. Band for target 0.9 and tolerance 0.5: ESS/N in [0.85, 0.95]. (A rule that moves
    # every step on the raw value is inside it on about 72% of the steps here.)
    rng = random.Random(seed)
    c = AdaptiveSkipController(0.0, 0.0, 0.9, target_ess=0.9, step_size=0.05)
    plant = lambda r: 1 - 2.0 * r * r
    ratios, inside = [], []
    for step in range(300):
        ratios.append(c.ratio)
        if step >= 40:  # after the climb from 0
            inside.append(0.85 <= plant(c.ratio) <= 0.95)
        c.update(ess=plant(c.ratio) + rng.gauss(0.0, 0.05))
    assert sum(inside) / len(inside) >= 0.8
    assert all(0.0 <= r <= 0.9 for r in ratios)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio_init=0.6, ratio_min=0.0, ratio_max=0.5, target_ess=0.8), "ratio_init"),
    (dict(ratio_init=0.2, ratio_min=0.2, ratio_max=0.2, target_ess=0.8), "ratio_max"),
    (dict(ratio_init=0.2, ratio_min=0.0, ratio_max=0.5), "target"),
    (dict(ratio_init=0.2, ratio_min=0.0, ratio_max=0.5, target_ess=1.5), "target_ess"),
    (dict(ratio_init=0.2, ratio_min=0.0, ratio_max=0.5, target_ess=1.0), "target_ess"),
    (dict(ratio_init=0.2, ratio_min=0.0, ratio_max=0.5, target_kl=0.1, step_size=0.0), "step_size"),
    (dict(ratio_init=0.2, ratio_min=0.0, ratio_max=0.5, target_kl=0.1, step_size=0.6), "step_size"),
    (dict(ratio_init=0.2, ratio_min=0.0, ratio_max=0.5, target_kl=0.1, smoothing=0.0), "smoothing"),
    (dict(ratio_init=0.2, ratio_min=0.0, ratio_max=0.5, target_kl=0.1, tolerance=1.0), "tolerance"),
])
def test_controller_rejects_settings_that_cannot_move_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveSkipController(**kwargs)


def test_config_refuses_adaptive_settings_that_cannot_move_the_ratio():
    from nested_reft_ds.config import ConfigError, SkipConfig

    with pytest.raises(ConfigError, match="skip.target_ess"):
        SkipConfig(schedule="adaptive", target_ess=1.0)
    with pytest.raises(ConfigError, match="skip.ratio_max"):
        SkipConfig(schedule="adaptive", ratio=0.0, ratio_min=0.0, ratio_max=0.0, target_kl=0.1)
    with pytest.raises(ConfigError, match="skip.step_size"):
        SkipConfig(schedule="adaptive", ratio_max=0.5, step_size=0.6, target_kl=0.1)


def stat_stream(n, seed=0):
    rng = random.Random(seed)
    return [(rng.random(), rng.random() * 0.1) for _ in range(n)]


def test_controller_resume_continues_the_same_sequence():
    make = lambda: AdaptiveSkipController(0.25, 0.05, 0.6, target_ess=0.5, target_kl=0.05, step_size=0.03)
    stream = stat_stream(40)
    straight = make()
    expected = [straight.update(ess, kl) for ess, kl in stream]
    first = make()
    head = [first.update(ess, kl) for ess, kl in stream[:17]]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint would store it
    tail = [resumed.update(ess, kl) for ess, kl in stream[17:]]
    assert head + tail == expected and resumed.steps == 40


def _rank_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # each rank sees different local data
    controller = AdaptiveSkipController(0.25, 0.0, 0.75, target_ess=0.8, target_kl=0.02, step_size=0.05)
    tracker = LayerCostTracker(8)
    ratios, weights = [], []
    for step in range(30):
        plan = sample_skip_plan(8, controller.ratio, step, seed=7, strategy="learned",
                                weights=tracker.sampling_weights(protected=(0, 7)))
        log_ratio = (0.05 + 0.1 * controller.ratio) * torch.randn(64)       # local per-token log rho
        w = log_ratio.exp()
        stats = torch.stack([w.sum() ** 2 / (w.numel() * (w * w).sum()), -log_ratio.mean()]).double()
        dist.all_reduce(stats)
        ess, kl = (stats / world).tolist()
        ratios.append(controller.update(ess=ess, kl=kl))
        tracker.update(plan.skipped, kl)
        weights.append(tracker.sampling_weights(protected=(0, 7)))
    gathered = [None] * world
    dist.all_gather_object(gathered, (ratios, weights))
    if rank == 0:
        torch.save(gathered, out_file)
    dist.destroy_process_group()


def test_two_ranks_compute_identical_ratio_and_weight_sequences(tmp_path):
    out = tmp_path / "out.pt"
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    (ratios0, weights0), (ratios1, weights1) = torch.load(out)
    assert ratios0 == ratios1 and weights0 == weights1  # bitwise, not approximately
    assert len(set(ratios0)) > 1  # the ratio did move


TRUE_COST = [0.0, 0.01, 0.05, 0.002, 0.03, 0.004, 0.02, 0.0]  # layers 0 and 7 are protected


def feed(tracker, steps, seed=0, noise=0.002):
    rng = random.Random(seed)
    for _ in range(steps):
        skipped = rng.sample(range(1, 7), 3)
        tracker.update(skipped, sum(TRUE_COST[i] for i in skipped) + rng.gauss(0, noise))


def test_tracker_recovers_per_layer_costs_from_set_level_kl():
    tracker = LayerCostTracker(8, decay=0.98)
    feed(tracker, 300)
    costs = tracker.costs()
    for layer in range(1, 7):
        assert costs[layer] == pytest.approx(TRUE_COST[layer], abs=0.004)


def test_sampling_weights_prefer_cheap_layers_and_never_protected():
    tracker = LayerCostTracker(8, decay=0.98)
    assert tracker.sampling_weights(protected=(0, 7)) == [0.0] + [1 / 6] * 6 + [0.0]  # no data yet: uniform
    feed(tracker, 300)
    w = tracker.sampling_weights(protected=(0, 7))
    assert w[0] == w[7] == 0.0 and sum(w) == pytest.approx(1.0)
    assert all(w[i] >= 0.1 / 6 for i in range(1, 7))  # exploration floor keeps every layer possible
    order = sorted(range(1, 7), key=lambda i: -w[i])
    assert order == sorted(range(1, 7), key=lambda i: TRUE_COST[i])  # cheapest first: 3, 5, 1, 6, 4, 2
    # Plans drawn with these weights skip the cheapest layer far more often than the dearest, still randomly.
    counts = [0] * 8
    for step in range(2000):
        for layer in sample_skip_plan(8, 0.25, step, seed=1, strategy="learned", weights=w).skipped:
            counts[layer] += 1
    assert counts[0] == counts[7] == 0 and counts[3] > 2 * counts[2] > 0


def test_tracker_ignores_uninformative_steps_and_resumes():
    tracker = LayerCostTracker(8)
    tracker.update([], 0.3)
    tracker.update([2], float("nan"))
    assert tracker.updates == 0 and tracker.costs() == [0.0] * 8
    feed(tracker, 20)
    resumed = LayerCostTracker(8)
    resumed.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    feed(tracker, 10, seed=1)
    feed(resumed, 10, seed=1)
    assert resumed.costs() == tracker.costs()
    assert set(tracker.metrics()) == {f"layer_cost/{i}" for i in range(8)}
    # A checkpoint written before the tracker took any divergence (its sum saved as "kl_sum") resumes the same.
    older = {("kl_sum" if key == "divergence_sum" else key): value for key, value in tracker.state_dict().items()}
    from_older = LayerCostTracker(8)
    from_older.load_state_dict(older)
    assert from_older.costs() == tracker.costs()
    assert all(math.isfinite(v) for v in tracker.metrics().values())
    with pytest.raises(ValueError, match="layers"):
        LayerCostTracker(6).load_state_dict(tracker.state_dict())
    with pytest.raises(ValueError, match="out of range"):
        tracker.update([8], 0.1)
