import math

import pytest
import torch

from nested_reft_ds.rl import importance_weights, kl_estimate, kl_k1, kl_k2, kl_k3

# Per-token ratios rho_t = pi_prox / beta; row 1's last token is padding (mask 0, its "ratio" 100 is ignored).
RATIOS = torch.tensor([[2.0, 0.5, 4.0], [1.5, 3.0, 100.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
PROX = RATIOS.log()
BEHAVIOR = torch.zeros_like(PROX)


def weights(correction, **kw):
    return importance_weights(PROX, BEHAVIOR, MASK, correction=correction, **kw)


def test_none_is_ones_on_completion_tokens():
    w, stats = weights("none")
    assert torch.equal(w, MASK)
    assert stats["ess"] == 1.0 and stats["frac_truncated"] == 0.0 and stats["frac_masked"] == 0.0


def test_token_tis_truncates_at_cap():
    w, stats = weights("token_tis", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 2.0], [1.5, 2.0, 0.0]]))
    assert stats["frac_truncated"] == pytest.approx(2 / 5)  # 4 and 3 exceed the cap; 2 does not
    # ESS/N of the used weights [2, .5, 2, 1.5, 2]: 8^2 / (5 * 14.5)
    assert stats["ess"] == pytest.approx(64 / 72.5)
    w_nocap, _ = weights("token_tis", cap=None)
    torch.testing.assert_close(w_nocap, RATIOS * MASK)


def test_token_mis_masks_outside_band():
    w, stats = weights("token_mis", low=0.5, high=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 0.0], [1.5, 0.0, 0.0]]))  # band is inclusive
    assert stats["frac_masked"] == pytest.approx(2 / 5)
    assert stats["ess"] == pytest.approx(4.0 ** 2 / (5 * (4 + 0.25 + 2.25)))


def test_seq_is_product_and_cap():
    w, stats = weights("seq_is")
    torch.testing.assert_close(w, torch.tensor([[4.0, 4.0, 4.0], [4.5, 4.5, 0.0]]))  # 2*.5*4 and 1.5*3
    assert stats["frac_truncated"] == 0.0
    assert stats["ess"] == pytest.approx(8.5 ** 2 / (2 * (16 + 20.25)))
    w, stats = weights("seq_is", cap=2.0)
    torch.testing.assert_close(w, 2.0 * MASK)
    assert stats["frac_truncated"] == 1.0 and stats["ess"] == 1.0


def test_seq_is_self_normalised_within_groups():
    w, _ = weights("seq_is", self_normalize=True, group_size=2)
    torch.testing.assert_close(w, torch.tensor([[8 / 8.5] * 3, [9 / 8.5, 9 / 8.5, 0.0]]))
    w, _ = weights("seq_is", self_normalize=True, group_size=1)  # groups of one: every weight becomes 1
    torch.testing.assert_close(w, MASK)


def test_seq_mis_geometric_and_product():
    # geometric means: 4^(1/3) = 1.587 (kept), sqrt(4.5) = 2.121 (dropped)
    w, stats = weights("seq_mis", low=0.5, high=2.0, geometric=True)
    torch.testing.assert_close(w, torch.tensor([[4 ** (1 / 3)] * 3, [0.0, 0.0, 0.0]]))
    assert stats["frac_masked"] == 0.5 and stats["ess"] == pytest.approx(0.5)
    w, stats = weights("seq_mis", low=0.5, high=4.2, geometric=False)  # products 4 (kept), 4.5 (dropped)
    torch.testing.assert_close(w, torch.tensor([[4.0] * 3, [0.0] * 3]))
    assert stats["frac_masked"] == 0.5


def test_raw_ratio_statistics_before_truncation():
    _, s = weights("token_tis", cap=2.0)
    # raw token ratios [2, .5, 4, 1.5, 3]; sorted .5 1.5 2 3 4
    assert s["ratio_tok_mean"] == pytest.approx(2.2)
    assert (s["ratio_tok_min"], s["ratio_tok_max"]) == (pytest.approx(0.5), pytest.approx(4.0))
    assert s["ratio_tok_p10"] == pytest.approx(0.9)
    assert s["ratio_tok_p50"] == pytest.approx(2.0)
    assert s["ratio_tok_p90"] == pytest.approx(3.6)
    assert s["ratio_seq_mean"] == pytest.approx(4.25) and s["ratio_seq_max"] == pytest.approx(4.5)
    assert s["log_ratio_seq_min"] == pytest.approx(math.log(4))
    assert s["ess_tok_raw"] == pytest.approx(11 ** 2 / (5 * (4 + 0.25 + 16 + 2.25 + 9)))
    assert s["ess_seq_raw"] == pytest.approx(8.5 ** 2 / (2 * (16 + 20.25)))
    ratios = torch.tensor([2.0, 0.5, 4.0, 1.5, 3.0])
    assert s["kl_behavior_k1"] == pytest.approx(-math.log(18) / 5)
    assert s["kl_behavior_k3"] == pytest.approx((ratios - 1 - ratios.log()).mean().item())
    assert s["weight_mean"] == pytest.approx(8 / 5) and s["nonfinite_count"] == 0.0


