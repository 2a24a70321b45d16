"""Resume safety: fingerprints of a checkpoint / built base model, compared key by key, refused in one line."""
import json
import subprocess
import sys

import pytest

from nested_reft_ds.config import ConfigError, ModelConfig, load_config
from nested_reft_ds.data import problems_from_config
from nested_reft_ds.fingerprint import (FILENAME, base_model_fingerprint, check_base_model, check_compatible,
                                        differences, model_fingerprint, read_fingerprint, run_fingerprint,
                                        write_fingerprint)

HF = {"model_type": "qwen2", "num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 256,
      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97, "tie_word_embeddings": True,
      "rope_theta": 10000.0, "max_position_embeddings": 512}


def fingerprint(overrides=(), world=1, ds_config=None, phase=None, problems=None):
    cfg = load_config(None, list(overrides))
    return run_fingerprint(cfg, model_fingerprint(HF), world, ds_config=ds_config, problems=problems, phase=phase)


def test_model_fingerprint_holds_the_shape_and_the_tokenizer_vocabulary():
    from transformers import Qwen2Config

    from nested_reft_ds.model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen2Config(**{k: v for k, v in HF.items() if k != "model_type"})
    fp = model_fingerprint(config, tokenizer)
    assert fp["model.model_type"] == "qwen2" and fp["model.num_hidden_layers"] == 6
    assert fp["model.num_key_value_heads"] == 2 and fp["model.vocab_size"] == 97
    assert fp["tokenizer.vocab_size"] == len(tokenizer) and fp["tokenizer.eos_token_id"] == 1
    assert fp["tokenizer.pad_token_id"] == 0
    assert "model.rope_theta" not in fp  # not a shape: safe to change
    assert model_fingerprint(config.to_dict(), build_char_tokenizer()) == fp  # dict or config, stable hash
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    assert model_fingerprint(config, other)["tokenizer.vocab_sha256"] != fp["tokenizer.vocab_sha256"]


@pytest.mark.parametrize("safe", ["train.steps=99", "train.lr=1e-3", "train.save_every=7", "train.keep_checkpoints=9",
                                  "train.cpu_threads=2", "train.micro_batch_size=4", "logging.log_every=5",
                                  "logging.eval_every=3", "logging.tensorboard=false", "data.eval_problems=7",
                                  "rollout.temperature=0.7", "rollout.max_new_tokens=5", "skip.ratio=0.4",
                                  "algorithm.correction=seq_mis", "algorithm.kl_coef=0.1", "reward.timeout=1"])
def test_safe_changes_leave_the_run_fingerprint_alone(safe):
    assert differences(fingerprint(), fingerprint([safe])) == []


@pytest.mark.parametrize("override, key, old, new", [
    ("train.seed=7", "train.seed", 1234, 7),
    ("train.sft_steps=5", "train.sft_steps", 0, 5),
    ("rollout.prompts_per_step=4", "rollout.prompts_per_step", 16, 4),
    ("rollout.group_size=4", "rollout.group_size", 8, 4),
    ("skip.strategy=learned", "skip.strategy", "random", "learned"),
    ("data.num_problems=10", "data.num_problems", 4000, 10),
    ("data.solution_error_rate=0.3", "data.solution_error_rate", 0.0, 0.3),
    ("train.zero_stage=2", "train.zero_stage", 0, 2),
])
def test_unsafe_changes_are_named_with_both_values(override, key, old, new):
    assert (key, old, new) in differences(fingerprint(), fingerprint([override]))


def test_world_size_matters_only_when_zero_partitions_state():
    stage = lambda s: {"zero_optimization": {"stage": s}, "bf16": {"enabled": False}, "optimizer": {"type": "AdamW"}}
    assert differences(fingerprint(world=1, ds_config=stage(0)), fingerprint(world=4, ds_config=stage(0))) == []
    assert differences(fingerprint(world=2, ds_config=stage(3)), fingerprint(world=4, ds_config=stage(3))) == \
        [("world_size", 2, 4)]
    assert ("deepspeed.zero_optimization.stage", 0, 2) in differences(fingerprint(ds_config=stage(0)),
                                                                       fingerprint(ds_config=stage(2)))


