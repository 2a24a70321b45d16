"""Bad inputs found before anything trains or evaluates: one line `nested-reft: error: ...`, exit 2, and warnings
(one line each) for inputs that run but would silently do something other than asked."""
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nested_reft_ds.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY = str(REPO / "configs" / "tiny_zero3_2rank.yaml")


def error_lines(text: str, prefix: str = "nested-reft: error:") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "config key 'train.lr' has invalid value inf: expected a finite float"),
    ("algorithm.mask_high=.inf", "config key 'algorithm.mask_high' has invalid value inf: expected a finite float"),
    ("algorithm.clip_eps_high=nan", "config key 'algorithm.clip_eps_high' has invalid value 'nan': expected a finite"),
    ("train.seed=-1", "config key 'train.seed' has invalid value -1: expected an integer in [0, 4294967295]"),
    ("rollout.max_new_tokens=10000000000", "config key 'rollout.max_new_tokens' has invalid value 10000000000"),
])
def test_non_finite_and_absurd_config_values_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert message in str(caught.value)


def _cli(capsys, *args, env=None) -> tuple[int, str]:
    """`nested-reft ARGS` in this process (the real CLI entry and its error handling). The environment a bare
    process's init_distributed exports (RANK, MASTER_PORT, ...) is restored afterwards."""
    from nested_reft_ds import cli
    environ = dict(os.environ)
    os.environ.update(env or {})
    try:
        code = cli.main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(environ)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture()
def no_tokenizer_model(tiny_models, tmp_path):
    model = tmp_path / "no_tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_models["qwen2"] / name, model / name)
    return model


@pytest.mark.parametrize("case, overrides, env, message", [
    ("file output_dir", ["train.output_dir=FILE"], {},
     "config key 'train.output_dir' has invalid value 'FILE': it is a file, expected a directory"),
    ("output_dir under a file", ["train.output_dir=FILE/run"], {},
     "config key 'train.output_dir' has invalid value 'FILE/run': cannot write there (Not a directory)"),
    ("model without tokenizer", ["model.path=NO_TOKENIZER"], {}, "has no tokenizer"),
    ("protect_first > layers", ["skip.protect_first=10"], {},
     "config key 'skip.protect_first/protect_last' has invalid value (10, 1): the model has 4 layers"),
    ("max_new_tokens > positions", ["rollout.max_new_tokens=600"], {},
     "config key 'rollout.max_new_tokens' has invalid value 600: expected an integer < the model's "
     "max_position_embeddings=512"),
    ("mistyped hub id offline", ["data.source=gsm8k", "data.path=openai/gsm8kk"], {"HF_HUB_OFFLINE": "1"},
     "data path 'openai/gsm8kk' is neither a local file or directory nor a cached hub dataset"),
    ("fault rank past the world", [], {"NESTED_REFT_FAULT": "3:rl:0:raise"},
     "NESTED_REFT_FAULT='3:rl:0:raise': rank 3 in 3:rl:0:raise does not exist (world size 1"),
])
def test_bad_run_input_is_one_line_and_exit_2_before_training(capsys, tmp_path, no_tokenizer_model, case, overrides,
                                                              env, message):
    file = tmp_path / "a_file"
    file.write_text("not a directory")
    substitute = {"FILE": str(file), "NO_TOKENIZER": str(no_tokenizer_model)}
    overrides = [o.replace("FILE", substitute["FILE"]).replace("NO_TOKENIZER", substitute["NO_TOKENIZER"])
                 for o in overrides]
    message = message.replace("FILE", substitute["FILE"])
    if not any(o.startswith("train.output_dir=") for o in overrides):
        overrides.append(f"train.output_dir={tmp_path / 'run'}")
    code, output = _cli(capsys, "train", "--config", TINY, "--set", "train.cpu_threads=1",
                        *(a for o in overrides for a in ("--set", o)), env=env)
    errors = error_lines(output)
    assert code == 2 and len(errors) == 1 and message in errors[0], output[-3000:]
    assert "Traceback" not in output and "[sft 0]" not in output, "refused before any step"


