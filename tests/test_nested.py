"""Skip plans and the nested view: pure functions, and equality with a physically smaller model."""
import re
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from nested_reft_ds.model import load_model_and_tokenizer
from nested_reft_ds.nested import SkipPlan, nested_view, parse_skip_ratios, sample_skip_plan, scheduled_ratio
from nested_reft_ds.rollout import position_ids_from_mask


def test_plan_is_pure_function_of_seed_and_step_and_respects_protection():
    plans = [sample_skip_plan(12, 0.5, step, seed=7) for step in range(50)]
    assert plans == [sample_skip_plan(12, 0.5, step, seed=7) for step in range(50)]
    assert len({p.skipped for p in plans}) > 10, "a fresh subset each step"
    for p in plans:
        assert len(p.skipped) == 6 and 0 not in p.skipped and 11 not in p.skipped
    assert sample_skip_plan(12, 0.5, 3, seed=8) != sample_skip_plan(12, 0.5, 3, seed=7)
    assert sample_skip_plan(12, 0.0, 3, seed=7).skipped == ()


def test_plan_same_in_a_fresh_interpreter():
    import subprocess
    code = "from nested_reft_ds.nested import sample_skip_plan as s; print(s(16, 0.25, 5, 3).skipped)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert out == str(sample_skip_plan(16, 0.25, 5, 3).skipped)


def test_contiguous_and_learned_strategies():
    for step in range(20):
        block = sample_skip_plan(10, 0.4, step, 1, strategy="contiguous").skipped
        assert list(block) == list(range(block[0], block[0] + 4)) and block[0] >= 1 and block[-1] <= 8
    # Learned: a layer with 100x the weight is skipped far more often than the others.
    weights = [1.0] * 10
    weights[5] = 100.0
    counts = [0] * 10
    for step in range(300):
        for i in sample_skip_plan(10, 0.2, step, 1, strategy="learned", weights=weights).skipped:
            counts[i] += 1
    assert counts[5] > 250 and counts[0] == counts[9] == 0


def test_plan_errors_name_the_problem():
    with pytest.raises(ValueError, match="only 2 are unprotected"):
        sample_skip_plan(4, 0.75, 0, 0)
    with pytest.raises(ValueError, match="strategy"):
        sample_skip_plan(8, 0.25, 0, 0, strategy="zigzag")
    with pytest.raises(ValueError, match="keep at least one"):
        SkipPlan(2, (0, 1))


def test_linear_schedule():
    assert scheduled_ratio(0.5, 0, "linear", 10) == 0.0
    assert scheduled_ratio(0.5, 5, "linear", 10) == 0.25
    assert scheduled_ratio(0.5, 50, "linear", 10) == 0.5
    assert scheduled_ratio(0.5, 0, "fixed", 0) == 0.5


def rebuilt_without(model, plan):
    """A model physically constructed with only the kept layers, weights copied."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(plan.kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [model.config.layer_types[i] for i in plan.kept]
    small = AutoModelForCausalLM.from_config(config, attn_implementation=model.config._attn_implementation).eval()
    state = {}
    for key, value in model.state_dict().items():
        if ".layers." in key:
            prefix, rest = key.split(".layers.", 1)
            index, tail = rest.split(".", 1)
            if int(index) not in plan.kept:
                continue
            key = f"{prefix}.layers.{plan.kept.index(int(index))}.{tail}"
        state[key] = value
    small.load_state_dict(state, strict=True)
    return small


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "mistral"])
@pytest.mark.parametrize("skipped", [(), (2, 4), (0, 3), (5,)])
def test_nested_forward_equals_physically_smaller_model(tiny_models, arch, skipped):
    model, tok = load_model_and_tokenizer(tiny_models[arch])
    model.eval()
    enc = tok(["Question: 1+2?", "Q: 33 + 44 - 5 = ?"], padding=True, return_tensors="pt")
    position_ids = position_ids_from_mask(enc.attention_mask)
    plan = SkipPlan(6, skipped)
    with torch.no_grad():
        with nested_view(model, plan):
            nested = model(**enc, position_ids=position_ids).logits
        assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6, "view restored"
        reference = rebuilt_without(model, plan)(**enc, position_ids=position_ids).logits
    mask = enc.attention_mask.bool()
    torch.testing.assert_close(nested[mask], reference[mask], atol=1e-5, rtol=0)
    if not skipped:
        with torch.no_grad():
            torch.testing.assert_close(nested, model(**enc, position_ids=position_ids).logits, atol=0, rtol=0)


def test_view_restores_on_exception(tiny_models):
    model, _ = load_model_and_tokenizer(tiny_models["qwen2"])
    layers = model.model.layers
    with pytest.raises(RuntimeError):
        with nested_view(model, SkipPlan(6, (0, 2))):
            assert model.model.layers[0].self_attn.layer_idx == 0 and len(model.model.layers) == 4
            raise RuntimeError("boom")
    assert model.model.layers is layers and model.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(6))
    assert len(model.config.layer_types) == 6


def test_scheduler_fixed_matches_sample_skip_plan():
    from nested_reft_ds.config import SkipConfig
    from nested_reft_ds.nested import SkipScheduler
    scheduler = SkipScheduler(SkipConfig(ratio=0.25), num_layers=12, seed=3)
    assert [scheduler.plan(s) for s in range(5)] == [sample_skip_plan(12, 0.25, s, 3) for s in range(5)]


def test_adaptive_scheduler_moves_ratio_and_resumes_identically():
    from nested_reft_ds.config import SkipConfig
    from nested_reft_ds.nested import SkipScheduler
    cfg = SkipConfig(ratio=0.25, schedule="adaptive", strategy="learned", ratio_min=0.0, ratio_max=0.5,
                     target_kl=0.05, step_size=0.125, smoothing=0.5)
    kls = [0.01, 0.01, 0.2, 0.01, 0.3, 0.02, 0.01, 0.01]

    def drive(scheduler, steps):
        plans = []
        for step in steps:
            plan = scheduler.plan(step)
            scheduler.observe(plan, ess=0.9, kl=kls[step], divergence=kls[step])
            plans.append(plan)
        return plans

    full = SkipScheduler(cfg, 8, seed=1)
    plans = drive(full, range(8))
    ratios = [len(p.skipped) for p in plans]
    assert ratios[:3] == [2, 3, 4] and ratios[3] < ratios[2], "rises inside the KL target, backs off outside"
    first = SkipScheduler(cfg, 8, seed=1)
    drive(first, range(4))
    resumed = SkipScheduler(cfg, 8, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert drive(resumed, range(4, 8)) == plans[4:]


def test_scheduler_rejects_ratio_that_cannot_fit():
    from nested_reft_ds.config import ConfigError, SkipConfig
    from nested_reft_ds.nested import SkipScheduler
    with pytest.raises(ValueError, match="unprotected"):
        SkipScheduler(SkipConfig(ratio=0.25, schedule="adaptive", ratio_max=0.9, target_ess=0.8), 4, 0)
    with pytest.raises(ConfigError, match="at least one target"):
        SkipConfig(schedule="adaptive")


def test_parse_skip_ratios_validates_every_entry():
    assert parse_skip_ratios("0, 0.25,0.5") == [0.0, 0.25, 0.5]
    for text, message in [("0,,0.5", "'' in '0,,0.5' is not a number"), ("0.9,1", "skip ratio 1.0"),
                          ("-0.1", "skip ratio -0.1"), ("", "not a number")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_skip_ratios(text, "--skip-ratios")