def test_an_sft_checkpoint_does_not_pin_the_rl_layout_but_its_own_batch_size():
    sft = fingerprint(phase="sft")
    # RL may start from a warm-up checkpoint with another group size, as long as the warm-up batch is unchanged...
    assert differences(sft, fingerprint(["rollout.group_size=4", "rollout.prompts_per_step=32"])) == []
    # ...but not once RL state exists, nor with a warm-up batch that moves the warm-up's position in the data.
    assert differences(fingerprint(phase="rl"), fingerprint(["rollout.group_size=4"])) == \
        [("rollout.group_size", 8, 4)]
    assert differences(sft, fingerprint(["rollout.group_size=4"])) == [("sft.sequences_per_step", 128, 64)]


def test_the_training_problems_are_hashed_in_order():
    cfg = load_config(None, ["data.num_problems=20"])
    train, _ = problems_from_config(cfg.data, cfg.train.seed)
    fp = fingerprint(["data.num_problems=20"], problems=train)
    assert fp["data.train_problems"].startswith("20 problems, sha256 ")
    assert differences(fp, fingerprint(["data.num_problems=20"], problems=list(reversed(train)))) == \
        [("data.train_problems", fp["data.train_problems"],
          fingerprint(problems=list(reversed(train)))["data.train_problems"])]


def test_refusal_is_one_line_naming_every_key_and_both_values():
    saved = {**fingerprint(phase="rl"), "model.num_hidden_layers": 6}
    current = {**fingerprint(["rollout.group_size=4"]), "model.num_hidden_layers": 12}
    with pytest.raises(ConfigError) as err:
        check_compatible(saved, current, "cannot resume from runs/x/checkpoints/rl_step80")
    assert str(err.value) == ("cannot resume from runs/x/checkpoints/rl_step80: model.num_hidden_layers was 6, now 12; "
                              "rollout.group_size was 8, now 4 (start afresh with --resume none or another "
                              "train.output_dir)")
    check_compatible(None, current, "no fingerprint recorded: nothing to check")
    # Keys on one side only (a fingerprint from an older version) are not compared.
    check_compatible({"model.num_hidden_layers": 12}, {**current, "new.key": 1}, "subset")


def test_fingerprint_file_round_trip_is_atomic(tmp_path):
    assert read_fingerprint(tmp_path) is None
    write_fingerprint(tmp_path, {"a": 1})
    write_fingerprint(tmp_path, {"a": 2, "b": [1, 2]})
    assert read_fingerprint(tmp_path) == {"a": 2, "b": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]  # no temp file left


def test_a_stale_base_model_is_refused(tmp_path):
    built = ModelConfig(hidden_size=64, intermediate_size=256)
    base = tmp_path / "base_model"
    base.mkdir()
    write_fingerprint(base, base_model_fingerprint(built, 1234))
    check_base_model(base, built, 1234)
    check_base_model(base, ModelConfig(hidden_size=64, intermediate_size=256, attn_implementation="eager"), 1234)
    with pytest.raises(ConfigError) as err:
        check_base_model(base, ModelConfig(), 1234)  # the defaults: hidden 128, intermediate 384
    message = str(err.value)
    assert "\n" not in message and "model.hidden_size was 64, now 128" in message
    assert "model.intermediate_size was 256, now 384" in message
    assert f"delete '{base}' or choose another train.output_dir" in message
    with pytest.raises(ConfigError, match="train.seed was 1234, now 5"):
        check_base_model(base, built, 5)


def test_a_base_model_built_before_fingerprints_is_checked_by_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF))
    check_base_model(tmp_path, ModelConfig(hidden_size=64, intermediate_size=256), 99)  # seed unknown: unchecked
    with pytest.raises(ConfigError, match="model.num_layers was 6, now 12"):
        check_base_model(tmp_path, ModelConfig(hidden_size=64, intermediate_size=256, num_layers=12), 99)