def test_svamp_with_a_warm_up_is_refused_at_load_through_the_cli(tmp_path):
    """svamp has no worked solutions: with train.sft_steps > 0 (the shipped recipe's 600) the warm-up would crash in
    teacher_forced; refused up front, naming the source and the key, saying how to proceed."""
    if not (SHARED_DATA / "svamp").is_dir():
        pytest.skip("needs ../shared/data/svamp")
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", "train", "--config", TINY,
                           *(a for o in (f"train.output_dir={tmp_path / 'run'}", "train.cpu_threads=1",
                                         "data.source=svamp", f"data.path={SHARED_DATA / 'svamp'}", "data.split=test",
                                         "train.sft_steps=20") for a in ("--set", o))],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "config key 'train.sft_steps' has invalid value 20" in errors[0]
    assert "data.source='svamp'" in errors[0] and "set train.sft_steps=0" in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()
    assert time.monotonic() - began < 120


def test_eval_output_and_device_are_checked_before_the_eval(capsys, tiny_models, tmp_path):
    model = str(tiny_models["qwen2"])
    base = ["eval", "--model", model, "--benchmarks", "synthetic", "--limit", "2", "--samples", "1",
            "--max-new-tokens", "4"]
    code, output = _cli(capsys, *base, "--output", str(tmp_path / "missing" / "eval.json"))
    errors = error_lines(output, "nested-reft eval: error:")
    assert code == 2 and len(errors) == 1, output[-3000:]
    assert f"--output {str(tmp_path / 'missing' / 'eval.json')!r}: directory" in errors[0] and "does not exist" in errors[0]
    assert "pass@1" not in output, "nothing was evaluated"
    code, output = _cli(capsys, *base, "--output", str(tmp_path))
    assert code == 2 and "is a directory, expected a file path" in output, output[-3000:]
    import torch
    if not torch.cuda.is_available():
        code, output = _cli(capsys, *base, "--device", "cuda")
        errors = error_lines(output, "nested-reft eval: error:")
        assert code == 2 and len(errors) == 1 and "CUDA is not available" in errors[0], output[-3000:]


def test_model_input_warnings(tiny_models, bpe_model):
    """Silent cases warned once each: a skip ratio rounding to 0 layers, characters the embedded character tokenizer
    turns into <pad>, prompts longer than the context, references the verifier rejects, nothing held out."""
    from transformers import AutoConfig

    from nested_reft_ds.checks import check_model_inputs
    from nested_reft_ds.data import MathProblem
    from nested_reft_ds.model import load_tokenizer

    char_tokenizer, char_config = load_tokenizer(tiny_models["qwen2"]), AutoConfig.from_pretrained(tiny_models["qwen2"])
    plain = [MathProblem("What is 1 + 2?", "3", "test", "1 + 2 = 3")]
    cfg = load_config(TINY, ["skip.ratio=0.05", "data.prompt_template=plain"])
    warnings = check_model_inputs(cfg, char_config, char_tokenizer, plain, plain)
    assert warnings == ["skip.ratio=0.05 of 6 layers rounds to 0 skipped layers: every RL step samples from the "
                        "full model (plain ReFT)"]
    accented = [MathProblem("Zoë has 3 apples and buys 2 more. How many? " * 30, "5", "test", "3 + 2 = 5"),
                MathProblem("What is 1 + 2?", "1" * 1001, "test", "1 + 2 = 3")]
    warnings = check_model_inputs(load_config(TINY, ["data.prompt_template=plain", "rollout.max_new_tokens=48"]),
                                  char_config, char_tokenizer, accented, [])
    assert any(w.startswith("1 of 2 prompts (longest 1") and "exceed the model's max_position_embeddings=512" in w
               for w in warnings), warnings
    assert "1 characters in the problems are not in the tokenizer's vocabulary and become <pad>: 'ë'" in warnings
    assert any(w.startswith("1 of 2 reference answers are too long") for w in warnings), warnings
    assert "no held-out problems (data.eval_problems=0): held-out accuracy is n/a" in warnings
    # A byte-level BPE tokenizer represents every character: no warning for it.
    bpe_warnings = check_model_inputs(load_config(TINY), AutoConfig.from_pretrained(bpe_model),
                                      load_tokenizer(bpe_model), accented[:1], accented[:1])
    assert not any("vocabulary" in w for w in bpe_warnings), bpe_warnings


def test_a_state_without_fingerprint_warns_that_its_checks_are_off(tmp_path, caplog):
    from nested_reft_ds.fingerprint import read_fingerprint
    with caplog.at_level(logging.WARNING):
        assert read_fingerprint(tmp_path) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path} holds no nested_reft_fingerprint.json: the checks that it matches this run (model, tokenizer, "
        "seed, data, world size) are off"]
