"""Nothing lost, nothing silent in a run directory (`train.output_dir`): one owner at a time, an earlier run never
restarted over or mixed, damaged checkpoints passed over, a full disk named, a diverged run stopped before a commit.

The directory logic (`nested_reft_ds.run_dir`, the resume choice in `engine/checkpoint.py`) is tested on plain files;
each case a user meets runs through `nested-reft train` on the tiny 4-layer config (in this process where one run at
a time is enough, as separate processes for two concurrent runs; tests/test_launch_signals.py covers the 2-rank
deepspeed launcher)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from nested_reft_ds.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.cpu_threads=1", "train.save_every=1", "logging.progress_bar=false"]


# ----------------------------------------------------------------------------------------------- the lock

def test_a_second_owner_is_refused_with_the_holder_named(tmp_path):
    from nested_reft_ds import run_dir
    lock = run_dir.acquire(tmp_path / "run", job="rendezvous 127.0.0.1:1234")
    try:
        record = json.loads((tmp_path / "run" / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        # flock belongs to an open file: a second open in this very process is a second owner.
        with pytest.raises(ConfigError, match=rf"is in use by another run: PID {os.getpid()} on host "
                                              rf"{socket.gethostname()} \(rendezvous 127.0.0.1:1234"):
            run_dir.acquire(tmp_path / "run", wait_for_record=0)
    finally:
        lock.release()
    run_dir.acquire(tmp_path / "run").release()  # released: free again


def test_a_dead_holders_lock_is_taken_over_and_its_record_rewritten(tmp_path):
    from nested_reft_ds import run_dir
    script = ("import os, sys; from nested_reft_ds import run_dir; run_dir.acquire(sys.argv[1]); "
              "os.kill(os.getpid(), 9)")  # dies holding it, as a killed job does
    dead = subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=120)
    assert dead.returncode == -signal.SIGKILL
    lock = run_dir.acquire(tmp_path)
    try:
        assert lock.previous is not None and lock.previous["pid"] != os.getpid()
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_output_dir_that_is_a_file_is_one_line(tmp_path):
    from nested_reft_ds import run_dir
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="'train.output_dir' has invalid value .*it is a file"):
        run_dir.acquire(tmp_path / "file")


def test_move_aside_keeps_the_lock_and_earlier_runs(tmp_path):
    from nested_reft_ds import run_dir
    (tmp_path / "metrics.jsonl").write_text('{"phase": "rl", "step": 0}\n')
    (tmp_path / "checkpoints" / "rl_step1").mkdir(parents=True)
    assert run_dir.earlier_run(tmp_path) == ["metrics.jsonl (1 records)", "checkpoints (rl_step1)"]
    lock = run_dir.acquire(tmp_path)
    first = run_dir.move_aside(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    second = run_dir.move_aside(tmp_path)
    lock.release()
    assert first != second and first.parent == second.parent == tmp_path / "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "previous"]
    assert (first / "checkpoints" / "rl_step1").is_dir() and (second / "metrics.jsonl").is_file()
    assert run_dir.earlier_run(tmp_path) == []


# ------------------------------------------------------------------------------- choosing what to resume

def test_resume_candidates_follow_the_commit_record(tmp_path):
    from nested_reft_ds.engine.checkpoint import _commit, resume_candidates
    for tag in ("sft_step2", "rl_step1", "rl_step2"):
        (tmp_path / tag).mkdir()
        _commit(tmp_path, tag)
    assert resume_candidates(tmp_path) == (["rl_step2", "rl_step1", "sft_step2"], None)
    (tmp_path / "latest").write_text("")
    tags, note = resume_candidates(tmp_path)
    assert tags == ["rl_step2", "rl_step1", "sft_step2"] and "'latest' is empty" in note.replace(str(tmp_path) + "/", "")
    (tmp_path / "latest").unlink()
    assert "is missing" in resume_candidates(tmp_path)[1]
    (tmp_path / "committed_tags").unlink()  # no record at all: which tags were complete is unknown
    with pytest.raises(ConfigError, match=r"holds checkpoints \(sft_step2, rl_step1, rl_step2\) but no record"):
        resume_candidates(tmp_path)


def test_damaged_files_are_found_without_loading_tensors(tmp_path):
    import torch
    from nested_reft_ds.engine.checkpoint import damaged_files
    tag = tmp_path / "rl_step1"
    tag.mkdir()
    torch.save({"module": {"w": torch.ones(64)}}, tag / "mp_rank_00_model_states.pt")
    torch.save({"state": 1}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"state": 1}, tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (tag / "nested_reft_fingerprint.json").write_text('{"train.seed": 1}')
    assert damaged_files(tag, 0) == [] and damaged_files(tag, 1) == []
    shard = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert damaged_files(tag, 0) == [], "rank 1's shard is rank 1's to check"
    assert [p.split(" (")[0] for p in damaged_files(tag, 1)] == [str(shard)]
    (tag / "nested_reft_fingerprint.json").write_text('{"train.se')
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert damaged_files(tag, 0) == [f"{tag / 'mp_rank_00_model_states.pt'} (empty)",
                                     f"{tag / 'nested_reft_fingerprint.json'} (unreadable: "
                                     "Unterminated string starting at: line 1 column 2 (char 1))"]
    assert zipfile.is_zipfile(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


# ------------------------------------------------------------------------------------- through the CLI

def train(capsys, out: Path, *args: str, settings: tuple[str, ...] = ()) -> tuple[int, str]:
    """`nested-reft train` on the tiny config in this process; returns (exit code, stderr). The environment a bare
    process's init_distributed exports (RANK, MASTER_PORT, ...) is restored afterwards."""
    from nested_reft_ds.recipes import train as recipe
    environ = dict(os.environ)
    try:
        code = recipe.main(["--config", str(REPO / "configs" / "tiny_zero3_2rank.yaml"),
                            *(a for s in (*TINY, f"train.output_dir={out}", *settings) for a in ("--set", s)), *args])
    finally:
        os.environ.clear()
        os.environ.update(environ)
    return code, capsys.readouterr().err


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("nested-reft: error:")]


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("nested-reft: warning:")]


