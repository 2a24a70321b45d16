"""Rollout gather modes under ZeRO-3 (once / streamed / auto): unit tests, then one real 2-rank launch.

The launch (tests/distributed/gather_worker.py) records what each rank saw; the distributed tests assert on it.
Collectives are counted by wrapping torch.distributed (recipes/comm_stats.py), not assumed.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from nested_reft_ds.recipes import comm_stats
from nested_reft_ds.engine.gather import choose_gather_mode, free_device_memory, lockstep_for
from nested_reft_ds.engine.hooks import hooks_suspended
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 10


# ----------------------------------------------------------------------------------------------- unit tests

def test_choose_gather_mode_is_a_memory_threshold():
    assert choose_gather_mode(50, 100) == "once"          # exactly half of free memory: fits
    assert choose_gather_mode(51, 100) == "streamed"
    assert choose_gather_mode(90, 100, fraction=0.9) == "once"
    assert choose_gather_mode(0, 0) == "once"             # nothing to gather (stage 0-2 or all resident)
    assert choose_gather_mode(1, 0) == "streamed"
    with pytest.raises(ValueError, match="fraction"):
        choose_gather_mode(1, 100, fraction=0.0)
    with pytest.raises(ValueError, match="needed_bytes=-1"):
        choose_gather_mode(-1, 100)


def test_free_device_memory_on_cpu_is_positive_and_bounded():
    import psutil
    assert 0 < free_device_memory(torch.device("cpu")) <= psutil.virtual_memory().total


def test_hooks_suspended_puts_the_same_hooks_back_in_order():
    calls = []
    module = nn.Linear(2, 2)
    first = module.register_forward_pre_hook(lambda m, a: calls.append("first"))
    middle = module.register_forward_pre_hook(lambda m, a, k: calls.append("middle"), with_kwargs=True)
    last = module.register_forward_pre_hook(lambda m, a: calls.append("last"))
    post = module.register_forward_hook(lambda m, a, o: calls.append("post"))
    with hooks_suspended([first, middle, post]):
        module(torch.ones(2))
        assert calls == ["last"]
        added = module.register_forward_pre_hook(lambda m, a: calls.append("added"))
        last.remove()  # changes made by others meanwhile are kept
    calls.clear()
    module(torch.ones(2))
    assert calls == ["first", "middle", "added", "post"]
    middle.remove()  # the original handles still work
    calls.clear()
    module(torch.ones(2))
    assert calls == ["first", "added", "post"]
    added.remove()


def test_suspended_hooks_are_restored_after_an_exception():
    calls = []
    module = nn.Linear(2, 2)
    handle = module.register_forward_pre_hook(lambda m, a: calls.append("hook"))
    with pytest.raises(KeyError):
        with hooks_suspended([handle]):
            raise KeyError("boom")
    module(torch.ones(2))
    assert calls == ["hook"]


def test_lockstep_only_for_models_inside_streamed_mode():
    assert lockstep_for(nn.Linear(2, 2)) is None


def test_comm_stats_counts_calls_and_result_bytes_once_per_collective():
    comm_stats.install()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with comm_stats.record() as outer:
            dist.all_reduce(torch.ones(3))
            with comm_stats.record() as inner:
                dist.all_gather_into_tensor(torch.empty(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
                dist.all_gather_object([None], {"a": 1})  # runs all_gathers inside: counted once
        assert inner.calls == {"all_gather_into_tensor": 1, "all_gather_object": 1}
        assert inner.bytes["all_gather_into_tensor"] == 32
        assert outer.calls == {"all_reduce": 1, "all_gather_into_tensor": 1, "all_gather_object": 1}
        assert outer.bytes["all_reduce"] == 12 and outer.all_gather_calls == 2
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------- 2-rank DeepSpeed run

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather")
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "tests" / "distributed" / "gather_worker.py"), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # A deadlock (e.g. ranks finishing at different lengths in a mode that runs collectives) hits the timeout.
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"2-rank launch failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def all_rollouts(result):
    yield from result["rollouts"].items()
    yield from ((f"between_{i}", r) for i, r in enumerate(result["between_steps"]))
    yield from ((f"offload_{k}", v) for k, v in result["offload"].items() if k != "steps")


def trimmed(completions, length):
    return [row[:length] for row in completions]


@pytest.mark.distributed
def test_training_after_rollouts_is_bitwise_identical_with_the_same_collectives(ranks):
    """Engine B rolled out (once, streamed, and both failing mid-decode) before steps 2, 3, 4; engine A never did."""
    for result in ranks:
        assert [b["mode"] for b in result["between_steps"]] == ["once", "streamed", "once", "streamed", "streamed"]
        for step, (a, b) in enumerate(zip(result["steps_a"], result["steps_b"])):
            assert a["loss"] == b["loss"], f"step {step}: loss differs after a rollout"
            assert a["comm"] == b["comm"], f"step {step}: collectives differ after a rollout"
        # The comparison has teeth: an invalidated trace re-records (step 0 shows what that costs).
        recording, steady = result["steps_a"][0]["comm"], result["steps_a"][2]["comm"]
        assert recording["all_gather_calls"] > 2 * steady["all_gather_calls"]
        assert recording["all_gather_bytes"] > steady["all_gather_bytes"]


@pytest.mark.distributed
def test_rollouts_put_back_hooks_parameter_states_indices_and_coordinator(ranks):
    for result in ranks:
        fresh = result["state_fresh"]
        assert result["state_after_rollouts"] == fresh, "rollouts on a fresh engine leave no trace at all"
        for key in ("state_before_step2", "state_before_step3", "state_before_step4", "state_b_end"):
            state = result[key]
            for field in ("hooks", "layer_idx", "num_hidden_layers", "num_layer_objects", "coordinator", "stack"):
                assert state[field] == fresh[field], (key, field)
            assert state["trace"] == "COMPLETE" and state["inflight"] == 0 and state["active"] == 0, key
        assert result["state_b_end"]["statuses"] == result["state_a_end"]["statuses"]
        assert result["state_b_end"]["resident"] == result["state_a_end"]["resident"]


@pytest.mark.distributed
def test_gather_once_is_one_coalesced_all_gather_of_exactly_the_kept_parameters(ranks):
    for result in ranks:
        for name in ("once_mid", "once_no_layer0", "once_nocache", "auto"):
            rollout = result["rollouts"][name]
            calls = rollout["context_comm"]["calls"]
            assert calls.pop("all_gather_into_tensor") == 1, name
            assert set(calls) == {"all_reduce"}, name  # plan check (and auto's memory MIN), nothing else
            assert rollout["context_comm"]["all_gather_bytes"] == rollout["expected_gather_bytes"] > 0, name
            assert rollout["fetched_ids"] == rollout["kept_partitioned_ids"], name
            assert rollout["decode_comm"]["total_calls"] == 0, f"{name}: no collective while decoding"
            assert rollout["zero_hooks_inside"] == 0 and not rollout["lockstep"], name


@pytest.mark.distributed
def test_touching_a_skipped_layer_inside_gather_once_fails_instead_of_gathering(ranks):
    """The engine's root hook is off too: without it a partitioned parameter cannot be all-gathered behind our back."""
    for result in ranks:
        assert result["full_forward_inside_once"] != "ran"
        assert result["full_forward_inside_once_comm"] == 0


