"""`engine/internals.py`: the version check at import, and a self-check of every private DeepSpeed / torch /
transformers access on real objects, so an upgrade that moves one fails here rather than in a training job.

The self-check runs on a real single-process ZeRO-3 engine (gloo, CPU) around the embedded tiny model, built
through `load_model_for_engine` (which itself uses the transformers internals under `zero.Init`)."""
import gc
import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from nested_reft_ds.engine import internals
from nested_reft_ds.engine.internals import UnsupportedVersionError

REPO = Path(__file__).resolve().parents[1]
IN_RANGE = {"deepspeed": "0.19.8", "torch": "2.13.0+cpu", "transformers": "5.24.0"}


# ----------------------------------------------------------------------------------------------- version check

def versions(monkeypatch, **overrides):
    installed = {**IN_RANGE, **overrides}
    monkeypatch.setattr(internals, "installed_version", lambda name: installed[name])
    monkeypatch.delenv(internals.SKIP_ENV, raising=False)


def test_versions_are_parsed_from_their_release_numbers():
    assert internals.parse_version("2.13.0+cpu") == (2, 13, 0)
    assert internals.parse_version("0.20.0rc1") == (0, 20, 0)
    assert internals.parse_version("5.24") == (5, 24)
    with pytest.raises(ValueError, match="'unknown'"):
        internals.parse_version("unknown")


def test_installed_versions_are_in_the_tested_range(monkeypatch):
    monkeypatch.delenv(internals.SKIP_ENV, raising=False)
    internals.check_versions()  # what importing nested_reft_ds.engine just did
    for name in internals.TESTED:
        assert internals.in_tested_range(name, internals.installed_version(name)), name


@pytest.mark.parametrize("deepspeed", ["0.19.8", "0.19.9", "0.19.12"])
def test_versions_inside_the_range_pass(monkeypatch, deepspeed):
    versions(monkeypatch, deepspeed=deepspeed, torch="2.13.1+cu128", transformers="5.24.3")
    internals.check_versions()


@pytest.mark.parametrize("deepspeed", ["0.21.0", "0.20.0", "0.19.7", "0.18.4"])
def test_an_unsupported_deepspeed_fails_with_one_line(monkeypatch, deepspeed):
    versions(monkeypatch, deepspeed=deepspeed)
    with pytest.raises(UnsupportedVersionError) as raised:
        internals.check_versions()
    message = str(raised.value)
    assert isinstance(raised.value, ImportError) and "\n" not in message
    assert message.startswith(f"nested_reft_ds needs deepspeed>=0.19.8,<0.20 (installed: {deepspeed}): ")
    assert "nested_reft_ds/engine/internals.py" in message and "NESTED_REFT_SKIP_VERSION_CHECK=1" in message
    assert "torch" not in message and "transformers" not in message  # only what is outside the range


def test_every_version_outside_the_range_is_named_in_the_same_line(monkeypatch):
    versions(monkeypatch, torch="2.15.0", transformers=None)
    with pytest.raises(UnsupportedVersionError) as raised:
        internals.check_versions()
    message = str(raised.value)
    assert "\n" not in message
    assert "torch>=2.13,<2.14 (installed: 2.15.0) and transformers>=5.24,<5.25 (installed: none)" in message


def test_the_escape_hatch_logs_the_line_instead(monkeypatch, caplog):
    versions(monkeypatch, deepspeed="0.21.0")
    monkeypatch.setenv(internals.SKIP_ENV, "1")
    with caplog.at_level("WARNING", logger=internals.__name__):
        internals.check_versions()
    assert "deepspeed>=0.19.8,<0.20 (installed: 0.21.0)" in caplog.text and "check skipped" in caplog.text


def test_importing_the_engine_under_an_unsupported_deepspeed_fails_before_touching_deepspeed():
    probe = ("import importlib.metadata as m, json, sys\n"
             "real = m.version\n"
             "m.version = lambda name: '0.21.0' if name == 'deepspeed' else real(name)\n"
             "try:\n"
             "    import nested_reft_ds.engine\n"
             "except ImportError as error:\n"
             "    print(json.dumps({'type': type(error).__name__, 'message': str(error),\n"
             "                      'deepspeed_imported': 'deepspeed' in sys.modules}))\n")
    env = {k: v for k, v in os.environ.items() if k != internals.SKIP_ENV}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["type"] == "UnsupportedVersionError" and not result["deepspeed_imported"]
    assert "\n" not in result["message"]
    assert result["message"].startswith("nested_reft_ds needs deepspeed>=0.19.8,<0.20 (installed: 0.21.0)")


def test_pyproject_pins_the_tested_ranges():
    tomllib = pytest.importorskip("tomllib")
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in internals.TESTED:
        assert internals.requirement(name) in dependencies, name


