"""`python -m nested_reft_ds.train` under torchrun (the SLURM `srun torchrun` path): a real 2-process ZeRO-3 run,
rank and world size read from torchrun's environment, both ranks on the same skip plans and losses."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def test_train_module_runs_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    logs = tmp_path / "logs"  # one stdout file per rank: the ranks' lines would interleave on a shared pipe
    command = [str(torchrun if torchrun.exists() else "torchrun"), "--standalone", "--nproc_per_node", "2",
               "--log-dir", str(logs), "--redirects", "3",
               "-m", "nested_reft_ds.train", "--config", "configs/tiny_zero3_2rank.yaml",
               "--deepspeed", "ds_configs/zero3.json", "--resume", "none",
               "--set", f"train.output_dir={tmp_path / 'run'}", "--set", "logging.all_ranks=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    rank_logs = {rank: "".join(p.read_text() for p in logs.rglob(f"{rank}/std*.log")) for rank in (0, 1)}
    output = proc.stdout + proc.stderr + rank_logs[0] + rank_logs[1]
    assert proc.returncode == 0, output[-6000:]
    assert "world 2 | ZeRO-3" in rank_logs[0]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["phase"] == "rl"] == [0, 1]
    # logging.all_ranks: rank 1 echoes its own (rank-reduced) step lines; they must match rank 0's exactly.
    rank0 = [line for line in rank_logs[0].splitlines() if re.match(r"\[rl \d+\]", line)]
    rank1 = [line.removeprefix("[rank 1] ") for line in rank_logs[1].splitlines() if line.startswith("[rank 1] [rl ")]
    strip_timing = lambda line: re.sub(r"\| roll .*?\|.*?\|", "|", line)  # noqa: E731 (per-rank timings differ)
    assert len(rank0) == 2 and list(map(strip_timing, rank1)) == list(map(strip_timing, rank0))