@pytest.mark.distributed
def test_skipped_layers_are_never_fetched_nor_change_state(ranks):
    for result in ranks:
        for name, rollout in all_rollouts(result):
            assert rollout["skipped_probed"] == len(rollout["skipped_ids"]) > 0, name
            assert rollout["skipped_changed"] == {}, f"{name}: a skipped layer's parameter changed state"
            assert not set(rollout["fetched_ids"]) & set(rollout["skipped_ids"]), f"{name}: skipped layer fetched"
        for name, rollout in result["rollouts"].items():  # fresh engine: every skipped parameter partitioned
            assert rollout["skipped_entry"] == ["NOT_AVAILABLE"], name


@pytest.mark.distributed
def test_tokens_equal_a_pruned_copy_in_every_mode_with_and_without_layer0(ranks):
    for result in ranks:
        for plan in ("mid", "no_layer0"):
            expected = result["expected"][plan]["completions"]
            length = len(expected[0])
            assert result["pruned"][plan] == expected, "nested view == physically pruned model"
            once, streamed = result["rollouts"][f"once_{plan}"], result["rollouts"][f"streamed_{plan}"]
            assert once["completions"] == expected
            assert trimmed(streamed["completions"], length) == expected
            torch.testing.assert_close(torch.tensor(trimmed(streamed["logprobs"], length)),
                                       torch.tensor(once["logprobs"]), rtol=0, atol=1e-5)
            # Lockstep padding after every row stopped: pad tokens, masked.
            assert all(m[length:] == [0] * (len(m) - length) for m in streamed["completion_mask"])
            assert all(row[length:] == [0] * (len(row) - length) for row in streamed["completions"])
        assert result["rollouts"]["once_nocache"]["completions"] == result["expected"]["no_layer0"]["completions"]
        for name in ("auto", "auto_low_memory"):
            assert trimmed(result["rollouts"][name]["completions"], len(result["expected"]["mid"]["completions"][0])) \
                == result["expected"]["mid"]["completions"]