# ----------------------------------------------------------------------------------------------- torch

def test_hook_dicts_and_keys_of_a_plain_module_hook():
    module = nn.Linear(2, 2)
    handle = module.register_forward_pre_hook(lambda mod, args, kwargs: None, with_kwargs=True)
    dicts = internals.hook_dicts(handle)
    assert [id(d) for d in dicts] == [id(module._forward_pre_hooks), id(module._forward_pre_hooks_with_kwargs)]
    assert all(internals.hook_key(handle) in d for d in dicts)
    post = module.register_forward_hook(lambda mod, args, out: None, always_call=True)
    dicts = internals.hook_dicts(post)
    assert [id(d) for d in dicts] == [id(module._forward_hooks), id(module._forward_hooks_with_kwargs),
                                      id(module._forward_hooks_always_called)]
    assert internals.hook_key(post) in module._forward_hooks and internals.hook_key(post) in dicts[2]
    del module
    gc.collect()
    assert internals.hook_dicts(handle) == []  # dead weakrefs are left out


# ----------------------------------------------------------------------------------------------- transformers

@pytest.fixture(scope="module")
def hf_config():
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)


def test_causal_lm_class_and_build_from_config(hf_config):
    from transformers import Qwen2ForCausalLM

    model_class = internals.causal_lm_class(hf_config)
    assert model_class is Qwen2ForCausalLM
    model = internals.build_from_config(model_class, hf_config, dtype=torch.float32, attn_implementation="sdpa")
    assert isinstance(model, Qwen2ForCausalLM) and model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"


def test_init_buffers_recomputes_rotary_frequencies(hf_config):
    model = internals.build_from_config(internals.causal_lm_class(hf_config), hf_config, dtype=torch.float32,
                                        attn_implementation="sdpa")
    rotary = model.model.rotary_emb
    expected = rotary.inv_freq.clone()
    assert expected.abs().sum() > 0
    rotary.inv_freq.zero_()
    internals.init_buffers(model, rotary)
    assert torch.equal(rotary.inv_freq, expected)


def test_no_init_weights_skips_torch_init():
    weights = torch.ones(4)
    with internals.no_init_weights():
        nn.init.normal_(weights)
    assert torch.equal(weights, torch.ones(4))
    nn.init.zeros_(weights)
    assert torch.equal(weights, torch.zeros(4))


# ----------------------------------------------------------------------------------------------- DeepSpeed

ZERO3 = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10 ** 9,
         "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}}}


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    """A single-process ZeRO-3 training engine over a 3-layer tiny Qwen2, trained 3 steps (trace complete)."""
    from nested_reft_ds import engine as ds
    from nested_reft_ds.config import ModelConfig
    from nested_reft_ds.model import build_tiny_model

    path = build_tiny_model(ModelConfig(arch="qwen2", num_layers=3, hidden_size=32, num_heads=2, num_kv_heads=1,
                                        intermediate_size=64), tmp_path_factory.mktemp("internals") / "m", seed=0)
    environ = dict(os.environ)  # init_distributed exports RANK/WORLD_SIZE/...: keep them out of later tests
    try:
        ds.init_distributed()
        torch.manual_seed(0)
        model, _ = ds.load_model_for_engine(path, ZERO3, "sdpa")
        engine = ds.build_engine(model, ZERO3)
        ids = torch.randint(2, 30, (2, 6))
        for _ in range(3):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        yield types.SimpleNamespace(engine=engine, model=engine.module, path=path, ids=ids)
    finally:
        ds.shutdown_distributed()
        os.environ.clear()
        os.environ.update(environ)


def training_coordinator(zero3):
    return internals.zero3_offload(zero3.engine).get_param_coordinator()


def forward(zero3, coordinator=None) -> None:
    """One no-grad forward with ZeRO-3's hooks on, then every parameter released again."""
    with torch.no_grad():
        zero3.model(input_ids=zero3.ids)
    (coordinator or training_coordinator(zero3)).release_and_reset_all(zero3.model)


def test_zero3_loading_filled_derived_buffers(zero3):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(zero3.path)
    assert torch.equal(zero3.model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)


def test_zero3_offload_owns_the_coordinator_and_hooks(zero3):
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    offload = internals.zero3_offload(zero3.engine)
    assert offload is zero3.engine.optimizer.parameter_offload and isinstance(offload, DeepSpeedZeRoOffload)
    assert isinstance(offload.get_param_coordinator(), internals.PartitionedParameterCoordinator)
    handles = internals.zero3_module_hook_handles(offload)
    assert len(handles) > 3 and all(isinstance(h, RemovableHandle) for h in handles)
    module_dicts = {id(d) for m in zero3.model.modules() for d in (m._forward_pre_hooks, m._forward_hooks)}
    for handle in handles:  # the hook itself under its key; its flag dicts (kwargs, always-call) beside it
        dicts = internals.hook_dicts(handle)
        assert dicts and id(dicts[0]) in module_dicts and internals.hook_key(handle) in dicts[0]
    roots = internals.engine_root_hooks(zero3.engine)
    assert len(roots) == 2
    assert internals.hook_key(roots[0]) in zero3.model._forward_pre_hooks
    assert internals.hook_key(roots[1]) in zero3.model._forward_hooks


