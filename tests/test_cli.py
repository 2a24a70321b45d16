"""User-facing errors: a one-line message naming the problem, exit code 2, nothing half-started."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nested_reft_ds.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


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
    with pytest.raises(ConfigError, match="'train.sft_layer_drop_from' has invalid value 40.*LayerDrop would never"):
        load_config(None, ["train.sft_steps=40", "train.sft_layer_drop=0.5", "train.sft_layer_drop_from=40"])
    assert load_config(None, ["train.sft_steps=40", "train.sft_layer_drop=0.0",
                              "train.sft_layer_drop_from=40"]).train.sft_layer_drop_from == 40, "no LayerDrop: inert"


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
    assert rows[0][3:5] == ["1.00x", "1.00"] and float(rows[1][3].rstrip("x")) > 0
    assert float(rows[1][4]) == pytest.approx(float(rows[1][3].rstrip("x")) / 2, abs=0.01), "of ideal: ideal is 2x"
    assert all(float(row[5]) > 0 and 0 < float(row[6]) for row in rows), "bytes read per second and its fraction"
    assert "copy bandwidth" in proc.stdout


def test_decode_bytes_per_step_counts_kept_layers_head_and_kv_cache(tiny_models):
    from nested_reft_ds.model import load_model_and_tokenizer
    from nested_reft_ds.nested import SkipPlan
    from nested_reft_ds.recipes.bench import decode_bytes_per_step

    model, _ = load_model_and_tokenizer(tiny_models["qwen2"])  # 6 layers, hidden 64, 2 KV heads of 16, fp32
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    head = model.get_output_embeddings().weight.numel() * 4
    kv_per_token_layer = 2 * 2 * 16 * 4
    assert decode_bytes_per_step(model, SkipPlan(6), 1, 0) == 6 * layer + head
    assert decode_bytes_per_step(model, SkipPlan(6, (1, 4)), 3, 10) == 4 * layer + head + 3 * 10 * 4 * kv_per_token_layer


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


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path):
    """Only ConfigError is a user error: an exception from the code (here the documented fault hook, as a bug
    would raise) keeps its traceback, tagged with the rank, and exits 1."""
    import os
    env = dict(os.environ, NESTED_REFT_FAULT="0:sft:0:raise")
    proc = subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", "train", "--config",
                           "configs/tiny_zero3_2rank.yaml", "--set", f"train.output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "[rank 0] Traceback (most recent call last):" in proc.stderr
    assert "[rank 0] nested_reft_ds.faults.InjectedFault: injected fault at sft step 0 on rank 0" in proc.stderr
    assert "nested-reft: error:" not in proc.stderr


def test_malformed_fault_spec_is_a_config_error():
    from nested_reft_ds.faults import parse_faults
    assert parse_faults("1:rl:3:raise, 0:checkpoint:4:kill") == [(1, "rl", 3, "raise"), (0, "checkpoint", 4, "kill")]
    with pytest.raises(ConfigError, match="RANK:POINT:STEP:KIND"):
        parse_faults("1:rollout:3:raise")


def _train(capsys, out, *overrides) -> tuple[int, str, str]:
    """`nested-reft train` in this process; the environment a bare process's init_distributed exports (RANK,
    MASTER_PORT, ...) is restored afterwards, so later subprocesses do not inherit a used port."""
    import os
    from nested_reft_ds.recipes import train
    environ = dict(os.environ)
    try:
        code = train.main(["--config", str(REPO / "configs" / "tiny_zero3_2rank.yaml"),
                           "--set", f"train.output_dir={out}", *(a for o in overrides for a in ("--set", o))])
    finally:
        os.environ.clear()
        os.environ.update(environ)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_stale_base_model_and_incompatible_resume_are_refused_compatible_resume_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _train(capsys, out)
    assert code == 0, err
    # model.* changed: the built base_model no longer matches (one line naming the key and both values).
    code, _, err = _train(capsys, out, "model.num_layers=6")
    errors = [line for line in err.splitlines() if line.startswith("nested-reft: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "base_model" in errors[0] and "model.num_layers was 4, now 6" in errors[0]
    # the rollout layout changed: the RL checkpoint refuses to resume.
    code, _, err = _train(capsys, out, "rollout.group_size=4")
    errors = [line for line in err.splitlines() if line.startswith("nested-reft: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "cannot resume from" in errors[0] and "rollout.group_size was 2, now 4" in errors[0]
    # safe changes (more steps, another lr, logging): resumed, and trains the new step only.
    code, _, err = _train(capsys, out, "train.steps=3", "train.lr=1e-3", "logging.log_every=2")
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "rl"] == [0, 1, 2]