@pytest.mark.distributed
def test_ranks_finishing_at_very_different_lengths_complete_in_both_modes(ranks):
    r0, r1 = ranks
    assert len(r0["expected"]["mid"]["completions"][0]) == 1 and len(r1["expected"]["mid"]["completions"][0]) == MAX_NEW
    assert (r0["rollouts"]["once_mid"]["forwards"], r1["rollouts"]["once_mid"]["forwards"]) == (1, MAX_NEW)
    assert r0["rollouts"]["streamed_mid"]["forwards"] == r1["rollouts"]["streamed_mid"]["forwards"] == MAX_NEW


@pytest.mark.distributed
def test_streamed_decodes_with_hooks_on_in_lockstep(ranks):
    for result in ranks:
        for name in ("streamed_mid", "streamed_no_layer0"):
            rollout = result["rollouts"][name]
            assert rollout["lockstep"] and rollout["zero_hooks_inside"] > 0, name
            decode = rollout["decode_comm"]
            # Kept layers are streamed: every decode step moves about the kept bytes again.
            assert decode["all_gather_calls"] >= MAX_NEW, name
            assert decode["all_gather_bytes"] >= (MAX_NEW - 1) * rollout["kept_partitioned_bytes"], name
            assert decode["calls"]["all_reduce"] >= MAX_NEW, f"{name}: one lockstep all-reduce per step"


@pytest.mark.distributed
def test_auto_picks_once_with_room_and_streamed_when_any_rank_is_short(ranks):
    for result in ranks:
        assert not result["rollouts"]["auto"]["lockstep"]
        assert result["rollouts"]["auto_low_memory"]["lockstep"], "every rank follows the rank with least memory"
        assert [m.split(":")[0] for m in result["auto_log"]] == ["rollout.gather=auto -> once",
                                                                   "rollout.gather=auto -> streamed"]


@pytest.mark.distributed
def test_errors_inside_decoding_restore_the_engine(ranks):
    for result in ranks:
        failing = result["between_steps"][2:4]
        assert [r.get("error") for r in failing] == ["'failure inside decoding'"] * 2
        assert all(r["forwards"] == 3 for r in failing)
        # Training after them: covered bitwise by the step comparison (steps 4).


@pytest.mark.distributed
def test_plan_mismatch_raises_on_every_rank_in_streamed_mode(ranks):
    for result in ranks:
        assert "skip plans differ across ranks" in result["mismatch_streamed"]


@pytest.mark.distributed
def test_zero3_offload_same_tokens_and_training_step_unchanged_by_rollout(ranks):
    for result in ranks:
        offload, expected = result["offload"], result["expected"]["mid"]["completions"]
        assert offload["once"]["completions"] == expected
        assert trimmed(offload["streamed"]["completions"], len(expected[0])) == expected
        assert offload["once"]["decode_comm"]["total_calls"] == 0
        before, after = offload["steps"][2], offload["steps"][3]  # a once-rollout ran between them
        assert before["comm"] == after["comm"]
        assert after["loss"] == after["loss"] and abs(after["loss"]) < 100


@pytest.mark.distributed
def test_zero2_every_mode_only_checks_the_plan(ranks):
    for result in ranks:
        for mode, rollout in result["zero2"].items():
            assert rollout["context_comm"]["calls"] == {"all_reduce": 2}, mode
            assert rollout["decode_comm"]["total_calls"] == 0 and not rollout["lockstep"], mode
            assert rollout["completions"] == result["expected"]["mid"]["completions"], mode