def test_nonfinite_ratios_are_masked_and_counted():
    behavior = BEHAVIOR.clone()
    behavior[0, 1] = float("nan")
    behavior[1, 0] = float("-inf")  # log-ratio +inf
    behavior[1, 2] = float("nan")   # padding: ignored, not counted
    for correction in ("none", "seq_is", "token_tis", "token_mis", "seq_mis"):
        w, s = importance_weights(PROX, behavior, MASK, correction=correction, cap=2.0, low=0.5, high=2.0)
        assert torch.isfinite(w).all()
        assert w[0, 1] == 0 and w[1, 0] == 0
        assert s["nonfinite_count"] == 2.0 and s["nonfinite_frac"] == pytest.approx(2 / 5)
        assert all(math.isfinite(v) for v in s.values())
        if correction.startswith("seq"):  # the sequence ratio is undefined: the whole sequence is dropped
            assert torch.equal(w, torch.zeros_like(w))
    w, _ = importance_weights(PROX, behavior, MASK, correction="token_tis", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.0, 2.0], [0.0, 2.0, 0.0]]))


def test_extreme_log_ratios_do_not_overflow():
    prox = torch.full((2, 200), 0.5)  # sequence log-ratio 100: exp would overflow float32
    w, s = importance_weights(prox, torch.zeros_like(prox), torch.ones_like(prox), correction="seq_is")
    assert torch.isfinite(w).all() and all(math.isfinite(v) for v in s.values())
    assert s["log_ratio_seq_max"] == pytest.approx(100.0)


def test_all_masked_gives_zero_weights_and_neutral_stats():
    w, s = importance_weights(PROX, BEHAVIOR, torch.zeros_like(MASK), correction="seq_is")
    assert torch.equal(w, torch.zeros_like(w))
    assert s["ratio_tok_mean"] == 1.0 and s["ess"] == 1.0 and s["weight_mean"] == 0.0
    assert all(math.isfinite(v) for v in s.values())


def test_weights_are_detached():
    prox = PROX.clone().requires_grad_()
    w, _ = importance_weights(prox, BEHAVIOR, MASK, correction="token_tis", cap=2.0)
    assert not w.requires_grad


@pytest.mark.parametrize("kw, match", [
    (dict(correction="tis"), "correction"),
    (dict(correction="token_mis"), "band"),
    (dict(correction="token_tis", self_normalize=True, group_size=2), "self_normalize"),
    (dict(correction="seq_is", self_normalize=True, group_size=3), "group_size"),
])
def test_bad_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        importance_weights(PROX, BEHAVIOR, MASK, **kw)


def test_kl_estimators_hand_computed():
    logp, logq = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    torch.testing.assert_close(kl_k1(logp, logq), torch.tensor([math.log(2)]))
    torch.testing.assert_close(kl_k3(logp, logq), torch.tensor([0.5 - 1 + math.log(2)]))  # r=.5: r-1-log r
    torch.testing.assert_close(kl_estimate(logp, logq, "k3"), kl_k3(logp, logq))
    assert kl_k3(logq, logq).item() == 0.0
    torch.testing.assert_close(kl_k2(logp, logq), torch.tensor([0.5 * math.log(2) ** 2]))
    torch.testing.assert_close(kl_estimate(logp, logq, "k2"), kl_k2(logp, logq))
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, logq, "k4")


def test_kl_estimators_unbiased_on_categorical():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(5), 0)
    q = torch.softmax(torch.randn(5), 0)
    exact = (p * (p / q).log()).sum()
    # exact expectations over the support (no sampling noise)
    for est in ("k1", "k3"):
        torch.testing.assert_close((p * kl_estimate(p.log(), q.log(), est)).sum(), exact)


def test_acceptance_and_chi_square_hand_computed():
    _, s = weights("token_tis", cap=2.0)
    # raw token ratios [2, .5, 4, 1.5, 3]: min(1, rho) = [1, .5, 1, 1, 1]; sequence ratios 4 and 4.5
    assert s["accept"] == pytest.approx(4.5 / 5)
    assert s["chi2_tok"] == pytest.approx((4 + 0.25 + 16 + 2.25 + 9) / 5 - 1)
    assert s["chi2_seq"] == pytest.approx((16 + 20.25) / 2 - 1)
    # the raw ESS/N is mean^2 / (1 + chi2) in either unit (1 / (1 + chi2) when the ratios average 1, as they do
    # in expectation), and sits beside the ESS of the weights used
    assert s["ess_tok_raw"] == pytest.approx(2.2 ** 2 / (1 + s["chi2_tok"]))
    assert s["ess_seq_raw"] == pytest.approx(4.25 ** 2 / (1 + s["chi2_seq"]))
    _, none = weights("none")
    assert none["ess"] == 1.0 and none["ess_tok_raw"] == s["ess_tok_raw"]


def test_on_policy_acceptance_is_one_and_chi_square_zero():
    _, s = importance_weights(PROX, PROX, MASK, correction="token_tis", cap=2.0)
    assert s["accept"] == 1.0 and s["chi2_tok"] == 0.0 and s["chi2_seq"] == 0.0
