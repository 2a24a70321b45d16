import dataclasses
import math

import pytest
import torch

from nested_reft_ds.config import AlgorithmConfig
from nested_reft_ds.rl import CORRECTIONS, LOSS_AGGREGATIONS, policy_loss

BASE = AlgorithmConfig(correction="none", loss_agg="token_mean")


def cfg(**kw):
    return dataclasses.replace(BASE, **kw)


def leaf(x):
    return x.clone().float().requires_grad_()


def test_clip_hand_computed_positive_and_negative_advantage():
    r = torch.tensor([[1.5, 0.5, 1.1, 0.9]])  # pi_theta / pi_prox; band [0.8, 1.28]
    prox = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    # A = +1: surrogate min(r, clip r) = [1.28, .5, 1.1, .9]; r=1.5 is clipped (no gradient), r=.5 is not.
    logp = leaf(r.log())
    loss, m = policy_loss(logp, prox, prox, torch.tensor([1.0]), mask, cfg(), num_global_tokens=4, num_global_seqs=1)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.28 + 0.5 + 1.1 + 0.9) / 4)
    torch.testing.assert_close(logp.grad, -torch.tensor([[0.0, 0.5, 1.1, 0.9]]) / 4)  # d r / d log r = r
    assert m["clip_frac"] == 0.25
    assert m["ppo_ratio_max"] == pytest.approx(1.5) and m["ppo_ratio_min"] == pytest.approx(0.5)
    # A = -1: surrogate -max(r, clip r) = -[1.5, .8, 1.1, .9]; now r=.5 is the clipped one.
    logp = leaf(r.log())
    loss, m = policy_loss(logp, prox, prox, torch.tensor([-1.0]), mask, cfg(), num_global_tokens=4, num_global_seqs=1)
    loss.backward()
    assert loss.item() == pytest.approx((1.5 + 0.8 + 1.1 + 0.9) / 4)
    torch.testing.assert_close(logp.grad, torch.tensor([[1.5, 0.0, 1.1, 0.9]]) / 4)
    assert m["clip_frac"] == 0.25


def test_off_policy_weight_multiplies_surrogate_and_is_detached():
    # token_tis, cap 2: rho = [3, 0.5] -> w = [2, 0.5]; pi_theta = pi_prox so the surrogate is A = 2.
    prox = torch.log(torch.tensor([[0.3, 0.1]]))
    behavior = torch.log(torch.tensor([[0.1, 0.2]]))
    logp = leaf(prox)
    loss, m = policy_loss(logp, prox, behavior, torch.tensor([2.0]), torch.ones(1, 2), cfg(correction="token_tis"),
                          num_global_tokens=2, num_global_seqs=1)
    loss.backward()
    assert loss.item() == pytest.approx(-(2 * 2 + 0.5 * 2) / 2)
    torch.testing.assert_close(logp.grad, -torch.tensor([[2.0 * 2, 0.5 * 2]]) / 2)
    assert m["frac_truncated"] == 0.5 and m["ratio_tok_max"] == pytest.approx(3.0)


AGG_LOGP = torch.zeros(2, 3)
AGG_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
AGG_ADV = torch.tensor([1.0, -2.0])  # on-policy, r = 1: token losses [-1, -1, -1] and [2]


@pytest.mark.parametrize("agg, kw, expected", [
    ("token_mean", {}, (-3 + 2) / 4),
    ("seq_mean_token_mean", {}, (-1 + 2) / 2),
    ("seq_mean_token_sum_norm", {}, (-3 + 2) / (2 * 3)),
    ("seq_mean_token_sum_norm", {"max_completion_length": 10}, (-3 + 2) / (2 * 10)),
])
def test_aggregation_hand_computed(agg, kw, expected):
    loss, _ = policy_loss(leaf(AGG_LOGP), AGG_LOGP, AGG_LOGP, AGG_ADV, AGG_MASK, cfg(loss_agg=agg),
                          num_global_tokens=4, num_global_seqs=2, **kw)
    assert loss.item() == pytest.approx(expected)


def random_batch(seed, B=8, T=6):
    g = torch.Generator().manual_seed(seed)
    prox = -torch.rand(B, T, generator=g) * 3
    behavior = prox + 0.4 * torch.randn(B, T, generator=g)
    logp = prox + 0.1 * torch.randn(B, T, generator=g)
    ref = prox + 0.2 * torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    adv = torch.randn(B, generator=g)
    return logp, prox, behavior, ref, adv, mask


