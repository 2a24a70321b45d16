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
    for est in ("k1", "k3"):
        lp = leaf(logp)
        loss, m = policy_loss(lp, prox, behavior, adv, mask, cfg(kl_coef=0.5, kl_estimator=est), ref_logprobs=ref,
                              **counts)
        log_r = ref - logp
        kl = -log_r if est == "k1" else log_r.exp() - 1 - log_r
        assert loss.item() == pytest.approx(base.item() + 0.5 * (kl * mask).sum().item() / mask.sum().item(), rel=1e-5)
        assert m["kl_ref"] == pytest.approx((kl * mask).sum().item() / mask.sum().item(), rel=1e-5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(leaf(logp), prox, behavior, adv, mask, cfg(kl_coef=0.5), **counts)


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
