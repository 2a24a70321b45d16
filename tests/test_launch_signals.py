"""A SIGINT sent only to the `deepspeed` command of a 2-rank job (not to its process group, as a scheduler or `kill`
does) ends every rank and releases the run directory, which the next run then takes.

In a single-node run the `deepspeed` command has no signal handler: it dies at once and leaves
deepspeed.launcher.launch and the ranks running. Each rank's watchdog watches the launcher and the command that
started it (`engine.failstop.launcher_processes`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import free_port


REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def describe(processes: list[psutil.Process]) -> list[str]:
    """What each process is doing, for a failure message: pid, state, CPU time and command line."""
    lines = []
    for process in processes:
        try:
            lines.append(f"{process.pid} {process.status()} cpu {sum(process.cpu_times()[:2]):.1f}s "
                         f"{' '.join(process.cmdline())[:160]}")
        except psutil.Error as error:
            lines.append(f"{process.pid}: {error}")
    return lines


def test_sigint_to_the_launcher_alone_ends_both_ranks_and_frees_the_directory(tmp_path):
    out = tmp_path / "run"
    port = free_port()
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module", "nested_reft_ds.train",
               "--config", "configs/tiny_zero3_2rank.yaml", "--deepspeed", "ds_configs/zero3.json"]
    for setting in ("train.sft_steps=100000", "train.steps=1", "train.cpu_threads=1", f"train.output_dir={out}"):
        command += ["--set", setting]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # Its own group, so only our kill reaches it; SIGINT at its default disposition whatever this process inherited
    # (an ignored SIGINT survives exec, and the launcher would then outlive the signal this test sends).
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and launcher.poll() is None:
            lock = out / ".lock"
            if lock.is_file() and lock.read_text().strip():
                break
            time.sleep(0.5)
        assert launcher.poll() is None, "the job ended before it took its run directory"
        holder = json.loads((out / ".lock").read_text())
        assert f"rendezvous 127.0.0.1:{port}" in holder["job"]
        descendants = psutil.Process(launcher.pid).children(recursive=True)
        ranks = [p for p in descendants if "nested_reft_ds.train" in " ".join(p.cmdline())
                 and "deepspeed.launcher" not in " ".join(p.cmdline())]
        assert len(ranks) == 2 and holder["pid"] in [p.pid for p in ranks]
        time.sleep(3)  # well into the warm-up
        os.kill(launcher.pid, signal.SIGINT)
        gone, alive = psutil.wait_procs([psutil.Process(launcher.pid), *descendants], timeout=90)
        assert not alive, f"still running 90 s after the launcher's SIGINT: {describe(alive)}"
        launcher.wait(timeout=5)
    finally:
        for process in psutil.Process().children(recursive=True):
            if process.pid == launcher.pid or launcher.pid in [p.pid for p in process.parents()]:
                process.kill()
        if launcher.poll() is None:
            launcher.kill()
        for process in psutil.process_iter():  # ranks re-parented away from the launcher
            try:
                if f"train.output_dir={out}" in " ".join(process.cmdline()):
                    process.kill()
            except psutil.Error:
                pass
    # The next run takes the directory over: the lock is free. Rank 0 either left through its watchdog (os._exit:
    # its record stays, and the next holder finds it) or, when rank 1 left first, through the error its next
    # collective raised, which releases the lock and clears the record on the way out. Which one is a race.
    from nested_reft_ds import run_dir
    taken = run_dir.acquire(out)
    try:
        assert taken.previous is None or taken.previous["pid"] == holder["pid"], taken.previous
    finally:
        taken.release()