def test_an_inference_engine_owns_its_hooks_itself(zero3):
    import deepspeed
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    from nested_reft_ds import engine as ds

    with deepspeed.zero.Init(config_dict_or_path=ZERO3):
        module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    engine = ds.build_inference_engine(module, ZERO3)
    offload = internals.zero3_offload(engine)
    assert offload is engine.optimizer and isinstance(offload, DeepSpeedZeRoOffload)
    assert internals.zero3_module_hook_handles(offload) and len(internals.engine_root_hooks(engine)) == 2


def test_coordinator_settings_and_a_coordinator_like_it(zero3):
    training = training_coordinator(zero3)
    settings = {name: internals.coordinator_setting(training, name) for name in internals.COORDINATOR_SETTINGS}
    for name in ("prefetch_bucket_sz", "max_reuse_dist_in_numel", "max_n_available_params"):
        assert isinstance(settings[name], int) and settings[name] > 0, name
    assert isinstance(settings["prefetch_nvme"], bool) and isinstance(settings["log_trace_cache_warnings"], bool)
    assert settings["inflight_param_registry"] is internals.inflight_registry(zero3.model)
    assert training.is_complete_trace()

    fresh = internals.coordinator_like(training)
    assert isinstance(fresh, internals.PartitionedParameterCoordinator) and fresh.is_invalid_trace()
    for name, value in settings.items():
        assert internals.coordinator_setting(fresh, name) is value, name
    for name in ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "fast_sharding_for_leaf_module"):
        assert getattr(fresh, name) == getattr(training, name), name


def test_uncached_params_to_release_is_the_plain_function(zero3):
    fn = internals.uncached_params_to_release()
    assert isinstance(fn, types.FunctionType) and not hasattr(fn, "cache_clear") and not hasattr(fn, "__wrapped__")
    assert fn.__qualname__.endswith("__params_to_release")
    assert list(inspect.signature(fn).parameters) == ["self", "submodule_to_release", "step_id"]
    leaf = zero3.model.model.layers[1].self_attn.q_proj
    released = fn(training_coordinator(zero3), leaf, 0)  # the trace is complete: it computes, uncached
    assert isinstance(released, set) and released <= {p.ds_id for p in leaf.parameters()}


def test_an_instance_params_to_release_is_what_release_uses(zero3):
    training = training_coordinator(zero3)
    uncached, calls = internals.uncached_params_to_release(), []

    def spy(submodule, step_id):
        calls.append(step_id)
        return uncached(training, submodule, step_id)

    internals.set_params_to_release(training, spy)
    try:
        forward(zero3)
    finally:
        delattr(training, "_PartitionedParameterCoordinator__params_to_release")  # the class's cached one again
    assert calls and training.is_complete_trace()


def test_partition_attributes_gather_and_release(zero3):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    assert internals.ZeroParamStatus is ZeroParamStatus
    internals.clean_inflight(training_coordinator(zero3))
    assert len(internals.inflight_registry(zero3.model)) == 0
    params = list(zero3.model.model.layers[1].mlp.parameters())
    for param in params:
        assert internals.is_zero3_param(param)
        assert internals.param_status(param) == ZeroParamStatus.NOT_AVAILABLE and param.numel() == 0
        assert internals.full_numel(param) == param.ds_shape.numel()
        assert internals.partition_of(param).numel() >= internals.full_numel(param)  # one rank: all of it, padded
        assert isinstance(internals.active_submodules(param), set)
    internals.gather_params(params)
    assert all(internals.param_status(p) == ZeroParamStatus.AVAILABLE and p.shape == p.ds_shape for p in params)
    internals.release_params(params)
    assert all(internals.param_status(p) == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0 for p in params)
    assert not internals.is_zero3_param(nn.Linear(2, 2).weight)


def test_a_pinned_parameter_is_never_released(zero3):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    coordinator = internals.coordinator_like(training_coordinator(zero3))  # no trace: releases all it is given
    leaf = zero3.model.model.layers[1].self_attn.q_proj
    params = list(leaf.parameters())
    internals.gather_params(params)
    for param in params:
        internals.active_submodules(param).add(internals.PINNED_SUBMODULE)
    coordinator.release_sub_module(leaf, forward=True)
    assert all(internals.param_status(p) == ZeroParamStatus.AVAILABLE for p in params)
    for param in params:
        internals.active_submodules(param).discard(internals.PINNED_SUBMODULE)
    coordinator.release_sub_module(leaf, forward=True)
    assert all(internals.param_status(p) == ZeroParamStatus.NOT_AVAILABLE for p in params)


