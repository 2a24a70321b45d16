"""An exactly solvable toy problem for checking off-policy gradient estimators (used by tests and benchmarks).

A tabular autoregressive policy emits `length` tokens from a `vocab`-token alphabet; the logits of token t
depend on (t, previous token), held in a table [T, V+1, V] (context index V is BOS). All V**T sequences can
be enumerated, so J(theta) = E_pi[R(y)] and its gradient are exact. The behaviour policy beta is the same
table with perturbed logits, standing in for the nested (layer-skipped) model. Estimates go through the
real `policy_loss`, so they test the library's weights, surrogate and aggregation, not a re-implementation.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

from nested_reft_ds.config import AlgorithmConfig
from nested_reft_ds.rl import policy_loss, token_logprobs


@dataclasses.dataclass(frozen=True)
class ToyProblem:
    theta: torch.Tensor   # [T, V+1, V] target logits pi
    beta: torch.Tensor    # [T, V+1, V] behaviour logits
    reward: torch.Tensor  # [V**T] reward of each sequence, indexed by its base-V number

    @property
    def length(self) -> int:
        return self.theta.shape[0]

    @property
    def vocab(self) -> int:
        return self.theta.shape[2]


def make_toy_problem(vocab: int, length: int, shift: float, seed: int) -> ToyProblem:
    """Random target logits, behaviour = target + `shift` * N(0, 1) noise, 0/1 rewards (a verifiable task)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(length, vocab + 1, vocab, generator=g)
    beta = theta + shift * torch.randn(length, vocab + 1, vocab, generator=g)
    reward = (torch.rand(vocab ** length, generator=g) < 0.5).float()
    return ToyProblem(theta, beta, reward)


def _contexts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """tokens [N, T] -> previous-token context [N, T], BOS (= vocab) at t = 0."""
    return torch.cat([torch.full_like(tokens[:, :1], vocab), tokens[:, :-1]], dim=1)


def sequence_token_logprobs(table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [N, T] of tokens [N, T] under a shared table [T, V+1, V] or per-row tables
    [N, T, V+1, V] (per-row copies give per-sample gradients from one backward pass)."""
    n, t = tokens.shape
    ctx = _contexts(tokens, table.shape[-1])
    steps = torch.arange(t)[None].expand(n, t)
    logits = table[steps, ctx] if table.dim() == 3 else table[torch.arange(n)[:, None], steps, ctx]  # [N, T, V]
    return token_logprobs(logits, tokens)


def sample(table: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n sequences [n, T] sampled autoregressively from the logits table [T, V+1, V]."""
    length, vocab = table.shape[0], table.shape[2]
    tokens = torch.empty(n, length, dtype=torch.long)
    prev = torch.full((n,), vocab, dtype=torch.long)
    for t in range(length):
        prev = torch.multinomial(torch.softmax(table[t, prev], dim=-1), 1, generator=generator).squeeze(1)
        tokens[:, t] = prev
    return tokens


def sequence_index(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """tokens [N, T] -> their base-`vocab` number [N] (the row of `ToyProblem.reward`)."""
    powers = vocab ** torch.arange(tokens.shape[1] - 1, -1, -1)
    return (tokens * powers).sum(dim=1)


def exact_gradient(problem: ToyProblem) -> torch.Tensor:
    """d/dtheta E_pi[R] [T, V+1, V], by enumerating every sequence."""
    every = torch.tensor(list(itertools.product(range(problem.vocab), repeat=problem.length)))  # [V**T, T]
    theta = problem.theta.clone().requires_grad_()
    prob = sequence_token_logprobs(theta, every).sum(dim=1).exp()                               # [V**T]
    (prob * problem.reward[sequence_index(every, problem.vocab)]).sum().backward()
    return theta.grad


def exact_value(problem: ToyProblem) -> float:
    """E_pi[R] by enumeration."""
    every = torch.tensor(list(itertools.product(range(problem.vocab), repeat=problem.length)))
    prob = sequence_token_logprobs(problem.theta, every).sum(dim=1).exp()
    return float((prob * problem.reward[sequence_index(every, problem.vocab)]).sum())


def gradient_samples(problem: ToyProblem, cfg: AlgorithmConfig, num_groups: int, group_size: int,
                     generator: torch.Generator, baseline: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-group estimates [num_groups, T*(V+1)*V] of grad E_pi[R] from behaviour samples, and loss metrics.

    Draws num_groups * group_size sequences from beta, uses advantage R - baseline (a constant baseline keeps
    an unbiased estimator unbiased), and runs `policy_loss` with pi_theta = pi_prox = target. Each row is the
    mean over one group of the per-sequence estimates w * A * sum_t grad log pi(y_t), so rows are i.i.d. even
    when `cfg.self_normalize` couples the samples of a group.
    """
    n = num_groups * group_size
    tokens = sample(problem.beta, n, generator)                                    # [N, T]
    table = problem.theta.expand(n, *problem.theta.shape).clone().requires_grad_()  # [N, T, V+1, V]
    logp = sequence_token_logprobs(table, tokens)                                  # [N, T]
    behavior = sequence_token_logprobs(problem.beta, tokens)                       # [N, T]
    adv = problem.reward[sequence_index(tokens, problem.vocab)] - baseline         # [N]
    mask = torch.ones_like(logp)
    loss, metrics = policy_loss(logp, logp.detach(), behavior, adv, mask, cfg, num_global_tokens=mask.sum().item(),
                                num_global_seqs=n, group_size=group_size)
    loss.backward()
    # loss = -(1 / (N T)) sum_i w_i A_i sum_t r_it, and d r / d theta = grad log pi at r = 1.
    per_sample = -table.grad.reshape(n, -1) * mask.sum()                           # [N, D]
    return per_sample.view(num_groups, group_size, -1).mean(dim=1), metrics
