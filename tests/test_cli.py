"""User-facing errors: a one-line message naming the problem, exit code 2, nothing half-started."""
import subprocess
import sys

import pytest

from nested_reft_ds.config import ConfigError, load_config


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["--set", "rollout.gruop_size=8"], "unknown config key 'rollout.gruop_size': allowed keys in 'rollout' are"),
    (["--set", "rollout.gather=everything"], "config key 'rollout.gather' has invalid value 'everything': "
                                             "expected one of 'once', 'streamed', 'auto'"),
    (["--set", "skip.ratio=1.5"], "config key 'skip.ratio' has invalid value 1.5"),
    (["--set", "model.path=/nonexistent/model"], "model.path"),
    (["--set", "data.source=json", "--set", "data.path=EMPTY"], "empty"),
    (["--config", "/nonexistent.yaml"], "does not exist"),
    (["--deepspeed", "/nonexistent.json"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = [a.replace("EMPTY", str(empty)) for a in args]
    proc = run_cli("train", "--set", f"train.output_dir={tmp_path / 'run'}", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("nested-reft: error:")]
    assert len(error_lines) == 1 and message.lower() in error_lines[0].lower(), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_overrides_are_typed_and_validated():
    cfg = load_config(None, ["rollout.group_size=4", "train.lr=1e-5", "algorithm.is_cap=null",
                             "skip.strategy=contiguous"])
    assert cfg.rollout.group_size == 4 and cfg.train.lr == 1e-5 and cfg.algorithm.is_cap is None
    with pytest.raises(ConfigError, match="'rollout.group_size' has invalid value 1"):
        load_config(None, ["rollout.group_size=1"])
    with pytest.raises(ConfigError, match="section.key"):
        load_config(None, ["group_size=4"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["data.source=gsm8k"])
    assert load_config(None, ["train.steps=0", "train.sft_steps=5"]).train.steps == 0, "SFT-only runs"
    with pytest.raises(ConfigError, match="'train.steps' has invalid value 0"):
        load_config(None, ["train.steps=0", "train.sft_steps=0"])
    with pytest.raises(ConfigError, match="'train.sft_layer_drop' has invalid value 1.0"):
        load_config(None, ["train.sft_layer_drop=1.0"])


def test_every_yaml_recipe_in_configs_loads():
    from pathlib import Path
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("kind", [[], ["nested"]], ids=["bench", "bench-nested"])
def test_bench_prints_a_row_per_ratio_with_speedups(kind):
    """`nested-reft bench` is `nested-reft bench nested` (the ZeRO-3 one, `bench rollout`: test_bench_rollout.py)."""
    proc = run_cli("bench", *kind, "--layers", "4", "--hidden-size", "32", "--ratios", "0,0.5", "--batch-size", "4",
                   "--new-tokens", "8", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip().startswith(("0.00", "0.50"))]
    assert [row[0] for row in rows] == ["0.00", "0.50"]
    assert [row[1] for row in rows] == ["4", "2"], "layers run: all 4, then 2 with half skipped"
    assert rows[0][3:] == ["1.00x", "1.00"] and float(rows[1][3].rstrip("x")) > 0
    assert float(rows[1][4]) == pytest.approx(float(rows[1][3].rstrip("x")) / 2, abs=0.01), "of ideal: ideal is 2x"


def test_bench_rollout_rejects_unknown_modes():
    proc = run_cli("bench", "rollout", "--modes", "once,fast")
    assert proc.returncode == 2 and "unknown mode(s) ['fast']" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("kind, ratios, message", [
    ([], "0,0.25,x", "--ratios: 'x' in '0,0.25,x' is not a number"),
    (["rollout"], "0,1.0", "--ratios: skip ratio 1.0 in '0,1.0' is outside [0, 1)"),
])
def test_bench_rejects_bad_ratios_before_building_anything(kind, ratios, message):
    proc = run_cli("bench", *kind, "--ratios", ratios)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
