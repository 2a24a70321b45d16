"""Estimator diagnostics over the global batch are exact: ESS/N, ratio quantiles, KL and the surrogate statistics
do not depend on how the batch is cut into micro-batches or ranks.

Unit cases are hand-computed; the split cases cut one random global batch (64 rows x 20 tokens, ragged masks,
fully masked sequences, non-finite log-probs) into micro-batches of 8/16/32 rows and into 2 simulated ranks;
the distributed case runs engine.distributed.reduce_diagnostics on 2 real ranks (gloo, CPU).
"""
import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from nested_reft_ds.rl import finalize, importance_weight_parts, importance_weights, merge
from nested_reft_ds.rl.diagnostics import DiagnosticParts, ess, quantiles
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("diagnostics_worker", REPO / "tests" / "distributed" /
                                               "diagnostics_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)  # module level imports only torch and nested_reft_ds.rl / .config


def parts(ratios, mask, correction="token_tis", **kw):
    ratios, mask = torch.tensor(ratios), torch.tensor(mask)
    return importance_weight_parts(ratios.log(), torch.zeros_like(ratios), mask, correction=correction, **kw)[1]


def assert_metrics_close(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert list(got) == list(want)
    bad = {k: (got[k], want[k]) for k in want if not abs(got[k] - want[k]) <= tol * max(1.0, abs(want[k]))}
    assert not bad, bad


# --- hand-computed -----------------------------------------------------------------------------------------

def test_ess_of_two_uniform_halves_merges_exactly():
    a, b = 2.0, 0.5  # each half has uniform weights: ESS/N 1 each, and their mean would say 1
    half_a, half_b = parts([[a, a], [a, a]], [[1.0, 1.0]] * 2), parts([[b, b], [b, b]], [[1.0, 1.0]] * 2)
    assert finalize(half_a)["ess"] == 1.0 and finalize(half_b)["ess"] == 1.0
    merged = finalize(merge([half_a, half_b]))
    assert merged["ess"] == pytest.approx((a + b) ** 2 / (2 * (a * a + b * b)))  # 6.25 / 8.5 = 0.735
    assert merged["ess_tok_raw"] == pytest.approx(merged["ess"])
    # sequence ratios a^2 (twice) and b^2 (twice)
    assert merged["ess_seq_raw"] == pytest.approx((a * a + b * b) ** 2 / (2 * (a ** 4 + b ** 4)))
    whole = importance_weights(torch.tensor([[a, a], [a, a], [b, b], [b, b]]).log(), torch.zeros(4, 2),
                               torch.ones(4, 2), correction="token_tis")[1]
    assert_metrics_close(merged, whole, 1e-12)


def test_quantiles_and_kl_from_the_global_set_hand_computed():
    # micro-batch 1: one sequence, tokens [.5, 2]; micro-batch 2: one sequence, tokens [1, 4, 8]
    first = parts([[0.5, 2.0, 7.0]], [[1.0, 1.0, 0.0]])  # 7.0 is padding
    second = parts([[1.0, 4.0, 8.0]], [[1.0, 1.0, 1.0]])
    assert finalize(first)["ratio_tok_p50"] == pytest.approx(1.25)  # their mean, 2.625, is not the median
    assert finalize(second)["ratio_tok_p50"] == pytest.approx(4.0)
    m = finalize(merge([first, second]))
    # sorted .5 1 2 4 8: p10 at position .4, p50 at 2, p90 at 3.6
    assert m["ratio_tok_p10"] == pytest.approx(0.5 + 0.4 * 0.5)
    assert m["ratio_tok_p50"] == pytest.approx(2.0)
    assert m["ratio_tok_p90"] == pytest.approx(4.0 + 0.6 * 4.0)
    assert (m["ratio_tok_min"], m["ratio_tok_max"], m["ratio_tok_mean"]) == (
        pytest.approx(0.5), pytest.approx(8.0), pytest.approx(15.5 / 5))
    r = [0.5, 2.0, 1.0, 4.0, 8.0]
    assert m["kl_behavior_k1"] == pytest.approx(-math.log(0.5 * 2 * 1 * 4 * 8) / 5)
    assert m["kl_behavior_k3"] == pytest.approx(sum(x - 1 - math.log(x) for x in r) / 5)
    # sequence ratios 1 and 32: p50 16.5, log-ratios 0 and log 32
    assert m["ratio_seq_p50"] == pytest.approx(16.5) and m["ratio_seq_p90"] == pytest.approx(1 + 0.9 * 31)
    assert m["ess_seq_raw"] == pytest.approx(33 ** 2 / (2 * (1 + 32 ** 2)))
    assert m["log_ratio_seq_mean"] == pytest.approx(math.log(32) / 2)
    assert m["log_ratio_seq_max"] == pytest.approx(math.log(32)) and m["log_ratio_seq_min"] == pytest.approx(0.0)
    assert m["weight_mean"] == pytest.approx(15.5 / 5)


def test_helpers_and_neutral_values():
    assert quantiles(torch.tensor([3.0, 1.0, 2.0, 4.0])) == pytest.approx([1.3, 2.5, 3.7])
    assert quantiles(torch.tensor([5.0])) == [5.0, 5.0, 5.0]
    assert ess(0.0, 0.0, 0) == 1.0 and ess(0.0, 0.0, 3) == 0.0 and ess(3.0, 3.0, 3) == 1.0
    empty = parts([[2.0, 3.0]], [[0.0, 0.0]])
    full = parts([[2.0, 3.0]], [[1.0, 1.0]])
    e = finalize(empty)
    assert e["ratio_tok_mean"] == e["ratio_tok_p50"] == e["ratio_seq_max"] == 1.0 and e["ess"] == 1.0
    assert e["log_ratio_seq_mean"] == e["frac_truncated"] == e["kl_behavior_k3"] == e["weight_mean"] == 0.0
    assert_metrics_close(finalize(merge([empty, full, empty])), finalize(full), 1e-12)
    assert finalize(DiagnosticParts()) == {}


def test_nonfinite_counts_are_global_totals():
    nan = float("nan")
    one = parts([[nan, 1.0], [2.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]])
    two = parts([[nan, nan], [2.0, 2.0]], [[1.0, 1.0], [1.0, 0.0]])
    m = finalize(merge([one, two]))
    assert m["nonfinite_count"] == 3.0 and m["nonfinite_frac"] == pytest.approx(3 / 7)


# --- one global batch, cut every way -------------------------------------------------------------------------

def whole_batch_metrics(name: str) -> dict:
    cfg, empty_rank1 = worker.CASES[name]
    return finalize(worker.parts_for(worker.case_batch(empty_rank1), slice(0, worker.ROWS), cfg))


@pytest.mark.parametrize("name", list(worker.CASES))
def test_micro_batch_size_and_simulated_ranks_do_not_change_the_diagnostics(name):
    cfg, empty_rank1 = worker.CASES[name]
    batch = worker.case_batch(empty_rank1)
    want = whole_batch_metrics(name)
    # behaviour NaN/-inf at rows 1 and 40 (row 40 is masked when rank 1's half is), pi_theta -inf at row 9
    assert want["nonfinite_count"] == (1.0 if empty_rank1 else 2.0) and want["nonfinite_logprobs_count"] == 1.0
    for micro in (8, 16, 32):
        pieces = [worker.parts_for(batch, slice(s, s + micro), cfg) for s in range(0, worker.ROWS, micro)]
        assert_metrics_close(finalize(merge(pieces)), want)
        # two ranks, each merging its own micro-batches, then the ranks' parts merged (what reduce_diagnostics does)
        half = worker.ROWS // 2
        ranks = [merge([worker.parts_for(batch, slice(s, s + micro), cfg) for s in range(r * half, (r + 1) * half,
                                                                                          min(micro, half))])
                 for r in range(2)]
        assert_metrics_close(finalize(merge(ranks)), want)
    # the old reduction (mean over micro-batches of per-micro-batch metrics) is not exact
    old = [finalize(worker.parts_for(batch, slice(s, s + 8), cfg)) for s in range(0, worker.ROWS, 8)]
    if name == "seq_is":
        assert abs(sum(m["ess"] for m in old) / len(old) - want["ess"]) > 1e-3


# --- two real ranks --------------------------------------------------------------------------------------------

@pytest.mark.distributed
def test_reduce_diagnostics_on_two_ranks_equals_the_whole_batch(tmp_path):
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "tests" / "distributed" / "diagnostics_worker.py"), "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"2-rank launch failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["world"] == r1["world"] == 2
    assert r0["cases"] == r1["cases"]  # identical on every rank
    for name in worker.CASES:
        assert_metrics_close(r0["cases"][name], whole_batch_metrics(name))
