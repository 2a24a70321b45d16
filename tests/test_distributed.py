"""Real 2-rank DeepSpeed ZeRO-3 runs (gloo on CPU): one launch, many assertions.

The launch runs tests/distributed/zero3_worker.py: a 3-step training run with checkpoints, a resume from step
2, and the gather-once rollout invariants. Each test below asserts on what the ranks recorded.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nested_reft_ds.engine import consolidated_state_dict, export_hf_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
