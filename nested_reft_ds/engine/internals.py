"""Every private DeepSpeed, torch and transformers access of the package, in one place, pinned to tested versions.

The rest of `engine/` reaches these libraries' undocumented parts (name-mangled fields, module globals, hook
bookkeeping, private constructors, on-disk layouts) only through the functions below. Each says what it reads,
the version it was read from, and what it relies on. `tests/test_internals.py` exercises every one of them on
real objects, so an upgrade that changes one fails there, not silently in a training job.

At import, the installed versions are checked against `TESTED` (the range `pyproject.toml` pins): outside it,
importing `nested_reft_ds.engine` raises `UnsupportedVersionError` with one line naming the range and the installed
version. `NESTED_REFT_SKIP_VERSION_CHECK=1` turns that into a logged warning, for trying a new release at your own
risk (then run `pytest tests/test_internals.py` against it first).
"""
from __future__ import annotations

import logging
import os
import re
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

# name -> (lowest tested, first untested): the code below was read from and tested with deepspeed 0.19.8,
# torch 2.13.0 and transformers 5.24.0; patch releases of those minors are admitted, nothing else.
TESTED: dict[str, tuple[str, str]] = {
    "deepspeed": ("0.19.8", "0.20"),
    "torch": ("2.13", "2.14"),
    "transformers": ("5.24", "5.25"),
}
SKIP_ENV = "NESTED_REFT_SKIP_VERSION_CHECK"


class UnsupportedVersionError(ImportError):
    """An installed DeepSpeed / torch / transformers is outside the range this package's internals were tested on."""


def parse_version(text: str) -> tuple[int, ...]:
    """The release numbers a version string starts with: '2.13.0+cpu' -> (2, 13, 0), '0.20.0rc1' -> (0, 20, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    if match is None:
        raise ValueError(f"cannot read a version number from {text!r}")
    return tuple(int(part) for part in match.group().split("."))


def installed_version(name: str) -> str | None:
    """The installed distribution's version, None if it is not installed (reads metadata; imports nothing)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def requirement(name: str) -> str:
    """The pinned range of `name` as a requirement string, e.g. 'deepspeed>=0.19.8,<0.20'."""
    low, high = TESTED[name]
    return f"{name}>={low},<{high}"


def in_tested_range(name: str, version: str | None) -> bool:
    low, high = TESTED[name]
    return version is not None and parse_version(low) <= parse_version(version) < parse_version(high)


def check_versions() -> None:
    """Raise `UnsupportedVersionError` (one line) if any installed version is outside `TESTED`; with
    NESTED_REFT_SKIP_VERSION_CHECK=1 log the same line as a warning instead."""
    outside = [(name, installed_version(name)) for name in TESTED]
    outside = [(name, version) for name, version in outside if not in_tested_range(name, version)]
    if not outside:
        return
    needs = " and ".join(f"{requirement(name)} (installed: {version or 'none'})" for name, version in outside)
    message = (f"nested_reft_ds needs {needs}: it relies on private internals read from those versions "
               f"(nested_reft_ds/engine/internals.py); set {SKIP_ENV}=1 to run untested versions at your own risk")
    if os.environ.get(SKIP_ENV) == "1":
        log.warning("%s (check skipped: %s=1)", message, SKIP_ENV)
        return
    raise UnsupportedVersionError(message)


# Before anything below imports a private module path that another release may have moved.
check_versions()

import torch  # noqa: E402
from deepspeed.runtime.zero import parameter_offload as _parameter_offload  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402,F401  (re-exported)
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.hooks import RemovableHandle  # noqa: E402
from transformers.initialization import no_init_weights  # noqa: E402,F401  (re-exported)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # noqa: E402

# `ZeroParamStatus`: deepspeed 0.19.8 `runtime/zero/partition_parameters.py`, the enum behind `param.ds_status`.
# `no_init_weights`: transformers 5.24 `transformers.initialization` (its 5.x home); inside it torch's `nn.init`
# functions and `PreTrainedModel.init_weights` are no-ops.


# ------------------------------------------------------------ DeepSpeed ZeRO-3 parameter coordinator (0.19.8)

_MANGLED = "_PartitionedParameterCoordinator__"
# The constructor arguments a coordinator keeps only as name-mangled fields (`self.__<name>` in its __init__).
COORDINATOR_SETTINGS = ("prefetch_bucket_sz", "max_reuse_dist_in_numel", "max_n_available_params", "allgather_stream",
                        "inflight_param_registry", "prefetch_nvme", "log_trace_cache_warnings")


def coordinator_setting(coordinator: PartitionedParameterCoordinator, name: str):
    # `PartitionedParameterCoordinator.__<name>` (0.19.8): relies on __init__ storing its arguments there.
    return getattr(coordinator, _MANGLED + name)


