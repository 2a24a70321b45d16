"""Real 2-rank DeepSpeed ZeRO-3 runs (gloo on CPU): one launch, many assertions.

The launch runs tests/distributed/zero3_worker.py: a 3-step training run with checkpoints (token_tis), a resume
from step 2, the gather-once rollout invariants, and a 2-step seq_is run with KL to a frozen ZeRO-3 reference
plus its resume. Each test below asserts on what the ranks recorded.
"""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from nested_reft_ds.engine import consolidated_state_dict, export_hf_model
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "tests" / "distributed" / "zero3_worker.py"), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"2-rank launch failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, results


def test_both_ranks_ran_the_same_plans_with_finite_loss(ranks):
    _, (r0, r1) = ranks
    assert r0["world"] == r1["world"] == 2
    assert [s["step"] for s in r0["steps_a"]] == [0, 1, 2]
    assert [s["skipped_layers"] for s in r0["steps_a"]] == [s["skipped_layers"] for s in r1["steps_a"]]
    assert all(1 <= len(s["skipped_layers"]) <= 3 and 0 not in s["skipped_layers"] for s in r0["steps_a"])
    assert len({tuple(s["skipped_layers"]) for s in r0["steps_a"]}) > 1, "a fresh plan each step"
    assert all(abs(s["loss"]) < 1e3 and s["loss"] == s["loss"] for s in r0["steps_a"])


def test_zero0_reports_the_gradient_norm_zero3_reports(ranks):
    """At ZeRO-0 DeepSpeed clips without keeping the gradient norm and `engine.optimizer_step` computes it from the
    all-reduced gradients; the same run at ZeRO-3, whose norm DeepSpeed computes over the partitions, agrees."""
    _, (r0, _) = ranks
    zero3 = [s["grad_norm"] for s in r0["steps_a"]]
    zero0 = [s["grad_norm"] for s in r0["steps_zero0"]]
    assert len(zero0) == 3 and all(norm > 0 for norm in zero3)
    assert zero0 == pytest.approx(zero3, rel=1e-3)


def test_parameters_change_and_checkpoints_commit(ranks):
    out, _ = ranks
    checkpoints = out / "run_a" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "rl_step3"
    before, after = consolidated_state_dict(checkpoints, "sft_step30"), consolidated_state_dict(checkpoints, "rl_step3")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, "RL steps must update most parameter tensors"


def test_resume_reproduces_the_next_step(ranks):
    _, results = ranks
    for result in results:
        continuous = next(s for s in result["steps_a"] if s["step"] == 2)
        (resumed,) = result["steps_b"]
        assert resumed["step"] == 2
        assert resumed["skipped_layers"] == continuous["skipped_layers"]
        for key in ("reward_mean", "completion_length", "loss", "ratio_tok_max"):
            assert resumed[key] == pytest.approx(continuous[key], rel=1e-5, abs=1e-7), key


def test_gather_once_never_gathers_skipped_layers(ranks):
    _, results = ranks
    for result in results:
        inside = result["status_inside"]
        assert inside[1] == inside[2] == ["NOT_AVAILABLE"], "skipped layers stay partitioned"
        assert all(inside[i] == ["AVAILABLE"] for i in (0, 3, 4, 5)), "kept layers gathered for the whole rollout"
        assert result["embed_status_inside"] == "AVAILABLE"
        assert result["hooks_inside"] == 0, "ZeRO-3 module hooks are off while decoding"
        assert all(s == ["NOT_AVAILABLE"] for s in result["status_after"]), "released after the rollout"
        assert result["hooks_after"] == result["hooks_before"], "hooks put back exactly"


def test_gathered_nested_generation_equals_plain_model(ranks):
    _, results = ranks
    assert all(result["tokens_match_plain_model"] for result in results)


def test_plan_mismatch_raises_on_every_rank(ranks):
    _, results = ranks
    for result in results:
        assert "skip plans differ across ranks" in result["mismatch"]


def test_error_inside_rollout_restores_engine_and_training_goes_on(ranks):
    _, results = ranks
    for result in results:
        assert all(s == ["NOT_AVAILABLE"] for s in result["status_after_error"])
        assert result["hooks_after_error"] == result["hooks_before"]
        assert result["loss_after_error_finite"]


