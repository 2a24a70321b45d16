"""DeepSpeed JSON: "auto" filled from the experiment config; explicit disagreements named with their numbers."""
import json
from pathlib import Path

import pytest

from nested_reft_ds.config import ConfigError, load_config
from nested_reft_ds.engine.ds_config import batch_layout, fill_ds_config, load_ds_config

DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


def test_auto_values_follow_rollout_and_micro_batch():
    cfg = load_config(None, ["rollout.prompts_per_step=16", "rollout.group_size=8", "train.micro_batch_size=16",
                             "train.lr=2e-5", "train.grad_clip=0.5"])
    filled = fill_ds_config(json.loads((DS_CONFIGS / "zero3.json").read_text()), cfg, world_size=4)
    # 16 prompts / 4 ranks * 8 samples = 32 sequences per rank = 16 per micro-batch x 2 accumulation steps.
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["train_batch_size"]) == (16, 2, 128)
    assert filled["optimizer"]["params"]["lr"] == 2e-5 and filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is False  # CPU
    assert filled["zero_optimization"]["stage"] == 3


def test_explicit_batch_sizes_that_disagree_show_the_numbers():
    cfg = load_config(None, ["rollout.prompts_per_step=8", "rollout.group_size=4", "train.micro_batch_size=4"])
    user = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8}
    with pytest.raises(ConfigError, match=r"micro_batch_size_per_gpu=4 x gradient_accumulation_steps=8 x "
                                          r"world_size=2 \(train_batch_size=64\).*= 32 sequences"):
        fill_ds_config(user, cfg, world_size=2)


def test_layout_errors_name_the_knob():
    cfg = load_config(None, ["rollout.prompts_per_step=3"])
    with pytest.raises(ConfigError, match="rollout.prompts_per_step"):
        batch_layout(cfg, 2)
    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.group_size=3", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        batch_layout(cfg, 1)


def test_hybrid_engine_block_is_refused_with_what_we_use_instead():
    cfg = load_config(None)
    with pytest.raises(ConfigError, match="gather-once"):
        fill_ds_config({"hybrid_engine": {"enabled": True}}, cfg, 1)


def test_every_shipped_ds_config_fills():
    cfg = load_config(None)
    for path in sorted(DS_CONFIGS.glob("*.json")):
        filled = fill_ds_config(load_ds_config(path, cfg), cfg, 1)
        assert "auto" not in json.dumps(filled), path


@pytest.mark.parametrize("env, cores, requested, expected", [
    ({}, 2, 2, 2),                             # a single process may use both cores
    ({"LOCAL_SIZE": "2"}, 2, 2, 1),            # deepspeed launcher, 2 ranks on 2 cores: one thread each
    ({"LOCAL_WORLD_SIZE": "4"}, 16, 8, 4),     # torchrun, 4 ranks on 16 cores
    ({"LOCAL_WORLD_SIZE": "4"}, 2, 1, 1),      # never below one thread
])
def test_cpu_threads_are_capped_by_the_ranks_sharing_the_machine(monkeypatch, env, cores, requested, expected):
    from nested_reft_ds.engine import cpu_threads_per_rank

    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert cpu_threads_per_rank(requested) == expected


def test_builtin_optimizer_is_torch_adamw_on_a_gpu_host_too(monkeypatch):
    """No JIT-built CUDA op, and a warm-up made on a GPU resumes on a CPU host with the same optimizer."""
    import torch

    cfg = load_config(None, ["train.precision=fp32"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    filled = fill_ds_config(load_ds_config(None, cfg), cfg, 1)
    assert filled["optimizer"]["type"] == "AdamW" and filled["optimizer"]["params"]["torch_adam"] is True
    # A user's JSON on a GPU host keeps DeepSpeed's choice (FusedAdam) unless it asks for torch's.
    user = fill_ds_config(json.loads((DS_CONFIGS / "zero2.json").read_text()), cfg, 1)
    assert "torch_adam" not in user["optimizer"].get("params", {})