def coordinator_like(training: PartitionedParameterCoordinator) -> PartitionedParameterCoordinator:
    """A fresh coordinator (empty trace) with `training`'s settings, sharing its in-flight registry and stream."""
    # Relies on the 0.19.8 constructor's keyword names and on `COORDINATOR_SETTINGS` being all it keeps of them.
    setting = lambda name: coordinator_setting(training, name)  # noqa: E731
    return PartitionedParameterCoordinator(
        prefetch_bucket_sz=setting("prefetch_bucket_sz"),
        max_reuse_distance_in_numel=setting("max_reuse_dist_in_numel"),
        max_available_parameters_in_numel=setting("max_n_available_params"),
        allgather_stream=setting("allgather_stream"),
        inflight_param_registry=setting("inflight_param_registry"),
        prefetch_nvme=setting("prefetch_nvme"),
        zero_quantized_weights=training.zero_quantized_weights,
        zero_quantized_nontrainable_weights=training.zero_quantized_nontrainable_weights,
        fast_sharding_for_leaf_module=training.fast_sharding_for_leaf_module,
        log_trace_cache_warnings=setting("log_trace_cache_warnings"),
    )


def uncached_params_to_release():
    """DeepSpeed's `__params_to_release` without its class-wide `lru_cache` (under `instrument_w_nvtx`)."""
    # `PartitionedParameterCoordinator.__params_to_release` (0.19.8) is `instrument_w_nvtx(lru_cache(f))`: relies on
    # the nvtx wrapper holding the cached function in a closure cell and on `lru_cache` exposing `__wrapped__`.
    fn = getattr(PartitionedParameterCoordinator, _MANGLED + "params_to_release")
    while not hasattr(fn, "cache_clear"):
        fn = next(cell.cell_contents for cell in fn.__closure__ or () if callable(cell.cell_contents))
    return fn.__wrapped__


def set_params_to_release(coordinator: PartitionedParameterCoordinator, fn) -> None:
    # Instance override of `__params_to_release` (0.19.8): relies on `release_sub_module` calling it through `self`.
    setattr(coordinator, _MANGLED + "params_to_release", fn)


def clean_inflight(coordinator: PartitionedParameterCoordinator) -> None:
    # `_clean_inflight_param_registry()` (0.19.8): waits for every in-flight all-gather, releases, clears the registry.
    coordinator._clean_inflight_param_registry()


def inflight_registry(module: nn.Module):
    # `module.ds_inflight_param_registry` (0.19.8): the root module's param -> all-gather handle map, shared by all
    # of its coordinators (it is what `coordinator_setting(c, "inflight_param_registry")` returns).
    return module.ds_inflight_param_registry


# ------------------------------------------------------------ DeepSpeed ZeRO-3 module hooks (0.19.8)

def forward_module_stack() -> list:
    # `parameter_offload.FWD_MODULE_STACK` (0.19.8): a module-global list the hooks push/pop in place, never rebound.
    return _parameter_offload.FWD_MODULE_STACK


def zero3_offload(engine):
    # The `DeepSpeedZeRoOffload` owning the hooks and `param_coordinator` (0.19.8): the stage-3 optimizer's
    # `parameter_offload`, or for an inference-only ZeRO-3 engine `engine.optimizer` itself.
    optimizer = engine.optimizer
    return getattr(optimizer, "parameter_offload", None) or optimizer


def set_param_coordinator(offload, coordinator: PartitionedParameterCoordinator) -> None:
    # `DeepSpeedZeRoOffload.param_coordinator` (0.19.8): relies on every hook looking it up through
    # `get_param_coordinator()` on each call, never caching it.
    offload.param_coordinator = coordinator


def zero3_module_hook_handles(offload) -> list[RemovableHandle]:
    # `forward_hooks`, `backward_hooks`, `fwd_pre_hook` of `DeepSpeedZeRoOffload` (0.19.8): the handles of its
    # per-module fetch/release hooks and of the root hook that resets the fetch step.
    return [*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook]


def engine_root_hooks(engine) -> list[RemovableHandle]:
    # `DeepSpeedEngine.module_forward_pre_hook` / `module_forward_post_hook` (0.19.8): the root-module handles of
    # the engine's forward prologue/epilogue (None when the engine did not register them).
    handles = (getattr(engine, "module_forward_pre_hook", None), getattr(engine, "module_forward_post_hook", None))
    return [handle for handle in handles if handle is not None]


# ------------------------------------------------------------ DeepSpeed ZeRO-3 parameter attributes (0.19.8)

# A module id no module has: while in a parameter's `ds_active_sub_modules`, DeepSpeed never releases it (relies on
# `__release_param` releasing only parameters whose `ds_active_sub_modules` is empty, 0.19.8).
PINNED_SUBMODULE = -1


def is_zero3_param(param: nn.Parameter) -> bool:
    # `param.ds_tensor` (0.19.8): set on every parameter `zero.Init` partitions.
    return hasattr(param, "ds_tensor")


