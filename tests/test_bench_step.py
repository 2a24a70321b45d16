"""`nested-reft bench step` end to end on a tiny workload: every variant runs the real rl_step, the savings act."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_step_runs_every_variant_and_the_savings_show_in_the_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", "bench", "step", "--layers", "4",
                           "--hidden-size", "32", "--prompts", "2", "--group-size", "4", "--max-new-tokens", "96",
                           "--micro-batch-size", "4", "--repeats", "1", "--ratios", "0,0.5", "--vocab", "4096",
                           "--workdir", str(tmp_path), "--set", "train.seed=7"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        match = re.match(r"\s*(0\.\d\d)\s+(none|compact|prefill|bucket|packed|all)\s+(.*)", line)
        if match:
            rows[(match[1], match[2])] = match[3].split()
    assert len(rows) == 12
    for ratio in ("0.00", "0.50"):
        decode_none, decode_compact = float(rows[(ratio, "none")][4]), float(rows[(ratio, "compact")][4])
        assert decode_compact < decode_none  # compaction computed fewer finished rows
        assert float(rows[(ratio, "bucket")][5]) >= 1.0  # positions run never fall below the real tokens
        # Packed, each prompt is encoded once for its 4 samples: fewer positions than real (prompt-repeating) tokens.
        assert float(rows[(ratio, "packed")][5]) < min(1.0, float(rows[(ratio, "none")][5]))
    assert "completion_logprobs" in proc.stdout and "ratio" in proc.stdout
