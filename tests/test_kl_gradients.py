"""Which divergence each KL estimator's expected gradient follows, through the real `policy_loss`.

A categorical policy p = softmax(theta) over 6 tokens and a fixed reference q. Each test draws N one-token
samples from fixed seeds, takes the loss gradient (the sample mean of per-sample gradients) and compares it with
the analytic gradient of KL(p || q) or KL(q || p) within 4 standard errors per component. The standard errors
come from the per-sample gradients, which for a one-token sample y are c(y) (onehot(y) - p).
"""
import dataclasses

import pytest
import torch

from nested_reft_ds.config import AlgorithmConfig, ConfigError
from nested_reft_ds.rl import kl_estimate, policy_loss

V, N = 6, 200_000
THETA = torch.tensor([0.3, -0.5, 1.2, 0.0, -1.0, 0.6])
REF = torch.log_softmax(torch.tensor([1.5, -1.0, -0.5, 0.8, 1.0, -0.8]), dim=0)
BEHAVIOR = torch.log_softmax(THETA + torch.tensor([0.5, -0.3, 0.2, 0.4, -0.6, 0.1]), dim=0)
ON_POLICY = AlgorithmConfig(correction="none", loss_agg="token_mean")


def analytic(direction: str) -> torch.Tensor:
    theta = THETA.clone().requires_grad_()
    logp = torch.log_softmax(theta, dim=0)
    kl = (logp.exp() * (logp - REF)).sum() if direction == "reverse" else (REF.exp() * (REF - logp)).sum()
    kl.backward()
    return theta.grad


def loss_gradient(cfg: AlgorithmConfig, sample_from: torch.Tensor, seed: int, advantage_from_kl: str | None = None):
    """Mean gradient of `policy_loss` over N samples from `sample_from`, and its per-component standard error."""
    tokens = torch.multinomial(sample_from.exp(), N, replacement=True, generator=torch.Generator().manual_seed(seed))
    theta = THETA.clone().requires_grad_()
    logp_all = torch.log_softmax(theta, dim=0)
    logprobs = logp_all[tokens][:, None]                                          # [N, 1] pi_theta
    prox, behavior, ref = logprobs.detach(), sample_from[tokens][:, None], REF[tokens][:, None]
    advantages = torch.zeros(N)
    if advantage_from_kl is not None:  # the penalty in the reward: A = -k(y), no baseline
        advantages = -kl_estimate(prox, ref, advantage_from_kl)[:, 0]
    loss, _ = policy_loss(logprobs, prox, behavior, advantages, torch.ones(N, 1), cfg, num_global_tokens=N,
                          num_global_seqs=N, ref_logprobs=None if cfg.kl_in_reward else ref)
    loss.backward()
    # per-sample gradients: d loss_i / d logp_i * (onehot - p); recover d loss_i / d logp_i with a second pass
    logprobs_leaf = prox.clone().requires_grad_()
    loss_leaf, _ = policy_loss(logprobs_leaf, prox, behavior, advantages, torch.ones(N, 1), cfg,
                               num_global_tokens=1, num_global_seqs=1,
                               ref_logprobs=None if cfg.kl_in_reward else ref)
    loss_leaf.backward()
    per_sample = logprobs_leaf.grad * (torch.nn.functional.one_hot(tokens, V) - logp_all.detach().exp())  # [N, V]
    torch.testing.assert_close(per_sample.double().mean(dim=0).float(), theta.grad, rtol=1e-2, atol=1e-3)
    return theta.grad, per_sample.std(dim=0) / N ** 0.5


def in_loss(estimator: str, **kw) -> AlgorithmConfig:
    return dataclasses.replace(ON_POLICY, kl_coef=1.0, kl_estimator=estimator, **kw)


def assert_within(estimate, se, expected):
    assert bool(((estimate - expected).abs() <= 4 * se + 1e-6).all()), (estimate, expected, se)


def assert_not_within(estimate, se, expected):
    assert bool(((estimate - expected).abs() > 4 * se).any()), (estimate, expected, se)


def test_the_two_divergences_have_different_gradients():
    assert (analytic("reverse") - analytic("forward")).abs().max() > 0.05


def test_k2_in_the_loss_follows_the_reverse_kl():
    grad, se = loss_gradient(in_loss("k2"), torch.log_softmax(THETA, dim=0), seed=1)
    assert_within(grad, se, analytic("reverse"))
    assert_not_within(grad, se, analytic("forward"))


def test_k3_in_the_loss_follows_the_forward_kl():
    grad, se = loss_gradient(in_loss("k3"), torch.log_softmax(THETA, dim=0), seed=2)
    assert_within(grad, se, analytic("forward"))
    assert_not_within(grad, se, analytic("reverse"))


def test_k1_in_the_loss_has_zero_expected_gradient_and_is_refused():
    # Bypass the config check to show why it exists: the mean gradient is noise around 0.
    cfg = dataclasses.replace(ON_POLICY, kl_coef=1.0)
    object.__setattr__(cfg, "kl_estimator", "k1")
    grad, se = loss_gradient(cfg, torch.log_softmax(THETA, dim=0), seed=3)
    assert_within(grad, se, torch.zeros(V))
    assert_not_within(grad, se, analytic("reverse"))
    with pytest.raises(ConfigError, match="kl_estimator.*zero"):
        AlgorithmConfig(kl_coef=0.1, kl_estimator="k1")


def test_k1_in_the_reward_follows_the_reverse_kl():
    cfg = dataclasses.replace(ON_POLICY, kl_coef=1.0, kl_in_reward=True, kl_estimator="k1")
    grad, se = loss_gradient(cfg, torch.log_softmax(THETA, dim=0), seed=4, advantage_from_kl="k1")
    assert_within(grad, se, analytic("reverse"))


def test_k3_in_the_reward_follows_neither_and_is_refused():
    cfg = dataclasses.replace(ON_POLICY, kl_coef=1.0, kl_in_reward=True, kl_estimator="k1")
    grad, se = loss_gradient(cfg, torch.log_softmax(THETA, dim=0), seed=5, advantage_from_kl="k3")
    assert_not_within(grad, se, analytic("reverse"))
    assert_not_within(grad, se, analytic("forward"))
    for estimator in ("k2", "k3"):
        with pytest.raises(ConfigError, match="kl_in_reward"):
            AlgorithmConfig(kl_coef=0.1, kl_in_reward=True, kl_estimator=estimator)


@pytest.mark.parametrize("estimator, direction", [("k2", "reverse"), ("k3", "forward")])
def test_off_policy_samples_weighted_like_the_pg_term_keep_the_on_policy_kl_gradient(estimator, direction):
    # Samples from a behaviour beta != p; the KL term carries w = p / beta (token_tis without a cap).
    cfg = in_loss(estimator, correction="token_tis", is_cap=None)
    grad, se = loss_gradient(cfg, BEHAVIOR, seed=6)
    assert_within(grad, se, analytic(direction))
    unweighted, se_u = loss_gradient(in_loss(estimator), BEHAVIOR, seed=6)
    assert_not_within(unweighted, se_u, analytic(direction))


def test_auto_picks_the_reverse_kl_estimator_for_where_the_penalty_goes():
    assert AlgorithmConfig(kl_coef=0.1).kl_estimator == "k2"
    assert AlgorithmConfig(kl_coef=0.1, kl_in_reward=True).kl_estimator == "k1"
    with pytest.raises(ConfigError, match="kl_coef"):
        AlgorithmConfig(kl_in_reward=True)