def param_status(param: nn.Parameter) -> ZeroParamStatus:
    # `param.ds_status` (0.19.8): AVAILABLE (gathered), NOT_AVAILABLE (partitioned) or INFLIGHT.
    return param.ds_status


def partition_of(param: nn.Parameter) -> torch.Tensor:
    # `param.ds_tensor` (0.19.8): this rank's partition (padded slice of the flattened parameter).
    return param.ds_tensor


def full_numel(param: nn.Parameter) -> int:
    # `param.ds_numel` (0.19.8): the element count of the whole (gathered) parameter.
    return param.ds_numel


def active_submodules(param: nn.Parameter) -> set:
    # `param.ds_active_sub_modules` (0.19.8): ids of the modules now using the parameter; mutated in place.
    return param.ds_active_sub_modules


def zero3_gradient_partitions(engine) -> torch.Tensor | None:
    # `engine.optimizer.grad_partitions_flat_buffer` (0.19.8): the flat buffer holding this rank's gradient
    # partition of every parameter (fp32 unless offloaded). `partition_grads` overwrites a parameter's slice only
    # when the parameter got a gradient in the accumulation window, so an unused parameter's slice keeps the
    # previous step's gradient. None under optimizer offload, where the buffer is not the one the optimizer reads.
    optimizer = engine.optimizer
    if getattr(optimizer, "offload_optimizer", False):
        return None
    return optimizer.grad_partitions_flat_buffer


def gather_params(params: list[nn.Parameter]) -> None:
    # `param.all_gather_coalesced(params)` (0.19.8): one coalesced all-gather of `params`; returns a handle to wait.
    params[0].all_gather_coalesced(params).wait()


def release_params(params: list[nn.Parameter]) -> None:
    # `param.partition(param_list=..., has_been_updated=False)` (0.19.8): frees the gathered data, keeps partitions.
    params[0].partition(param_list=params, has_been_updated=False)


# ------------------------------------------------------------ DeepSpeed process groups and checkpoints (0.19.8)

def reset_cached_world_group() -> None:
    # `deepspeed.utils.groups._WORLD_GROUP` (0.19.8): a cached clone of the world group, never reset by DeepSpeed
    # when the process group is destroyed.
    from deepspeed.utils import groups
    groups._WORLD_GROUP = None


def has_zero_optimizer_shards(tag_dir: Path) -> bool:
    # DeepSpeed's checkpoint layout (0.19.8): ZeRO 1-3 write `zero_pp_rank_<r>_mp_rank_<m>_optim_states.pt`.
    return any(Path(tag_dir).glob("zero_pp_rank_*optim_states.pt"))


def model_states_files(tag_dir: Path) -> list[Path]:
    # DeepSpeed's checkpoint layout (0.19.8): `mp_rank_<m>_model_states.pt` (ZeRO 0-2) or one
    # `zero_pp_rank_<r>_mp_rank_<m>_model_states.pt` per rank (ZeRO-3); every one carries the client state.
    return sorted(Path(tag_dir).glob("*mp_rank_*_model_states.pt"))


def load_model_states(path: Path) -> dict:
    # DeepSpeed's model-states file (0.19.8): a pickled dict with the state dict under "module" and the
    # `client_state` keys at top level.
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------ torch (2.13)

def default_store():
    # `distributed_c10d._get_default_store()` (2.13): the default process group's c10d store.
    from torch.distributed import distributed_c10d
    return distributed_c10d._get_default_store()


def hook_dicts(handle: RemovableHandle) -> list[dict]:
    # `RemovableHandle.hooks_dict_ref` / `extra_dict_ref` (2.13): weakrefs to the module dicts holding the hook
    # (and its kwargs/always-call flags); the dead ones are left out.
    live = (ref() for ref in (handle.hooks_dict_ref, *handle.extra_dict_ref))
    return [hooks for hooks in live if hooks is not None]


def hook_key(handle: RemovableHandle) -> int:
    # `RemovableHandle.id` (2.13): relies on `register_*_hook` storing the hook under this key in `hook_dicts`.
    return handle.id


# ------------------------------------------------------------ transformers (5.24)

def causal_lm_class(model_config) -> type:
    # `transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING` (5.24): config class -> model class
    # (indexing it imports the model module).
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]


def build_from_config(model_class, model_config, **kwargs):
    # `PreTrainedModel._from_config(config, dtype=, attn_implementation=)` (5.24): constructs the model in the
    # ambient context (`zero.Init`, `no_init_weights`) and loads no weights.
    return model_class._from_config(model_config, **kwargs)


def init_buffers(model, module: nn.Module) -> None:
    # `PreTrainedModel._init_weights(module)` (5.24): also computes derived buffers (rotary `inv_freq`).
    model._init_weights(module)