def test_export_consolidates_zero3_checkpoint_into_hf_model(ranks, tmp_path):
    from nested_reft_ds.model import load_model_and_tokenizer
    out, _ = ranks
    exported = export_hf_model(out / "run_a" / "checkpoints", tmp_path / "hf")
    model, tokenizer = load_model_and_tokenizer(exported)
    state = consolidated_state_dict(out / "run_a" / "checkpoints")
    torch.testing.assert_close(model.model.layers[2].mlp.down_proj.weight,
                               state["model.layers.2.mlp.down_proj.weight"])
    assert tokenizer.decode(tokenizer("7+5=12").input_ids) == "7+5=12"


DIAGNOSTICS = ("ess", "ess_seq_raw", "ess_tok_raw", "frac_truncated", "frac_masked", "kl_behavior_k1", "kl_behavior_k3",
               "accept", "weight_mean", *(f"ratio_{unit}_p{q}" for unit in ("tok", "seq") for q in (10, 50, 90)))


def check_diagnostics(step: dict, unit: str, cap: float) -> None:
    """Finite loss and every estimator diagnostic; truncation counted in the correction's unit (tok | seq)."""
    assert math.isfinite(step["loss"]) and abs(step["loss"]) < 1e3, step["loss"]
    for key in DIAGNOSTICS:
        assert key in step and math.isfinite(step[key]), key
    assert 0 < step["ess"] <= 1 + 1e-9 and 0 <= step["frac_truncated"] <= 1 and 0 <= step["frac_masked"] <= 1
    assert step["kl_behavior_k3"] >= 0
    for kind in ("tok", "seq"):
        assert (step[f"ratio_{kind}_min"] <= step[f"ratio_{kind}_p10"] <= step[f"ratio_{kind}_p50"]
                <= step[f"ratio_{kind}_p90"] <= step[f"ratio_{kind}_max"]), kind
    assert step["nonfinite_count"] == 0
    # Some unit's raw ratio exceeds the cap (max over ranks) exactly when a truncated fraction is reported.
    assert (step["frac_truncated"] > 0) == (step[f"ratio_{unit}_max"] > cap), (unit, step)
    assert step["frac_masked"] == 0, "token_tis and seq_is truncate, they never mask"


def test_token_tis_run_logs_its_diagnostics(ranks):
    _, results = ranks
    for result in results:
        for step in result["steps_a"]:
            check_diagnostics(step, "tok", cap=2.0)  # the defaults: correction=token_tis, is_cap=2
            assert "kl_ref" not in step, "no reference without algorithm.kl_coef"


def test_seq_is_run_with_reference_kl_completes_and_logs_diagnostics(ranks):
    _, (r0, r1) = ranks
    for result in (r0, r1):
        assert [s["step"] for s in result["steps_kl"]] == [0, 1]
        for step in result["steps_kl"]:
            check_diagnostics(step, "seq", cap=1.2)  # correction=seq_is, is_cap=1.2
            assert math.isfinite(step["kl_ref"]) and step["kl_ref"] >= 0
            # seq_is repeats one capped sequence weight on each token: its mean is bounded by the cap.
            assert 0 <= step["weight_mean"] <= 1.2 + 1e-6
        assert any(s["frac_truncated"] > 0 for s in result["steps_kl"]), "is_cap=1.2 truncates some sequences"
        # The reference is the policy as RL starts: KL ~0 at the first step, > 0 once the policy has moved.
        assert result["steps_kl"][0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)
        assert result["steps_kl"][1]["kl_ref"] > 0
    assert [s["skipped_layers"] for s in r0["steps_kl"]] == [s["skipped_layers"] for s in r1["steps_kl"]]
    # Metrics are reduced over ranks, so both ranks log the same numbers.
    assert [s["kl_ref"] for s in r0["steps_kl"]] == [s["kl_ref"] for s in r1["steps_kl"]]


def test_reference_is_a_partitioned_zero3_inference_engine(ranks):
    _, results = ranks
    for rank, result in enumerate(results):
        for key in ("reference_kl", "reference_kl_resumed"):
            reference = result[key]
            assert reference["zero_stage"] == 3 and reference["optimizer"] == "DeepSpeedZeRoOffload", key
            assert reference["statuses"] == ["NOT_AVAILABLE"], "every reference parameter partitioned between forwards"
            assert not reference["requires_grad"] and not reference["grads"] and not reference["training"]
        assert result["references_built"] == 2
        assert f"zero3_rank{rank:03d}_of002.pt" in result["reference_files_kl"]