def records(out: Path, phase: str = "rl") -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["phase"] == phase]


def test_deleted_latest_resumes_from_the_newest_committed_tag(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, out)[0] == 0
    (out / "checkpoints" / "latest").unlink()
    code, err = train(capsys, out, settings=("train.steps=3",))
    assert code == 0, err
    assert warnings(err) == [f"nested-reft: warning: '{out / 'checkpoints' / 'latest'}' is missing; resuming from "
                             "the newest committed checkpoint, rl_step2"]
    assert records(out, "sft") == [0, 1] and records(out) == [0, 1, 2], "history kept, each step once"
    assert (out / "checkpoints" / "latest").read_text() == "rl_step3"


def test_resume_none_refuses_an_earlier_run_and_overwrite_moves_it_aside(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, out)[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, err = train(capsys, out, "--resume", "none")
    assert code == 2 and len(errors(err)) == 1, err
    assert "holds an earlier run (metrics.jsonl (6 records); checkpoints (rl_step1, rl_step2, sft_step2))" in err
    assert "--overwrite" in errors(err)[0] and (out / "metrics.jsonl").read_text() == before, "nothing touched"
    code, err = train(capsys, out, "--resume", "none", "--overwrite", settings=("train.steps=1",))
    assert code == 0, err
    (moved,) = (out / "previous").iterdir()
    assert warnings(err) == [f"nested-reft: warning: moved the earlier run in '{out}' aside to '{moved}'"]
    assert (moved / "metrics.jsonl").read_text() == before and (moved / "checkpoints" / "latest").read_text() == "rl_step2"
    assert records(out) == [0] and (out / "checkpoints" / "latest").read_text() == "rl_step1", "not mixed"


def test_resume_tag_picks_an_older_committed_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, out, settings=("train.keep_checkpoints=0",))[0] == 0
    code, err = train(capsys, out, "--resume", "rl_step1", settings=("train.keep_checkpoints=0",))
    assert code == 0, err
    assert "resuming from rl_step1, older than rl_step2" in warnings(err)[0]
    assert records(out) == [0, 1]
    code, err = train(capsys, out, "--resume", "rl_step7")
    assert code == 2 and "--resume rl_step7: no committed checkpoint 'rl_step7'" in errors(err)[0], err


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, out)[0] == 0
    states = out / "checkpoints" / "rl_step2" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:4096])  # truncated
    code, err = train(capsys, out)
    assert code == 0, err
    (line,) = warnings(err)
    assert line.startswith(f"nested-reft: warning: checkpoint file {states} (truncated or corrupt") and \
        line.endswith("cannot be loaded; falling back to rl_step1")
    assert records(out) == [0, 1], "the step after the fallback point is logged again, once"
    # Every checkpoint damaged: one line, exit 2.
    for tag in ("sft_step2", "rl_step1", "rl_step2"):
        (out / "checkpoints" / tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    code, err = train(capsys, out)
    assert code == 2 and len(errors(err)) == 1, err
    assert errors(err)[0].startswith(f"nested-reft: error: no checkpoint in '{out / 'checkpoints'}' can be loaded")
    assert "Traceback" not in err


def test_a_non_finite_loss_stops_the_warm_up_before_a_commit(tmp_path, capsys):
    import torch
    from nested_reft_ds.engine import consolidated_state_dict
    out = tmp_path / "run"
    code, err = train(capsys, out, settings=("train.sft_lr=1e30", "train.grad_clip=0", "train.sft_steps=6"))
    assert code == 2 and len(errors(err)) == 1, err
    assert errors(err)[0].startswith("nested-reft: error: non-finite sft_loss nan at sft step 1: training diverged")
    assert "Traceback" not in err
    tags = [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()]
    assert tags == ["sft_step1"], "nothing after the diverged step"
    for tag in tags:
        assert all(torch.isfinite(v).all() for v in consolidated_state_dict(out / "checkpoints", tag).values())
    assert records(out, "sft") == [0] and records(out) == []


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_named_and_leaves_no_partial_checkpoint(tmp_path, capsys):
    """A 900 KiB tmpfs holds the base model (175 KB) and one checkpoint (550 KB), not a second one."""
    out = tmp_path / "small"
    if not _mount_tmpfs(out, "900k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        code, err = train(capsys, out)
        assert code == 2 and len(errors(err)) == 1, err
        assert errors(err) == [f"nested-reft: error: no space left on device writing {out / 'checkpoints' / 'sft_step2'}"]
        assert "Traceback" not in err
        checkpoints = out / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["committed_tags", "latest", "sft_step1"]
        assert not [p for p in out.rglob("*.tmp")]
        used = subprocess.run(["df", "--output=used", str(out)], capture_output=True, text=True).stdout
        code, err = train(capsys, out)  # the rerun meets the same full disk, and adds nothing to it
        assert code == 2 and "no space left on device" in errors(err)[0], err
        assert subprocess.run(["df", "--output=used", str(out)], capture_output=True, text=True).stdout == used
        assert sorted(p.name for p in checkpoints.iterdir()) == ["committed_tags", "latest", "sft_step1"]
    finally:
        subprocess.run(["umount", "--lazy", str(out)], check=False)  # files the failed run left open


def test_an_injected_full_disk_is_named_the_same_way(tmp_path, capsys, monkeypatch):
    """Where no tmpfs can be mounted: ENOSPC raised while rank 0 writes checkpoint sft_step2 (faults.py)."""
    out = tmp_path / "run"
    monkeypatch.setenv("NESTED_REFT_FAULT", "0:checkpoint:2:enospc")
    code, err = train(capsys, out)
    assert errors(err) == [f"nested-reft: error: no space left on device writing {out / 'checkpoints' / 'sft_step2'}"]
    assert code == 2 and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["committed_tags", "latest", "sft_step1"]
    assert not [p for p in out.rglob("*.tmp")]


# -------------------------------------------------------------------------------- two concurrent runs

PRELOADED = """import sys, time
from pathlib import Path
from nested_reft_ds import cli
from nested_reft_ds.recipes import train  # imported before the wait, so the run starts the moment it is let go
gate = Path(sys.argv[1])
while not gate.is_file() or not gate.read_text().strip():
    time.sleep(0.05)
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_second_run_on_the_same_directory_stops_at_once_naming_the_first(tmp_path):
    out = tmp_path / "run"
    command = ["train", "--config", str(REPO / "configs" / "tiny_zero3_2rank.yaml"),
               *(a for s in (*TINY, f"train.output_dir={out}") for a in ("--set", s))]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    start = tmp_path / "start"
    first = subprocess.Popen([sys.executable, "-c", PRELOADED, str(start), *command, "--set", "train.steps=60"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen([sys.executable, "-c", PRELOADED, str(out / ".lock"), *command, "--set", "train.lr=1e-3"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        start.write_text("go")  # the first run takes the lock; the second is let go once the lock names it
        _, second_err = second.communicate(timeout=600)
        second_done = time.monotonic()
        first_out, first_err = first.communicate(timeout=600)
        first_done = time.monotonic()
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    assert second.returncode == 2, second_err[-3000:]
    (line,) = errors(second_err)
    assert f"is in use by another run: PID {first.pid} on host {socket.gethostname()}" in line
    assert "Traceback" not in second_err
    assert first_done - second_done > 1, "the second run stopped while the first was still training"
    assert first.returncode == 0, first_err[-3000:]
    assert records(out) == list(range(60)) and records(out, "sft") == [0, 1], "the first run's records, each once"
    assert (out / "checkpoints" / "latest").read_text() == "rl_step60"
    from nested_reft_ds.engine.internals import load_model_states
    for tag in (p for p in (out / "checkpoints").iterdir() if p.is_dir()):
        assert load_model_states(tag / "mp_rank_00_model_states.pt")["config"]["train"]["lr"] == 2e-4, tag.name
