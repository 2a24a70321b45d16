"""KL to a frozen reference (algorithm.kl_coef > 0), single process: the real `train.run` on a tiny model.

The reference is the policy as RL starts (here: after a 4-step SFT warm-up), so its KL is 0 at RL step 0 and
positive once the policy has moved; a run resumed from an RL checkpoint restores that same reference and
replays the next step exactly. Config validation for settings that used to fail only at the first RL step.
"""
import json
import math
import os
import shutil

import pytest

from nested_reft_ds.config import ConfigError, load_config

TINY = ["model.hidden_size=32", "model.num_layers=4", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_problems=16", "data.eval_problems=2", "data.min_operand=0",
        "data.max_operand=1", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8",
        # 8 sequences per step, micro-batches of 4: the reference runs per micro-batch, twice per step.
        "train.micro_batch_size=4", "train.sft_steps=4", "train.sft_lr=0.01", "train.steps=2", "train.save_every=1",
        "train.lr=1e-2", "train.cpu_threads=1", "algorithm.kl_coef=0.1", "logging.tensorboard=false",
        "logging.progress_bar=false"]
KEYS = ("loss", "kl_ref", "reward_mean", "completion_length", "ratio_tok_max", "ess", "pg_loss", "accept",
        "skipped_layers")


def run_recorded(overrides: list[str], resume: str) -> list[dict]:
    """train.run in this process; returns what each RL step reported."""
    import nested_reft_ds.recipes.train as train

    records, real_step = [], train.rl_step

    def recording(*args, **kwargs):
        metrics = real_step(*args, **kwargs)
        records.append({key: metrics[key] for key in KEYS} | {"step": args[1]})
        return metrics

    train.rl_step = recording
    try:
        train.run(load_config(None, TINY + overrides), None, resume)
    finally:
        train.rl_step = real_step
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A continuous 2-step run, then a resume from its step-1 checkpoint in a fresh directory."""
    from nested_reft_ds import engine as ds

    environ = dict(os.environ)  # init_distributed exports RANK/WORLD_SIZE/...: keep them out of later tests
    root = tmp_path_factory.mktemp("reference_kl")
    try:
        continuous = run_recorded([f"train.output_dir={root}/a"], "none")
        resumed_dir = root / "b" / "checkpoints"
        shutil.copytree(root / "a" / "base_model", root / "b" / "base_model")
        shutil.copytree(root / "a" / "checkpoints" / "rl_step1", resumed_dir / "rl_step1")
        (resumed_dir / "latest").write_text("rl_step1")
        resumed = run_recorded([f"train.output_dir={root}/b"], "auto")
        # The same checkpoint without its reference copy: the reference cannot be rebuilt at step 1.
        shutil.copytree(root / "b" / "base_model", root / "c" / "base_model")
        shutil.copytree(root / "a" / "checkpoints" / "rl_step1", root / "c" / "checkpoints" / "rl_step1",
                        ignore=shutil.ignore_patterns("reference"))
        (root / "c" / "checkpoints" / "latest").write_text("rl_step1")
        with pytest.raises(ConfigError) as missing:
            run_recorded([f"train.output_dir={root}/c"], "auto")
        yield root, continuous, resumed, str(missing.value)
    finally:
        ds.shutdown_distributed()
        os.environ.clear()
        os.environ.update(environ)


def test_kl_run_trains_and_logs_kl_to_reference(runs):
    _, continuous, _, _ = runs
    assert [r["step"] for r in continuous] == [0, 1]
    for record in continuous:
        assert math.isfinite(record["loss"]) and math.isfinite(record["kl_ref"]) and record["kl_ref"] >= 0
    # Step 0: the reference is a copy of the policy, so the k3 estimate is exactly 0; after one update it is not.
    assert continuous[0]["kl_ref"] == pytest.approx(0.0, abs=1e-7)
    assert continuous[1]["kl_ref"] > 1e-4, "the policy moved away from the reference in step 0"


def test_kl_to_reference_reaches_the_metrics_log(runs):
    root, continuous, _, _ = runs
    logged = [json.loads(line) for line in (root / "a" / "metrics.jsonl").read_text().splitlines()]
    rl = [record for record in logged if record["phase"] == "rl"]
    assert [record["kl_ref"] for record in rl] == [record["kl_ref"] for record in continuous]


def test_every_rl_checkpoint_carries_the_reference(runs):
    root, _, _, _ = runs
    checkpoints = root / "a" / "checkpoints"
    assert not (checkpoints / "sft_step4" / "reference").exists(), "no reference before RL starts"
    for tag in ("rl_step1", "rl_step2"):
        assert (checkpoints / tag / "reference" / "model_states.pt").is_file(), tag


def test_resume_restores_the_reference_and_replays_the_step(runs):
    _, continuous, resumed, _ = runs
    (replayed,) = resumed
    assert replayed["step"] == 1
    expected = continuous[1]
    assert replayed["skipped_layers"] == expected["skipped_layers"]
    for key in KEYS[:-1]:
        assert replayed[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    # A reference rebuilt from the resumed weights would give KL 0 here.
    assert replayed["kl_ref"] > 1e-4


def test_resume_without_saved_reference_names_the_key(runs):
    _, _, _, message = runs
    assert "algorithm.kl_coef" in message and "holds no KL reference" in message


@pytest.mark.parametrize("overrides, key, value", [
    (["algorithm.self_normalize=true"], "algorithm.self_normalize", "True"),
    (["algorithm.self_normalize=true", "algorithm.correction=token_mis"], "algorithm.self_normalize", "True"),
    (["algorithm.self_normalize=true", "algorithm.correction=seq_is", "rollout.group_size=4",
      "train.micro_batch_size=6"], "train.micro_batch_size", "6"),
])
def test_settings_that_would_fail_mid_step_fail_at_load(overrides, key, value):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert f"'{key}' has invalid value {value}" in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["algorithm.self_normalize=true", "algorithm.correction=seq_is", "rollout.group_size=4", "train.micro_batch_size=8"],
    # Larger than a rank's whole batch: the micro-batch is the whole batch, which holds whole groups.
    ["algorithm.self_normalize=true", "algorithm.correction=seq_is", "rollout.group_size=4",
     "rollout.prompts_per_step=2", "train.micro_batch_size=9"],
])
def test_self_normalize_accepts_whole_group_micro_batches(overrides):
    assert load_config(None, overrides).algorithm.self_normalize


def test_kl_in_reward_and_kept_token_normaliser_through_train_run(tmp_path):
    """algorithm.kl_in_reward folds each sequence's summed k1 into its reward before the advantages, from a
    pi_prox / reference pass before the update; normalize_over=kept_tokens counts only what token_mis keeps."""
    import nested_reft_ds.recipes.train as train
    from nested_reft_ds import engine as ds

    environ = dict(os.environ)
    records, real_step = [], train.rl_step

    def recording(*args, **kwargs):
        metrics = real_step(*args, **kwargs)
        records.append(metrics)
        return metrics

    train.rl_step = recording
    try:
        train.run(load_config(None, TINY + [f"train.output_dir={tmp_path}", "algorithm.kl_in_reward=true",
                                            "algorithm.correction=token_mis", "algorithm.normalize_over=kept_tokens",
                                            "train.save_every=0"]), None, "none")
    finally:
        train.rl_step = real_step
        ds.shutdown_distributed()
        os.environ.clear()
        os.environ.update(environ)
    first, second = records
    # The reference is the policy at RL step 0: no penalty there; the policy has moved by step 1 (k1 is a
    # one-sample estimate: its sign per batch is noise, its expectation the KL).
    assert abs(first["kl_penalty_mean"]) < 1e-6 and abs(second["kl_penalty_mean"]) > 1e-5
    # Mean over sequences of kl_coef x summed k1 = kl_coef x (token-mean k1) x (tokens per sequence).
    assert second["kl_penalty_mean"] == pytest.approx(0.1 * second["kl_ref"] * second["completion_length"], rel=1e-3)
    assert "clip_frac" not in second and 0 < second["accept"] <= 1