def test_resume_restores_the_zero3_reference_and_replays_the_step(ranks):
    _, results = ranks
    for result in results:
        continuous = result["steps_kl"][1]
        (resumed,) = result["steps_kl_resumed"]
        assert resumed["step"] == 1 and resumed["skipped_layers"] == continuous["skipped_layers"]
        for key in ("loss", "kl_ref", "reward_mean", "completion_length", "ess", "ratio_seq_max", "frac_truncated"):
            assert resumed[key] == pytest.approx(continuous[key], rel=1e-5, abs=1e-7), key


def test_every_rollout_mode_trains_through_train_run_with_unequal_rank_lengths(ranks):
    """Streamed decoding runs collectives, so ranks whose completions end at different lengths must still run the
    same number of forwards: every mode finishes, and gives the run gather-once gives."""
    out, results = ranks
    for result in results:
        once, streamed, auto = (result[f"steps_mode_{mode}"] for mode in ("once", "streamed", "auto"))
        assert [s["step"] for s in once] == [s["step"] for s in streamed] == [s["step"] for s in auto] == [0, 1, 2]
        assert [s["rollout_lockstep"] for s in once] == [0.0] * 3
        assert [s["rollout_lockstep"] for s in streamed] == [1.0] * 3
        assert [s["rollout_lockstep"] for s in auto] == [1.0] * 3, "auto chose streamed under the tiny fraction"
        # The case that hung: in some step the two ranks' longest completions differ.
        assert any(s["longest_completion_min"] < s["longest_completion_max"] for s in once), once
        for mode_steps in (streamed, auto):
            for expected, got in zip(once, mode_steps):
                assert got["skipped_layers"] == expected["skipped_layers"]
                # Same gathered weights, same tokens, same tensor shapes (lockstep's trailing padding is trimmed):
                # bitwise equal on CPU.
                for key in ("loss", "reward_mean", "completion_length", "ess", "kl_behavior_k3"):
                    assert got[key] == expected[key], key
        for mode in ("streamed", "auto"):
            assert result[f"summary_mode_{mode}"] == result["summary_mode_once"]
    weights = {mode: consolidated_state_dict(out / f"mode_{mode}" / "checkpoints", "rl_step3")
               for mode in ("once", "streamed", "auto", "savings_off")}
    for mode in ("streamed", "auto"):
        assert weights[mode].keys() == weights["once"].keys()
        for key, value in weights["once"].items():
            assert torch.equal(weights[mode][key], value), f"{mode}: {key}"
    # The exact savings (compaction, shared prefill, bucketing, the packed shared-prompt forward) against none of
    # them, through train.run on ZeRO-3: the same steps up to float summation order.
    for result in results:
        packed, plain = result["steps_mode_once"], result["steps_mode_savings_off"]
        assert all(s["train_packed_micro_batches"] > 0 for s in packed)
        assert all(s["train_packed_micro_batches"] == 0 for s in plain)
        for expected, got in zip(plain, packed):
            assert got["skipped_layers"] == expected["skipped_layers"]
            for key in ("loss", "ess", "kl_behavior_k3", "grad_norm"):
                assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    for key, value in weights["savings_off"].items():
        torch.testing.assert_close(weights["once"][key], value, atol=1e-5, rtol=1e-4)


