"""The frozen reference policy for the KL penalty (`algorithm.kl_coef > 0`): building, saving, restoring.

What the reference is: the policy as RL starts, i.e. the weights after the SFT warm-up (or as loaded from
`model.path` / a checkpoint when there is no warm-up). It is built from the same model directory as the
target (architecture, buffers, tokenizer-independent), then its parameters are overwritten with the
policy's current ones, so it equals the policy bit for bit at RL step 0 (KL 0 there).

How it runs:
- ZeRO-3: a DeepSpeed inference engine (`deepspeed.initialize` with the training config's
  `zero_optimization` stage-3 section, no optimizer): parameters stay partitioned like the target's and are
  fetched layer by layer in its forward; nothing requires grad. Its forward is collective (all-gathers):
  every rank must run the same number of reference forwards.
- Stage 0-2: a plain frozen module on the device (the weights are replicated anyway).

Resume: the reference cannot be recomputed from a later checkpoint, so every checkpoint written while it
exists carries a copy under `<tag>/reference/`: under ZeRO-3 each rank saves its own partitions
(`zero3_rank<r>_of<world>.pt`, no gather; resuming needs the same world size, as DeepSpeed's ZeRO-3
checkpoints do), otherwise rank 0 saves the state dict (`model_states.pt`). The copy is in the module
dtype, so each checkpoint grows by one set of module weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError
from .distributed import device
from .internals import ZeroParamStatus, is_zero3_param, param_status, partition_of
from .ds_config import inference_ds_config
from .setup import build_inference_engine, load_model_for_engine

REFERENCE_DIR = "reference"

__all__ = ["REFERENCE_DIR", "build_reference", "has_saved_reference", "save_reference"]


def _is_zero3(ds_config: dict[str, Any]) -> bool:
    return ds_config.get("zero_optimization", {}).get("stage") == 3


def _shard_file(rank: int, world: int) -> str:
    return f"zero3_rank{rank:03d}_of{world:03d}.pt"


def _named_partitions(module: nn.Module) -> dict[str, torch.Tensor]:
    """name -> this rank's ZeRO-3 partition (`ds_tensor`) of every parameter (tied parameters once)."""
    return {name: partition_of(param) for name, param in module.named_parameters()}


def has_saved_reference(tag_dir: str | Path) -> bool:
    return (Path(tag_dir) / REFERENCE_DIR).is_dir()


def save_reference(reference: nn.Module, tag_dir: str | Path) -> None:
    """Write the reference into checkpoint directory `tag_dir` (before the checkpoint is committed).

    Under ZeRO-3 every rank writes its own partitions and every rank must call this; otherwise rank 0 writes."""
    out = Path(tag_dir) / REFERENCE_DIR
    out.mkdir(parents=True, exist_ok=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    module = getattr(reference, "module", reference)
    if is_zero3_param(next(module.parameters())):
        tensors = {name: t.detach().cpu().clone() for name, t in _named_partitions(module).items()}
        torch.save({"world_size": world, "rank": rank, "tensors": tensors}, out / _shard_file(rank, world))
    elif rank == 0:
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}},
                   out / "model_states.pt")


def _load_saved(tag_dir: Path, zero3: bool) -> dict[str, torch.Tensor]:
    folder = tag_dir / REFERENCE_DIR
    if not zero3:
        path = folder / "model_states.pt"
        if not path.is_file():
            raise ConfigError(f"{str(path)!r} is missing: the reference in {str(folder)!r} was not saved by a "
                             "ZeRO stage 0-2 run (a ZeRO-3 run saves per-rank partitions)")
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    rank, world = dist.get_rank(), dist.get_world_size()
    path = folder / _shard_file(rank, world)
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.pt"))
        raise ConfigError(f"{str(path)!r} is missing: the ZeRO-3 reference partitions must be restored at the "
                         f"world size they were saved with (found {found})")
    return torch.load(path, map_location="cpu", weights_only=True)["tensors"]


def _fill_partitions(model: nn.Module, partitions: dict[str, torch.Tensor]) -> None:
    """Copy `partitions` into the (still partitioned, not yet engine-wrapped) reference's `ds_tensor`s."""
    own = _named_partitions(model)
    if own.keys() != partitions.keys():
        raise ConfigError(f"reference parameters differ from the policy's: {sorted(own.keys() ^ partitions.keys())[:5]}")
    for name, param in model.named_parameters():
        assert param_status(param) == ZeroParamStatus.NOT_AVAILABLE, f"{name} must be partitioned while it is filled"
        source, own_partition = partitions[name], partition_of(param)
        if source.shape != own_partition.shape or source.dtype != own_partition.dtype:
            raise ConfigError(f"reference partition of {name!r} is {tuple(source.shape)} {source.dtype}, expected "
                             f"{tuple(own_partition.shape)} {own_partition.dtype} (same world size and dtype)")
        own_partition.data.copy_(source)


def build_reference(model_dir: str | Path, ds_config: dict[str, Any], attn_implementation: str, *,
                    policy=None, saved: str | Path | None = None) -> nn.Module:
    """The frozen reference, with the weights of `policy` (the training engine, now) or of the copy `saved` in a
    checkpoint directory. Returns a ZeRO-3 inference engine or a plain eval-mode module; call it like the model.

    Collective: every rank must call it (ZeRO-3 loading and engine start-up communicate)."""
    assert (policy is None) != (saved is None), "give exactly one of policy / saved"
    zero3 = _is_zero3(ds_config)
    if zero3 and ds_config["zero_optimization"].get("offload_param", {}).get("device") == "nvme":
        raise ConfigError("algorithm.kl_coef > 0 with zero_optimization.offload_param.device='nvme' is not "
                         "supported: the reference copies parameter partitions in memory; use 'cpu' or 'none'")
    config = inference_ds_config(ds_config) if zero3 else ds_config
    model, _ = load_model_for_engine(model_dir, config, attn_implementation)  # the target's architecture
    model.requires_grad_(False)
    if zero3:
        partitions = _named_partitions(policy.module) if policy is not None else _load_saved(Path(saved), True)
        _fill_partitions(model, partitions)
        return build_inference_engine(model, config)
    state = policy.module.state_dict() if policy is not None else _load_saved(Path(saved), False)
    model.load_state_dict(state)
    return model.to(device()).eval()