@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_two_micro_batches_sum_to_the_full_batch(correction, agg):
    logp, prox, behavior, ref, adv, mask = random_batch(1)
    c = cfg(correction=correction, loss_agg=agg, kl_coef=0.05, self_normalize=correction == "seq_is")
    counts = dict(num_global_tokens=mask.sum().item(), num_global_seqs=8, max_completion_length=7, group_size=2)
    full = leaf(logp)
    loss_full, _ = policy_loss(full, prox, behavior, adv, mask, c, ref_logprobs=ref, **counts)
    loss_full.backward()
    parts = leaf(logp)
    total = 0.0
    for sl in (slice(0, 2), slice(2, 8)):  # uneven split, aligned with the prompt groups of 2
        loss, _ = policy_loss(parts[sl], prox[sl], behavior[sl], adv[sl], mask[sl], c, ref_logprobs=ref[sl], **counts)
        loss.backward()
        total = total + loss.item()
    assert total == pytest.approx(loss_full.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(parts.grad, full.grad)


@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_on_policy_every_correction_equals_none(correction, agg):
    logp, prox, _, _, adv, mask = random_batch(2)
    counts = dict(num_global_tokens=mask.sum().item(), num_global_seqs=8)
    ref_lp = leaf(logp)
    ref_loss, _ = policy_loss(ref_lp, prox, prox, adv, mask, cfg(loss_agg=agg), **counts)
    ref_loss.backward()
    lp = leaf(logp)
    loss, m = policy_loss(lp, prox, prox, adv, mask, cfg(correction=correction, loss_agg=agg, is_cap=None), **counts)
    loss.backward()
    assert loss.item() == ref_loss.item()
    assert torch.equal(lp.grad, ref_lp.grad)
    assert m["ess"] == 1.0 and m["kl_behavior_k1"] == 0.0 and m["frac_masked"] == 0.0


def test_kl_penalty_added_with_coefficient():
    logp, prox, behavior, ref, adv, mask = random_batch(3)
    counts = dict(num_global_tokens=mask.sum().item(), num_global_seqs=8)
    base, m0 = policy_loss(leaf(logp), prox, behavior, adv, mask, cfg(), ref_logprobs=ref, **counts)
    for est in ("k2", "k3"):
        lp = leaf(logp)
        loss, m = policy_loss(lp, prox, behavior, adv, mask, cfg(kl_coef=0.5, kl_estimator=est), ref_logprobs=ref,
                              **counts)
        log_r = ref - logp
        kl = 0.5 * log_r ** 2 if est == "k2" else log_r.exp() - 1 - log_r
        assert loss.item() == pytest.approx(base.item() + 0.5 * (kl * mask).sum().item() / mask.sum().item(), rel=1e-5)
        assert m["kl_ref"] == pytest.approx((kl * mask).sum().item() / mask.sum().item(), rel=1e-5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(leaf(logp), prox, behavior, adv, mask, cfg(kl_coef=0.5), **counts)


def test_kl_term_carries_the_off_policy_weight_and_leaves_the_loss_when_in_reward():
    logp, prox, behavior, ref, adv, mask = random_batch(3)
    counts = dict(num_global_tokens=mask.sum().item(), num_global_seqs=8)
    zero_adv = torch.zeros_like(adv)
    c = cfg(correction="token_tis", is_cap=2.0, kl_coef=0.5, kl_estimator="k2")
    loss, _ = policy_loss(leaf(logp), prox, behavior, zero_adv, mask, c, ref_logprobs=ref, **counts)
    w = (prox - behavior).exp().clamp(max=2.0)
    kl = 0.5 * (ref - logp) ** 2
    assert loss.item() == pytest.approx(0.5 * (w * kl * mask).sum().item() / mask.sum().item(), rel=1e-5)
    in_reward = cfg(correction="token_tis", kl_coef=0.5, kl_in_reward=True, kl_estimator="k1")
    loss, m = policy_loss(leaf(logp), prox, behavior, zero_adv, mask, in_reward, ref_logprobs=ref, **counts)
    assert loss.item() == 0.0 and m["kl_ref"] > 0  # the penalty is in the advantages; kl_ref still reported
    loss, m = policy_loss(leaf(logp), prox, behavior, zero_adv, mask, in_reward, **counts)  # no reference needed
    assert "kl_ref" not in m


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_normalize_over_kept_tokens_counts_only_what_the_mask_keeps(agg):
    from nested_reft_ds.rl import loss_token_mask

    # token ratios [[2, .5, 4], [1.5, 3, pad]]: the band [0.6, 2.5] keeps [[2, -, -], [1.5, -, -]]
    prox = torch.tensor([[2.0, 0.5, 4.0], [1.5, 3.0, 0.0]]).log()
    behavior, mask = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logp, adv = prox.clone(), torch.tensor([1.0, -1.0])
    every = cfg(correction="token_mis", mask_low=0.6, mask_high=2.5, loss_agg=agg)
    kept_cfg = dataclasses.replace(every, normalize_over="kept_tokens")
    kept = loss_token_mask(prox, behavior, mask, kept_cfg)
    assert kept.tolist() == [[True, False, False], [True, False, False]]
    assert torch.equal(loss_token_mask(prox, behavior, mask, every), mask > 0)
    full, _ = policy_loss(leaf(logp), prox, behavior, adv, mask, every, num_global_tokens=5, num_global_seqs=2,
                          max_completion_length=3)
    part, _ = policy_loss(leaf(logp), prox, behavior, adv, mask, kept_cfg, num_global_tokens=2, num_global_seqs=2,
                          max_completion_length=3)
    # pg terms: -w A = -2 (row 1) and +1.5 (row 2), the only kept tokens
    expected = {"token_mean": ((-2 + 1.5) / 5, (-2 + 1.5) / 2),
                "seq_mean_token_mean": ((-2 / 3 + 1.5 / 2) / 2, (-2 + 1.5) / 2),
                "seq_mean_token_sum_norm": ((-2 + 1.5) / 6, (-2 + 1.5) / 6)}[agg]
    assert (full.item(), part.item()) == (pytest.approx(expected[0]), pytest.approx(expected[1]))


def test_all_masked_micro_batch_gives_zero_loss_and_finite_grads():
    logp, prox, behavior, ref, adv, mask = random_batch(4)
    for correction in CORRECTIONS:
        for agg in LOSS_AGGREGATIONS:
            lp = leaf(logp)
            loss, m = policy_loss(lp, prox, behavior, adv, torch.zeros_like(mask),
                                  cfg(correction=correction, loss_agg=agg, kl_coef=0.1), ref_logprobs=ref,
                                  num_global_tokens=0, num_global_seqs=0)
            loss.backward()
            assert loss.item() == 0.0 and lp.grad is not None and torch.equal(lp.grad, torch.zeros_like(lp))
            assert all(math.isfinite(v) for v in m.values())


def test_nonfinite_inputs_never_reach_the_gradient():
    logp, prox, behavior, ref, adv, mask = random_batch(5)
    logp[mask == 0] = float("-inf")      # padding positions of pi_theta
    prox[mask == 0] = float("nan")
    behavior[0, 0] = float("nan")        # a broken behaviour log-prob on a completion token
    prox[1, 0] = float("-inf")           # and a broken prox one
    logp[2, 0] = float("-inf")           # and a broken pi_theta one
    ref[3, 0] = float("nan")             # and a broken reference one (drops only its KL term)
    for correction in CORRECTIONS:
        lp = leaf(logp)
        loss, m = policy_loss(lp, prox, behavior, adv, mask, cfg(correction=correction, kl_coef=0.1),
                              ref_logprobs=ref, num_global_tokens=mask.sum().item(), num_global_seqs=8)
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(lp.grad).all()
        assert lp.grad[0, 0] == 0 and lp.grad[1, 0] == 0 and lp.grad[2, 0] == 0
        assert m["nonfinite_count"] == 2.0 and m["nonfinite_logprobs_count"] == 1.0
        assert all(math.isfinite(v) for v in m.values())


def test_metric_keys_and_reduction_suffixes():
    logp, prox, behavior, ref, adv, mask = random_batch(6)
    _, m = policy_loss(leaf(logp), prox, behavior, adv, mask, cfg(correction="token_tis"), ref_logprobs=ref,
                       num_global_tokens=mask.sum().item(), num_global_seqs=8)
    for key in ("clip_frac", "ess", "ess_seq_raw", "kl_behavior_k1", "kl_behavior_k3", "frac_truncated",
                "frac_masked", "ratio_tok_max", "ratio_seq_max", "ratio_tok_min", "ratio_tok_p90", "kl_ref",
                "pg_loss", "nonfinite_count"):
        assert key in m
    assert all(isinstance(v, float) for v in m.values())
    assert m["ratio_tok_min"] <= m["ratio_tok_p50"] <= m["ratio_tok_max"]


def test_shape_errors():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3), BASE,
                    num_global_tokens=6, num_global_seqs=2)