def test_zero3_streamed_eval_equals_the_plain_single_process_eval(ranks, tmp_path):
    """`nested-reft eval --deepspeed zero3 --gather streamed` on 2 ranks: lockstep decoding and balanced scoring
    forwards (one rank generates a balancing chunk in the last round) finish and give the plain run's numbers."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("zero3_worker", REPO / "tests" / "distributed" / "zero3_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    from nested_reft_ds.recipes import evaluate

    out, _ = ranks
    assert [(out / f"eval_rank{r}.code").read_text() for r in range(2)] == ["0", "0"]
    assert evaluate.main(worker.eval_arguments(out / "hf_a", tmp_path / "plain.json")) == 0
    sharded, plain = (json.loads(path.read_text()) for path in (out / "eval_streamed.json", tmp_path / "plain.json"))
    assert sharded["world_size"] == 2 and plain["world_size"] == 1
    assert list(sharded["benchmarks"]) == list(plain["benchmarks"]) == ["synthetic skip=0", "synthetic skip=0.34"]
    for row, expected in plain["benchmarks"].items():
        got = sharded["benchmarks"][row]
        assert got["problems"] == expected["problems"], row  # every sample, token count and answer
        for key, value in expected["metrics"].items():
            if key != "tokens_per_s":
                assert got["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (row, key)
    # The case lockstep exists for: in the last round rank 0 decodes chunk 2 while rank 1 decodes its balancing
    # copy of chunk 0 (same prompts and seed), and the two end at different lengths.
    records = plain["benchmarks"]["synthetic skip=0"]["problems"]
    from nested_reft_ds.model import load_tokenizer
    tokenizer = load_tokenizer(out / "hf_a")
    lengths = [len(tokenizer(r["prompt"], add_special_tokens=False).input_ids) for r in records]
    chunks = evaluate.generation_chunks(lengths, 2, 4)
    longest = [max(s["tokens"] for i in chunk for s in records[i]["samples"]) for chunk in chunks]
    assert len(chunks) == 3 and longest[2] != longest[0], longest


def test_kl_in_reward_and_kept_token_normaliser_under_zero3(ranks):
    """pi_prox and the reference scored before the update (collective forwards) on 2 ranks: the reduced metrics
    agree across ranks, the penalty is 0 where the reference is the policy (step 0) and finite after."""
    _, (r0, r1) = ranks
    steps0, steps1 = r0["steps_kl_in_reward"], r1["steps_kl_in_reward"]
    assert [s["step"] for s in steps0] == [0, 1]
    for a, b in zip(steps0, steps1):
        for key in ("loss", "kl_penalty_mean", "reward_mean", "accept", "frac_masked"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    assert abs(steps0[0]["kl_penalty_mean"]) < 1e-6
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["kl_penalty_mean"]) for s in steps0)


def test_speculative_rollouts_under_zero3_are_on_policy(ranks):
    """rollout.mode=speculative through train.run on 2 ranks, ZeRO-3 gather-once, every parameter partitioned: the
    behaviour log-probs are the full model's (ratios 1, KL 0: the verifier ran every gathered layer), the step's
    metrics are global (equal on both ranks) and the nested drafter was sometimes rejected. With
    rollout.adaptive_draft both ranks draft step 1 at the length chosen from step 0's global acceptance, and the
    learned skip strategy (TINY's) charges the global rejection rate 1 - a to the skipped layers on both ranks."""
    from nested_reft_ds.nested.controller import LayerCostTracker
    from nested_reft_ds.speculative import best_draft_length

    _, (r0, r1) = ranks
    steps0, steps1 = r0["steps_mode_speculative"], r1["steps_mode_speculative"]
    assert [s["step"] for s in steps0] == [0, 1]
    for a, b in zip(steps0, steps1):
        assert a["skipped_layers"] == b["skipped_layers"] and len(a["skipped_layers"]) == 3
        for key in ("loss", "spec_acceptance", "spec_tokens_per_verify", "reward_mean", "spec_draft_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    assert steps0[0]["spec_draft_length"] == 3  # rollout.draft_length: nothing observed yet
    assert steps0[1]["spec_draft_length"] == best_draft_length(steps0[0]["spec_acceptance"], 3 / 6, 6)
    for step in steps0:
        assert 0 < step["spec_acceptance"] <= 1 and step["spec_tokens_per_verify"] >= 1
        assert abs(step["ratio_tok_max"] - 1) < 1e-3 and abs(step["ratio_tok_min"] - 1) < 1e-3
        assert abs(step["kl_behavior_k3"]) < 1e-6
    assert any(step["spec_acceptance"] < 1 for step in steps0)
    costs = LayerCostTracker(6)  # replayed from the logged global acceptances
    for a, b in zip(steps0, steps1):
        costs.update(a["skipped_layers"], 1 - a["spec_acceptance"])
        for layer, cost in enumerate(costs.costs()):
            assert a[f"layer_cost/{layer}"] == pytest.approx(cost, abs=1e-9) == b[f"layer_cost/{layer}"]
    assert max(costs.costs()) > 0
