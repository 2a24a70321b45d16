"""Fail-stop and crash-safe resume under the real launcher: `deepspeed --num_gpus 2 --module nested_reft_ds.train`.

Faults come from the documented hook NESTED_REFT_FAULT=RANK:POINT:STEP:KIND (nested_reft_ds/faults.py). One
uninterrupted run is the reference; a second run is crashed three ways and rerun with the same command each time:
  (a) rank 1 raises during RL step 3       -> the job exits non-zero within 60 s, one rank-tagged traceback
  (c) rank 1 is killed while checkpoint 4 is written -> `latest` stays at rl_step2; the rerun resumes from it
  (b) rank 0 is killed (SIGKILL) in RL step 5 -> the job ends; the rerun resumes from rl_step4 and finishes
The finished run must equal the reference bitwise (CPU, fp32, deterministic): per-step records and weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from nested_reft_ds.engine import consolidated_state_dict
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed

SETTINGS = ["train.sft_steps=4", "train.steps=6", "train.save_every=2", "train.keep_checkpoints=2",
            "logging.log_every=1", "logging.eval_every=0", "logging.tensorboard=true"]
RECORDED = ("loss", "reward_mean", "skipped_layers", "ess", "kl_behavior_k3", "completion_length", "grad_norm")


def launch(out: Path, fault: str | None = None, extra: tuple[str, ...] = ()) -> dict:
    """Run the training module on 2 ranks; returns rc, output, wall time and when the fault was first reported."""
    port = free_port()
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module", "nested_reft_ds.train",
               "--config", "configs/tiny_zero3_2rank.yaml", "--deepspeed", "ds_configs/zero3.json"]
    for setting in (*SETTINGS, f"train.output_dir={out}", *extra):
        command += ["--set", setting]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("NESTED_REFT_FAULT", None)
    if fault:
        env["NESTED_REFT_FAULT"] = fault
    began = time.monotonic()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    fault_seen: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not fault_seen and ("InjectedFault" in line or "exits with return code" in line):
                fault_seen.append(time.monotonic())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        rc = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("launch hung:\n" + "".join(lines[-80:]))
    reader.join()
    ended = time.monotonic()
    return {"rc": rc, "output": "".join(lines), "seconds": ended - began,
            "after_fault": ended - fault_seen[0] if fault_seen else None,
            "shm_left": sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))}


def rl_records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("failstop")
    reference = launch(base / "reference", extra=("train.keep_checkpoints=0",))
    assert reference["rc"] == 0, reference["output"][-6000:]
    crashed = base / "crashed"
    raised = launch(crashed, fault="1:rl:3:raise")
    latest_after_raise = (crashed / "checkpoints" / "latest").read_text()
    killed_in_checkpoint = launch(crashed, fault="1:checkpoint:4:kill")
    latest_after_checkpoint_kill = (crashed / "checkpoints" / "latest").read_text()
    killed_in_step = launch(crashed, fault="0:rl:5:kill")
    latest_after_step_kill = (crashed / "checkpoints" / "latest").read_text()
    finished = launch(crashed)
    return {"base": base, "reference": reference, "raised": raised, "latest_after_raise": latest_after_raise,
            "killed_in_checkpoint": killed_in_checkpoint, "latest_after_checkpoint_kill": latest_after_checkpoint_kill,
            "killed_in_step": killed_in_step, "latest_after_step_kill": latest_after_step_kill, "finished": finished}


def test_a_raise_on_one_rank_ends_the_job_with_one_traceback(runs):
    raised = runs["raised"]
    assert raised["rc"] != 0
    assert raised["after_fault"] is not None and raised["after_fault"] < 60, raised["output"][-4000:]
    output = raised["output"]
    assert output.count("[rank 1] Traceback (most recent call last):") == 1, output[-4000:]
    assert "[rank 1] nested_reft_ds.faults.InjectedFault: injected fault at rl step 3 on rank 1" in output
    assert "[rank 0] Traceback" not in output, "the other rank reports one line, not a second traceback"
    assert runs["latest_after_raise"] == "rl_step2"


def test_no_launch_leaves_shared_memory_behind(runs):
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm file per rank and never unlinks it; `init_distributed`
    removes the names once every rank has mapped them, so no job, finished or killed, leaves them behind."""
    launches = ("reference", "raised", "killed_in_checkpoint", "killed_in_step", "finished")
    assert {name: runs[name]["shm_left"] for name in launches} == {name: [] for name in launches}


