"""`nested-reft bench rollout`: one real 2-rank ZeRO-3 run at a tiny size prints every mode x skip ratio row, the
R1-R3 lines, and the training-step collectives after each rollout mode."""
import re
import subprocess
import sys

import pytest

from nested_reft_ds.recipes.bench_rollout import MODES

RATIOS = ("0.00", "0.25", "0.50")
COLUMNS = ("mode", "skip", "layers", "tok/s", "x hf", "wall s", "gather s", "all-gathers", "MB gathered", "other coll.",
           "gath. MB", "peak MB")


@pytest.fixture(scope="module")
def output():
    proc = subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", "bench", "rollout", "--layers", "4",
                           "--hidden-size", "64", "--batch-size", "2", "--new-tokens", "4", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table(output):
    """{(mode, skip): {column: value}}"""
    header = next(line for line in output.splitlines() if line.startswith("mode "))
    assert header.split() == " ".join(COLUMNS).split(), header
    rows = [line.split() for line in output.splitlines() if line.split()[:1] and line.split()[0] in MODES]
    assert all(len(row) == len(COLUMNS) for row in rows), rows
    return {(row[0], row[1]): dict(zip(COLUMNS, row)) for row in rows}


@pytest.mark.distributed
def test_table_has_every_mode_and_ratio_with_gather_once_a_single_all_gather(output):
    rows = table(output)
    assert set(rows) == {(mode, ratio) for mode in MODES for ratio in RATIOS}
    for mode in MODES:
        assert [rows[(mode, r)]["layers"] for r in RATIOS] == ["4", "3", "2"]
    for ratio in RATIOS:
        once, naive, hf = rows[("once", ratio)], rows[("naive", ratio)], rows[("hf", ratio)]
        assert once["all-gathers"] == "1", "gather-once: one coalesced all-gather per rollout"
        assert once["other coll."] == "2", "and only the plan check's two all-reduces besides"
        assert int(naive["all-gathers"]) >= 4, "naive re-gathers on every decode step"
        assert 0 < float(once["gather s"]) < float(once["wall s"]) and naive["gather s"] == "-"
        assert hf["x hf"] == "1.00"
        for row in (once, naive, hf):
            assert float(row["tok/s"]) > 0 and float(row["gath. MB"]) > 0 and float(row["peak MB"]) >= 0


@pytest.mark.distributed
def test_r3_bytes_gathered_equal_the_kept_bytes_exactly(output):
    r3 = re.findall(r"^R3 \(skip (\S+)\): (\d+) bytes gathered / \((\d+) kept-layer \+ (\d+) embeddings/norm/head "
                    r"bytes not yet on the rank\) = 1\.000 \(meets target\); \d+ kept bytes already resident",
                    output, re.M)
    assert [row[0] for row in r3] == list(RATIOS), output
    for _, gathered, layers, outside in r3:
        assert int(gathered) == int(layers) + int(outside) > 0
    assert int(r3[0][2]) == 2 * int(r3[2][2]), "half the layers skipped: half the layer bytes"


@pytest.mark.distributed
def test_r1_and_r2_lines_are_printed_with_their_targets(output):
    assert len(re.findall(r"^R1 \(once, skip 0\.(25|50)\): .* target >= 0\.9: \d+\.\d{3} \((meets|BELOW) target\)$",
                          output, re.M)) == 2
    assert len(re.findall(r"^R2 \(skip 0\.\d\d\): gather-once / engine\.module\.generate tok/s, target >= 5\.0: ",
                          output, re.M)) == 3


@pytest.mark.distributed
def test_skip_aware_rollouts_leave_the_next_training_step_unchanged(output):
    steps = dict(re.findall(r"^training step after (.+?)\s*: (.*)$", output, re.M))
    assert set(steps) == {"another training step", *(f"a {mode} rollout" for mode in MODES)}
    assert steps["a once rollout"] == steps["a streamed rollout"] == steps["another training step"]
