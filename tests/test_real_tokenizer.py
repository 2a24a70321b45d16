"""A real tokenizer, as users bring one: byte-level BPE with Qwen's special tokens, a chat template and two EOS ids
in generation_config.json (`conftest.build_bpe_model`). Train, eval and export run end to end with it; prompts,
stop tokens, `skip_special_tokens` decoding and answer extraction are checked on it."""
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from nested_reft_ds.data.templates import format_prompt
from nested_reft_ds.model import load_model_and_tokenizer
from nested_reft_ds.nested import SkipPlan
from nested_reft_ds.reward import extract_answer, score_batch
from nested_reft_ds.rollout import encode_prompts, generate, stop_token_ids

REPO = Path(__file__).resolve().parents[1]


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "nested_reft_ds.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=REPO, **kwargs)


def test_prompts_use_the_chat_template_and_its_special_tokens(bpe_model):
    _, tokenizer = load_model_and_tokenizer(bpe_model)
    prompt = format_prompt("What is 2 + 3?", tokenizer)  # "auto": the tokenizer has a chat template
    assert prompt == ("<|im_start|>user\nWhat is 2 + 3?\nPut the final answer in \\boxed{}.<|im_end|>\n"
                      "<|im_start|>assistant\n")
    ids, mask = encode_prompts(tokenizer, [prompt, "1 + 1"], "cpu")
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    row = ids[0][mask[0].bool()].tolist()
    assert row[0] == start and row.count(start) == 2 and row.count(end) == 1, "special tokens are single ids"
    assert tokenizer.decode(row) == prompt
    assert mask[1].tolist()[:2] == [0, 0] and ids[1, 0] == tokenizer.pad_token_id, "left padded with <|endoftext|>"


def test_generation_stops_at_either_eos_id_and_decodes_without_special_tokens(bpe_model):
    model, tokenizer = load_model_and_tokenizer(bpe_model)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.eos_token_id == im_end and stop_token_ids(model, im_end) == [im_end, endoftext]
    # With the final norm zeroed every logit is 0, so greedy decoding takes id 0, <|endoftext|>: the EOS that only
    # generation_config.json names. It must end the row after one token.
    with torch.no_grad():
        model.model.norm.weight.zero_()
    ids, mask = encode_prompts(tokenizer, [format_prompt("What is 2 + 3?", tokenizer)], "cpu")
    rollout = generate(model, ids, mask, SkipPlan(4), max_new_tokens=8, greedy=True, eos_token_id=im_end,
                       pad_token_id=tokenizer.pad_token_id)
    assert rollout.completions.tolist() == [[endoftext]] and rollout.completion_mask.tolist() == [[1]]
    # A completion's special tokens are dropped when decoded; its answer is then extracted and verified.
    completion = tokenizer("The sum is 5, so \\boxed{5}<|im_end|>", add_special_tokens=False).input_ids
    assert completion[-1] == im_end
    texts = tokenizer.batch_decode([completion, completion[:-1] + [endoftext]], skip_special_tokens=True)
    assert texts == ["The sum is 5, so \\boxed{5}"] * 2
    assert extract_answer(texts[0]) == "5" and score_batch(texts, ["5", "6"]) == [1.0, 0.0]


def test_train_eval_and_export_run_end_to_end(bpe_run, bpe_model, tmp_path):
    out, proc = bpe_run
    output = proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "rl"] == [0, 1]
    assert all(r["completion_length"] > 0 for r in records if r["phase"] == "rl")
    assert "warning: no held-out problems (data.eval_problems=0): held-out accuracy is n/a" in output
    assert "summary: heldout_accuracy_before n/a, heldout_accuracy_after n/a" in output, output[-2000:]
    hf = tmp_path / "hf"
    exported = cli("export", "--checkpoint-dir", out / "checkpoints", "--output", hf)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == [2, 0], "both EOS ids kept"
    assert (hf / "tokenizer.json").read_text() == (bpe_model / "tokenizer.json").read_text()
    model, tokenizer = load_model_and_tokenizer(hf)
    assert tokenizer.chat_template is not None and stop_token_ids(model, tokenizer.eos_token_id) == [2, 0]
    evaluated = cli("eval", "--model", hf, "--benchmarks", "synthetic", "--limit", "4", "--samples", "2",
                    "--max-new-tokens", "8", "--output", tmp_path / "eval.json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    sample = report["benchmarks"]["synthetic"]["problems"][0]
    assert sample["prompt"].startswith("<|im_start|>user\n")
    assert not any("<|" in s["completion"] for s in sample["samples"]), "special tokens are not in the text"


def _export(out: Path, target: Path, *extra, **kwargs):
    return cli("export", "--checkpoint-dir", out / "checkpoints", "--output", target, *extra, **kwargs)


def test_export_refuses_an_existing_output_unless_told_to_overwrite(bpe_run, tmp_path):
    out, _ = bpe_run
    file = tmp_path / "model.bin"
    file.write_text("keep me")
    proc = _export(out, file)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nested-reft: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert f"--output {str(file)!r} exists (a file); pass --overwrite to replace it" in errors[0]
    assert "wrote" not in proc.stdout and file.read_text() == "keep me"
    existing = tmp_path / "hf"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    proc = _export(out, existing)
    assert proc.returncode == 2 and "exists (a non-empty directory)" in proc.stderr, proc.stderr[-3000:]
    assert [p.name for p in existing.iterdir()] == ["notes.txt"], "nothing mixed in"
    proc = _export(out, existing, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (existing / "model.safetensors").is_file() and not (existing / "notes.txt").exists(), "replaced whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.bin"], "no temporary directory left"


def test_a_failed_export_write_is_an_error_and_leaves_nothing_half_written(bpe_run, tmp_path):
    """The write fails for real: the export process may write files of at most 4 KiB (RLIMIT_FSIZE; Python ignores
    SIGXFSZ, so the write raises EFBIG), as a full disk would stop it part way."""
    out, _ = bpe_run
    previous = tmp_path / "hf"
    assert _export(out, previous).returncode == 0
    before = {p.name: p.read_bytes() for p in previous.iterdir()}

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    for target, extra in ((tmp_path / "new", ()), (previous, ("--overwrite",))):
        proc = _export(out, target, *extra, preexec_fn=small_files)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("nested-reft: error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
        assert f"could not write the export to {str(target)!r}: " in errors[0] and "File too large" in errors[0]
        assert "wrote" not in proc.stdout
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before, "the old export is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "no temporary directory left"
