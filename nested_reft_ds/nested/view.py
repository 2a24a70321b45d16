"""`nested_view(model, plan)`: the behaviour model as a view of the target with some decoder layers bypassed.

Skipped layers are not called at all (the residual stream passes straight to the next kept layer), which
matters under ZeRO-3: calling a layer would fetch its partitioned parameters. The view swaps the decoder's
layer list for the kept layers only and, for the duration, renumbers each kept attention's `layer_idx` and
patches `num_hidden_layers` / `layer_types`: transformers sizes the KV cache from the configured layer count
and reads the cache length from slot 0, so keeping the original indices (e.g. skipping layer 0) would make
attention read an empty slot and silently produce wrong tokens.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .plan import SkipPlan


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the decoder-layer ModuleList of a HF causal LM."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = config.num_hidden_layers
    for parent_name in ("model", "model.language_model", "transformer", "gpt_neox"):
        parent = model
        for part in parent_name.split("."):
            parent = getattr(parent, part, None)
        for attr in ("layers", "h"):
            layers = getattr(parent, attr, None) if parent is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers) == num_layers:
                return parent, attr
    raise ValueError(f"cannot find the {num_layers} decoder layers of {type(model).__name__}; "
                     "nested views support Llama/Qwen2/Qwen3/Mistral-style `model.layers`")


@contextmanager
def nested_view(model: nn.Module, plan: SkipPlan) -> Iterator[nn.Module]:
    """Within the block, `model` computes with only `plan.kept` decoder layers (the KV cache stays consistent)."""
    parent, attr = decoder_layers(model)
    layers = getattr(parent, attr)
    if len(layers) != plan.num_layers:
        raise ValueError(f"skip plan is for {plan.num_layers} layers but the model has {len(layers)}")
    if not plan.skipped:
        yield model
        return
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    saved_num_layers = config.num_hidden_layers
    saved_layer_types = getattr(config, "layer_types", None)
    # Every submodule carrying a layer index (attention, and some decoder layers) is renumbered.
    indexed = [(module, module.layer_idx) for i in plan.kept for module in layers[i].modules()
               if isinstance(getattr(module, "layer_idx", None), int)]
    try:
        setattr(parent, attr, nn.ModuleList([layers[i] for i in plan.kept]))
        position = {old: new for new, old in enumerate(plan.kept)}
        for module, old_idx in indexed:
            module.layer_idx = position[old_idx]
        config.num_hidden_layers = len(plan.kept)
        if saved_layer_types is not None:
            config.layer_types = [saved_layer_types[i] for i in plan.kept]
        yield model
    finally:
        setattr(parent, attr, layers)
        for module, old_idx in indexed:
            module.layer_idx = old_idx
        config.num_hidden_layers = saved_num_layers
        if saved_layer_types is not None:
            config.layer_types = saved_layer_types