def test_forward_module_stack_is_the_list_the_hooks_push(zero3):
    from deepspeed.runtime.zero import parameter_offload

    stack = internals.forward_module_stack()
    assert stack is parameter_offload.FWD_MODULE_STACK and isinstance(stack, list)
    depth = len(stack)  # setting up the hooks left the root on it
    layer, seen = zero3.model.model.layers[1], []
    probe = layer.register_forward_pre_hook(lambda module, args: seen.append(list(internals.forward_module_stack())))
    try:
        forward(zero3)
    finally:
        probe.remove()
    assert seen and len(seen[0]) > depth + 1 and seen[0][depth] is zero3.model and seen[0][-1] is layer
    assert internals.forward_module_stack() is stack and len(stack) == depth


def test_a_swapped_in_coordinator_serves_the_hooks(zero3):
    offload = internals.zero3_offload(zero3.engine)
    training = offload.get_param_coordinator()
    decode = internals.coordinator_like(training)
    internals.set_param_coordinator(offload, decode)
    try:
        assert offload.get_param_coordinator() is decode
        forward(zero3, decode)
    finally:
        internals.set_param_coordinator(offload, training)
        internals.clean_inflight(decode)
    assert decode.is_record_trace() and training.is_complete_trace()  # only the swapped-in one saw the forward


def test_reset_cached_world_group(zero3):
    from deepspeed.utils import groups

    cached = groups._clone_world_group()
    assert cached is not None and groups._WORLD_GROUP is cached
    internals.reset_cached_world_group()
    assert groups._WORLD_GROUP is None
    assert groups._clone_world_group() is not cached  # a later process group gets a group of its own


def test_default_store_supports_what_failstop_uses(zero3):
    store = internals.default_store()
    store.set("internals/key", "value")
    assert store.check(["internals/key"]) and store.get("internals/key") == b"value"
    assert store.add("internals/count", 1) == 1 and store.add("internals/count", 1) == 2
    assert not store.check(["internals/absent"])


def test_checkpoint_layout(zero3, tmp_path):
    from nested_reft_ds import engine as ds

    zero3.engine.save_checkpoint(str(tmp_path / "zero3"), tag="t", client_state={"config": {"k": 1}})
    assert internals.has_zero_optimizer_shards(tmp_path / "zero3" / "t")
    (states,) = internals.model_states_files(tmp_path / "zero3" / "t")  # zero_pp_rank_0_mp_rank_00_...
    saved = internals.load_model_states(states)
    assert "module" in saved and saved["config"] == {"k": 1}  # client state at top level

    plain = ds.build_engine(nn.Linear(4, 1), {**ZERO3, "zero_optimization": {"stage": 0}})
    plain.save_checkpoint(str(tmp_path / "zero0"), tag="t", client_state={"config": {"k": 2}})
    assert not internals.has_zero_optimizer_shards(tmp_path / "zero0" / "t")
    (states,) = internals.model_states_files(tmp_path / "zero0" / "t")
    saved = internals.load_model_states(states)
    assert saved["module"].keys() == plain.module.state_dict().keys() and saved["config"] == {"k": 2}


def test_zero3_gradient_partitions_keep_an_unused_parameters_old_gradient(zero3):
    """What engine.optimizer_step clears: after a step in which a layer got no gradient, its slice of the flat
    gradient buffer still holds the previous step's gradient (DeepSpeed overwrites only the slices it reduced)."""
    from nested_reft_ds.nested import SkipPlan, nested_view

    partitions = internals.zero3_gradient_partitions(zero3.engine)
    layer = zero3.model.model.layers[1]
    slices = {id(p): zero3.engine.optimizer._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition[p.ds_id]
              for p in layer.parameters()}
    assert all(s.data_ptr() >= partitions.data_ptr() for s in slices.values())  # views into the flat buffer
    zero3.engine.backward(zero3.engine(input_ids=zero3.ids, labels=zero3.ids).loss)
    zero3.engine.step()
    before = {k: s.clone() for k, s in slices.items()}
    assert any(bool(s.abs().sum() > 0) for s in before.values())
    with nested_view(zero3.model, SkipPlan(3, (1,))):
        zero3.engine.backward(zero3.engine(input_ids=zero3.ids, labels=zero3.ids).loss)
    zero3.engine.step()
    assert all(torch.equal(slices[k], before[k]) for k in slices), "stale: the skipped layer's last gradient"
    partitions.zero_()
    assert all(bool((s == 0).all()) for s in slices.values())
