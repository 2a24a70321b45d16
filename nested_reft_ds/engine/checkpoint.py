"""Checkpoints: DeepSpeed engine state + our client state, committed atomically; export to a HF model.

A checkpoint is `<dir>/<tag>/` written by `engine.save_checkpoint` on every rank, then made current by
rank 0 replacing `<dir>/latest` atomically (write to a temp file, fsync, os.replace). A crash mid-save
leaves `latest` pointing at the previous complete checkpoint, so nothing is lost and `--resume` is safe.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .distributed import barrier


def save_checkpoint(engine, save_dir: str | Path, tag: str, client_state: dict[str, Any]) -> Path:
    """Save and commit checkpoint `tag`. Collective: every rank must call it."""
    save_dir = Path(save_dir)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's shard is on disk before `latest` moves
    if engine.global_rank == 0:
        temp = save_dir / f".latest.{os.getpid()}.tmp"
        with open(temp, "w") as handle:
            handle.write(tag)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, save_dir / "latest")
    barrier()
    return save_dir / tag


def latest_tag(save_dir: str | Path) -> str | None:
    latest = Path(save_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load_checkpoint(engine, save_dir: str | Path, tag: str | None = None) -> dict[str, Any] | None:
    """Load `tag` (default: the committed latest) into `engine`; returns our client state, or None when there
    is no checkpoint. Collective."""
    tag = tag or latest_tag(save_dir)
    if tag is None:
        return None
    if not (Path(save_dir) / tag).is_dir():
        raise ValueError(f"checkpoint {str(Path(save_dir) / tag)!r} does not exist")
    path, client_state = engine.load_checkpoint(str(save_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {tag!r} from {str(save_dir)!r}")
    return client_state


def consolidated_state_dict(save_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of any ZeRO stage (0/1/2/3), in one process, no GPU needed."""
    tag = tag or latest_tag(save_dir)
    if tag is None:
        raise ValueError(f"no committed checkpoint in {str(save_dir)!r} (no 'latest' file)")
    checkpoint = Path(save_dir) / tag
    if any(checkpoint.glob("zero_pp_rank_*optim_states.pt")):  # ZeRO 1-3: weights live in optimizer shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
    model_states = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))
    if not model_states:
        raise ValueError(f"{str(checkpoint)!r} holds no DeepSpeed model states")
    state = torch.load(model_states[0], map_location="cpu", weights_only=False)["module"]
    return {key: value.float() for key, value in state.items()}


def export_hf_model(save_dir: str | Path, output_dir: str | Path, tag: str | None = None,
                    base_model: str | Path | None = None) -> Path:
    """Write a consolidated Hugging Face model (+ tokenizer) from a checkpoint of any ZeRO stage.

    `base_model` supplies the architecture config and tokenizer; by default it is the run's own model
    (`model.path` recorded in the checkpoint, or the embedded model built into <output_dir>/base_model).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model import load_tokenizer

    save_dir = Path(save_dir)
    tag = tag or latest_tag(save_dir)
    if tag is None or not (save_dir / tag).is_dir():
        raise ValueError(f"no committed checkpoint {tag or ''!s} in {str(save_dir)!r}")
    if base_model is None:
        model_states = sorted((save_dir / tag).glob("mp_rank_*_model_states.pt"))
        saved = torch.load(model_states[0], map_location="cpu", weights_only=False) if model_states else {}
        recorded = saved.get("config", {}).get("model", {}).get("path")
        base_model = recorded or save_dir.parent / "base_model"
    base_model = Path(base_model)
    if not (base_model / "config.json").is_file():
        raise ValueError(f"base model {str(base_model)!r} not found; pass --base-model")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model), dtype=torch.float32)
    result = model.load_state_dict(consolidated_state_dict(save_dir, tag), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(f"checkpoint does not match {str(base_model)!r}: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    model.tie_weights()
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    load_tokenizer(base_model).save_pretrained(output_dir)
    return output_dir