def test_c_a_kill_while_a_checkpoint_is_written_leaves_latest_at_the_previous_one(runs):
    assert runs["killed_in_checkpoint"]["rc"] != 0
    assert "resume at sft 4, rl 2" in runs["killed_in_checkpoint"]["output"], "the rerun resumed from rl_step2"
    assert runs["latest_after_checkpoint_kill"] == "rl_step2"


def test_b_a_killed_rank_ends_the_job_and_the_rerun_resumes(runs):
    killed = runs["killed_in_step"]
    assert killed["rc"] != 0
    assert "resume at sft 4, rl 2" in killed["output"]
    assert runs["latest_after_step_kill"] == "rl_step4"
    finished = runs["finished"]
    assert finished["rc"] == 0, finished["output"][-4000:]
    assert "resume at sft 4, rl 4" in finished["output"]


def test_resumed_run_equals_the_uninterrupted_one_bitwise(runs):
    base = runs["base"]
    expected = [r for r in rl_records(base / "reference") if r["phase"] == "rl"]
    got = [r for r in rl_records(base / "crashed") if r["phase"] == "rl"]
    assert [r["step"] for r in got] == list(range(6))
    for want, have in zip(expected, got):
        assert {k: have[k] for k in RECORDED} == {k: want[k] for k in RECORDED}, want["step"]
    reference = consolidated_state_dict(base / "reference" / "checkpoints", "rl_step6")
    resumed = consolidated_state_dict(base / "crashed" / "checkpoints", "rl_step6")
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


def test_metrics_hold_each_step_once_after_crashes(runs):
    records = rl_records(runs["base"] / "crashed")
    keys = [(r["phase"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert sorted(k for k in keys if k[0] == "sft") == [("sft", s) for s in range(4)]
    assert sorted(k for k in keys if k[0] == "rl") == [("rl", s) for s in range(6)]


def test_checkpoints_cover_the_warm_up_and_old_ones_are_pruned(runs):
    base = runs["base"]
    tags = lambda out: sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())  # noqa: E731
    assert tags(base / "reference") == ["rl_step2", "rl_step4", "rl_step6", "sft_step2", "sft_step4"]
    assert tags(base / "crashed") == ["rl_step4", "rl_step6"], "keep_checkpoints=2, the uncommitted one removed"
    assert (base / "crashed" / "checkpoints" / "latest").read_text() == "rl_step6"


class GatedStore(torch.distributed.Store):
    """A real HashStore whose `check` waits at a gate, to hold the watchdog inside a store call."""

    def __init__(self):
        super().__init__()
        self.inner = torch.distributed.HashStore()
        self.entered, self.gate = threading.Event(), threading.Event()

    def check(self, keys):
        self.entered.set()
        self.gate.wait(30)
        return self.inner.check(keys)


def test_stopping_the_watchdog_waits_until_it_has_left_its_store_call(monkeypatch):
    # A watchdog left inside a C++ store call at interpreter exit aborts a successful run with -6.
    from nested_reft_ds.engine import failstop
    monkeypatch.setattr(failstop, "POLL_SECONDS", 0.01)
    store = GatedStore()
    watchdog = failstop._Watchdog(store, rank=1)
    watchdog.start()
    assert store.entered.wait(10)
    stopper = threading.Thread(target=watchdog.stop)
    stopper.start()
    stopper.join(0.3)
    assert stopper.is_alive(), "stop() returned while the watchdog was still inside store.check"
    store.gate.set()
    stopper.join(10)
    assert not stopper.is_alive() and not watchdog.is_alive()
