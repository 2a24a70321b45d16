"""Shipped recipes (configs/*.yaml) and DeepSpeed JSONs (ds_configs/*.json) agree for the world size each recipe
names in its `# world_size: N` / `# ds_config: PATH` header lines, as filled by our code and as DeepSpeed
itself validates them (unknown keys, batch arithmetic)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from unittest import mock

import pytest

from nested_reft_ds.config import ConfigError, load_config
from nested_reft_ds.engine.ds_config import batch_layout, fill_ds_config, load_ds_config, use_bf16

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
LEAD_OWNED = {"tiny_arith.yaml"}  # the embedded default: single process, no header lines required


def recipe_meta(path: Path) -> tuple[int, Path | None]:
    """(world_size, ds_config) from a recipe's header comment lines; (1, None) where a line is absent."""
    text = path.read_text()
    world = re.search(r"^# world_size: (\d+)\s*$", text, re.M)
    ds = re.search(r"^# ds_config: (\S+)\s*$", text, re.M)
    return int(world.group(1)) if world else 1, REPO / ds.group(1) if ds else None


class _DataParallel:
    """The slice of DeepSpeed's `mpu` interface that DeepSpeedConfig reads: the data-parallel world size."""

    def __init__(self, world: int):
        self.world = world

    def get_data_parallel_world_size(self) -> int:
        return self.world


def deepspeed_validates(filled: dict, world: int):
    """DeepSpeed's own parse of a filled config for `world` ranks, without a process group."""
    import deepspeed.runtime.config as ds_runtime_config

    with mock.patch.object(ds_runtime_config.dist, "get_rank", lambda *a, **k: 0):
        return ds_runtime_config.DeepSpeedConfig(filled, mpu=_DataParallel(world))


def test_shipped_files_exist():
    names = {p.name for p in RECIPES}
    assert {"qwen2.5_1.5b_gsm8k_8gpu.yaml", "qwen2.5_7b_math_32gpu.yaml", "qwen2.5_7b_math_8gpu_offload.yaml",
            "tiny_zero3_2rank.yaml"} <= names
    assert {p.name for p in DS_CONFIGS} >= {"zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.name not in LEAD_OWNED], ids=lambda p: p.name)
def test_recipe_names_its_world_size_and_ds_config(recipe):
    text = recipe.read_text()
    assert re.search(r"^# world_size: [1-9]\d*\s*$", text, re.M), f"{recipe.name}: no '# world_size: N' line"
    assert re.search(r"^# ds_config: ds_configs/\S+\.json\s*$", text, re.M), f"{recipe.name}: no '# ds_config:'"
    _, ds_path = recipe_meta(recipe)
    assert ds_path.is_file(), f"{recipe.name} names a missing ds_config {ds_path}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_fills_its_ds_config_for_its_world_size(recipe):
    world, ds_path = recipe_meta(recipe)
    cfg = load_config(recipe)
    filled = fill_ds_config(load_ds_config(ds_path, cfg), cfg, world)
    micro, accum, train_batch = batch_layout(cfg, world)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["train_batch_size"]) == (micro, accum, train_batch)
    # One optimizer step per rollout: the whole rollout batch is trained on, split evenly over the ranks.
    assert train_batch == micro * accum * world == cfg.rollout.prompts_per_step * cfg.rollout.group_size
    assert micro <= cfg.train.micro_batch_size
    assert filled["bf16"]["enabled"] is use_bf16(cfg)
    assert filled["gradient_clipping"] == cfg.train.grad_clip
    ds = deepspeed_validates(filled, world)
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == \
        (train_batch, micro, accum)


@pytest.mark.parametrize("ds_path", DS_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_ds_config_combination_fills(recipe, ds_path):
    """Any shipped recipe can be paired with any shipped ds_config (`--deepspeed`) at its world size."""
    world, _ = recipe_meta(recipe)
    cfg = load_config(recipe)
    filled = fill_ds_config(load_ds_config(ds_path, cfg), cfg, world)
    assert filled["train_batch_size"] == cfg.rollout.prompts_per_step * cfg.rollout.group_size
    assert filled["zero_optimization"]["stage"] == json.loads(ds_path.read_text())["zero_optimization"]["stage"]


@pytest.mark.parametrize("ds_path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_configs_leave_the_config_driven_fields_auto(ds_path):
    """Batch sizes, clipping, precision, lr and weight decay come from the experiment config, never the JSON."""
    ds = json.loads(ds_path.read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto", (ds_path.name, key)
    assert ds["bf16"]["enabled"] == "auto"
    assert ds["optimizer"]["params"]["lr"] == ds["optimizer"]["params"]["weight_decay"] == "auto"
    assert "hybrid_engine" not in ds and "fp16" not in ds


def test_zero3_offload_moves_optimizer_and_parameters_to_cpu():
    zero = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())["zero_optimization"]
    assert zero["stage"] == 3
    for key in ("offload_optimizer", "offload_param"):
        assert zero[key] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize("precision, expected", [("bf16", True), ("fp32", False)])
def test_bf16_auto_follows_train_precision(precision, expected):
    cfg = load_config(REPO / "configs" / "qwen2.5_1.5b_gsm8k_8gpu.yaml", [f"train.precision={precision}"])
    for ds_path in DS_CONFIGS:
        assert fill_ds_config(load_ds_config(ds_path, cfg), cfg, 8)["bf16"]["enabled"] is expected


def test_wrong_explicit_train_batch_size_is_rejected_with_the_three_numbers(tmp_path):
    recipe = REPO / "configs" / "qwen2.5_7b_math_32gpu.yaml"
    world, ds_path = recipe_meta(recipe)
    cfg = load_config(recipe)
    micro, accum, _ = batch_layout(cfg, world)  # 4 x 16 x 32 = 2048
    bad = json.loads(ds_path.read_text())
    bad["train_batch_size"] = 1024
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError) as err:
        fill_ds_config(load_ds_config(path, cfg), cfg, world)
    message = str(err.value)
    for number in (f"micro={micro}", f"accum={accum}", f"world_size={world}", "train_batch_size=1024"):
        assert number in message, message


def test_recipe_scaled_to_a_world_size_that_does_not_divide_is_rejected():
    cfg = load_config(REPO / "configs" / "qwen2.5_1.5b_gsm8k_8gpu.yaml")  # 64 prompts per step
    with pytest.raises(ConfigError, match="prompts_per_step.*world size 48"):
        fill_ds_config(load_ds_config(REPO / "ds_configs" / "zero3.json", cfg), cfg, 48)
