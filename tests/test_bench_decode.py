"""`nested-reft bench decode` end to end on a tiny workload: a row per engine and skip ratio plus the transformers
anchor, with the counts that do not depend on the machine pinned."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_decode_prints_a_row_per_engine_ratio_and_anchor():
    proc = subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", "bench", "decode", "--layers", "4",
                           "--hidden-size", "32", "--batch-size", "3", "--prompt-length", "5", "--new-tokens", "9",
                           "--repeats", "1", "--ratios", "0,0.5", "--anchors", "hf-dynamic"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        match = re.match(r"(static|reference|hf-dynamic)\s+(\d\.\d\d)\s+(.*)", line)
        if match:
            rows[(match[1], match[2])] = match[3].split()
    assert set(rows) == {("static", "0.00"), ("static", "0.50"), ("reference", "0.00"), ("reference", "0.50"),
                         ("hf-dynamic", "0.00")}
    assert [rows[("static", r)][0] for r in ("0.00", "0.50")] == ["4", "2"]  # layers run
    # host reads per forward (9: the prefill and 8 decode steps): the static engine reads once per 8 decode steps,
    # the reference engine once per forward
    assert rows[("static", "0.00")][3] == f"{1 / 9:.3f}" and float(rows[("reference", "0.00")][3]) == 1.0
    assert float(rows[("static", "0.00")][2]) < float(rows[("reference", "0.00")][2])  # fewer aten calls
    assert float(rows[("reference", "0.00")][5]) == 1.0  # x reference of the reference itself
