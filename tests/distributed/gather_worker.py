"""Every multi-rank check of the rollout gather modes (once / streamed / auto) in one launch.

Run by tests/test_gather_modes.py as `deepspeed --num_gpus 2 tests/distributed/gather_worker.py --out DIR`; each
rank writes DIR/rank<r>.json and the tests assert on it. Real engines, real ZeRO-3 over gloo; collectives are
counted by wrapping torch.distributed before DeepSpeed starts (recipes/comm_stats.py), parameter fetches by
wrapping each parameter's gather entry points, and parameter states are sampled before every module forward.

Engines: A (ZeRO-3, never rolls out) and B (ZeRO-3, same weights, same training batches, rolls out in every
mode between its steps) must produce bitwise-equal losses and identical collectives at every step; C is
ZeRO-3 with parameters and optimizer offloaded to CPU; D is ZeRO-2 (gathering is a no-op).

Decoding runs the reference engine (`engine="reference"`): these checks count and sample the model's own forwards,
which the static engine does not call per step (its gather-once exactness is tests/test_decode_entry_points.py's).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from nested_reft_ds.recipes import comm_stats

comm_stats.install()  # before DeepSpeed's comm layer caches torch.distributed's functions

import torch  # noqa: E402
from deepspeed.runtime.zero import parameter_offload  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from nested_reft_ds import engine as ds  # noqa: E402
from nested_reft_ds.config import ModelConfig, load_config  # noqa: E402
from nested_reft_ds.engine import gather  # noqa: E402
from nested_reft_ds.engine.gather import lockstep_for, skip_aware_gather, zero3_coordinator  # noqa: E402
from nested_reft_ds.model import build_tiny_model, load_model_and_tokenizer  # noqa: E402
from nested_reft_ds.nested import SkipPlan  # noqa: E402
from nested_reft_ds.rollout import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LAYERS = 6
PLANS = {"mid": SkipPlan(LAYERS, (1, 3)), "no_layer0": SkipPlan(LAYERS, (0, 2))}
MAX_NEW = 10
# Norms and biases (<= 64 elements) stay persistent, as with real models; weight matrices are partitioned.
PERSISTENCE = 64


def engine_for(ds_json: str, base: Path, world: int, persistence: int | None):
    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.group_size=2", "train.micro_batch_size=2",
                             "train.lr=1e-2"])
    config = ds.fill_ds_config(ds.load_ds_config(REPO / "ds_configs" / ds_json, cfg), cfg, world)
    if persistence is not None:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = persistence
    model, _ = ds.load_model_for_engine(base, config, "sdpa")
    return ds.build_engine(model, config)


def train_step(engine, rank: int, step: int) -> dict:
    """One forward/backward/step on this rank's batch for `step`; the loss and the collectives it ran."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    ids = torch.randint(2, engine.module.config.vocab_size, (2, 12), generator=generator)
    engine.train()
    with comm_stats.record() as comm:
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    return {"loss": loss.item(), "comm": comm.as_dict()}


def prompts(rank: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts, different on each rank."""
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(2, vocab, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    return ids, mask


def pruned_copy(reference: nn.Module, plan: SkipPlan) -> nn.Module:
    """A physically smaller model holding only the kept layers (weights copied, layers renumbered)."""
    config = reference.config.__class__.from_dict(reference.config.to_dict())
    config.num_hidden_layers = len(plan.kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [reference.config.layer_types[i] for i in plan.kept]
    pruned = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    position = {str(old): str(new) for new, old in enumerate(plan.kept)}
    state = {}
    for key, value in reference.state_dict().items():
        parts = key.split(".")
        if key.startswith("model.layers."):
            if parts[2] not in position:
                continue
            parts[2] = position[parts[2]]
        state[".".join(parts)] = value
    pruned.load_state_dict(state, strict=True)
    return pruned.eval()


class Probe:
    """Records, before every module forward, the states of the skipped layers' parameters; counts forwards of
    the root; logs the ds_id of every parameter anybody asks DeepSpeed to gather (all entry points)."""

    def __init__(self, model: nn.Module, raise_at_forward: int | None = None, raise_in: nn.Module | None = None):
        self.model, self.skipped, self.seen, self.fetched, self.forwards = model, [], {}, [], 0
        self.raise_at_forward, self.raise_in = raise_at_forward, raise_in
        self.handles = [m.register_forward_pre_hook(self._before) for m in model.modules()]
        self.handles.append(model.register_forward_pre_hook(self._count))
        for param in model.parameters():
            if hasattr(param, "ds_id") and not hasattr(param, "_probe_wrapped"):
                param._probe_wrapped = True
                param.all_gather_coalesced = self._logging(param.all_gather_coalesced, lambda a, k: a[0])
                param.all_gather = self._logging(param.all_gather, lambda a, k, p=param: k.get("param_list") or [p])

    def _logging(self, fn, params_of):
        def wrapper(*args, **kwargs):
            probe = self.model._gather_probe
            if probe is not None:
                probe.fetched.extend(p.ds_id for p in params_of(args, kwargs))
            return fn(*args, **kwargs)
        return wrapper

    def watch(self, skipped_params) -> dict[int, str]:
        """Start logging; returns the skipped parameters' states now (ds_id -> status)."""
        self.skipped = [p for p in skipped_params if hasattr(p, "ds_status")]
        self.model._gather_probe = self
        return {p.ds_id: p.ds_status.name for p in self.skipped}

    def _count(self, module, args):
        self.forwards += 1

    def _before(self, module, args):
        for param in self.skipped:
            self.seen.setdefault(param.ds_id, set()).add(param.ds_status.name)
        if module is self.raise_in and self.forwards == self.raise_at_forward:
            raise KeyError("failure inside decoding")

    def close(self):
        self.model._gather_probe = None
        for handle in self.handles:
            handle.remove()


def rollout(engine, plan: SkipPlan, mode: str, rank: int, eos, *, use_cache: bool = True,
            raise_at_forward: int | None = None, max_new: int = MAX_NEW) -> dict:
    """One greedy rollout in `mode` with everything measured."""
    model = engine.module
    layers = model.model.layers
    skipped = [p for i in plan.skipped for p in layers[i].parameters()]
    kept_partitioned = [p for p in gather.kept_parameters(model, plan)
                        if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
    raise_in = layers[plan.kept[2]] if raise_at_forward else None
    model._gather_probe = None
    probe = Probe(model, raise_at_forward, raise_in)
    ids, mask = prompts(rank, model.config.vocab_size)
    record: dict = {"mode": mode}
    engine.eval()
    entry = probe.watch(skipped)
    try:
        with comm_stats.record() as context_comm, skip_aware_gather(engine, plan, mode) as gathered:
            record["lockstep"] = lockstep_for(gathered) is not None
            record["zero_hooks_inside"] = sum(len(layers[i]._forward_pre_hooks) for i in plan.kept) - len(plan.kept)
            with comm_stats.record() as decode_comm:
                out = generate(gathered, ids, mask, plan, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0,
                               greedy=True, use_cache=use_cache, all_ranks_done=lockstep_for(gathered),
                               engine="reference")
            record.update(completions=out.completions.tolist(), completion_mask=out.completion_mask.tolist(),
                          logprobs=out.behavior_logprobs.tolist(), decode_comm=decode_comm.as_dict())
    except KeyError as err:
        record["error"] = str(err)
    finally:
        probe.close()
    record.update(context_comm=context_comm.as_dict(), forwards=probe.forwards,
                  # States of skipped parameters seen during the rollout that differ from their state at entry.
                  skipped_changed={i: sorted(seen) for i, seen in probe.seen.items() if seen != {entry[i]}},
                  skipped_probed=len(probe.seen), skipped_entry=sorted(set(entry.values())),
                  skipped_ids=sorted(entry),
                  fetched_ids=sorted(set(probe.fetched)),
                  kept_partitioned_ids=sorted(p.ds_id for p in kept_partitioned),
                  expected_gather_bytes=sum(p.ds_tensor.ds_numel * p.ds_tensor.element_size() for p in kept_partitioned)
                  * torch.distributed.get_world_size(),
                  kept_partitioned_bytes=sum(p.ds_numel * p.ds_tensor.element_size() for p in kept_partitioned))
    return record


class AutoLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def state_of(engine) -> dict:
    """Everything a rollout must put back: parameter states, hooks (objects and order), coordinator, trace."""
    model = engine.module
    out = {"statuses": [p.ds_status.name for p in model.parameters()] if engine.zero_optimization_stage() == 3 else [],
           "hooks": [[id(h) for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
                     for m in model.modules()],
           "layer_idx": [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)],
           "num_hidden_layers": model.config.num_hidden_layers, "num_layer_objects": len(model.model.layers)}
    if engine.zero_optimization_stage() == 3:
        coordinator = zero3_coordinator(engine).get_param_coordinator()
        out.update(coordinator=id(coordinator), trace=coordinator._PartitionedParameterCoordinator__trace_mode.name,
                   inflight=len(model.ds_inflight_param_registry), stack=len(parameter_offload.FWD_MODULE_STACK),
                   active=sum(len(p.ds_active_sub_modules) for p in model.parameters()),
                   # Non-persistent parameters DeepSpeed's trace left gathered after the last step.
                   resident=[n for n, p in model.named_parameters()
                             if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)
    out = Path(parser.parse_args().out)
    started = time.process_time()
    rank, world = ds.init_distributed()
    base = out / "base"
    if rank == 0:
        build_tiny_model(ModelConfig(num_layers=LAYERS, hidden_size=32, num_heads=2, num_kv_heads=1,
                                     intermediate_size=64), base, seed=0)
    ds.barrier()
    reference, _ = load_model_and_tokenizer(base, "sdpa")
    reference.eval()
    ids, mask = prompts(rank, reference.config.vocab_size)
    result: dict = {"world": world, "expected": {}, "pruned": {}}
    # Rank 0's rows stop at their first token, rank 1's run to MAX_NEW: very different completion lengths.
    first = generate(reference, ids, mask, PLANS["mid"], max_new_tokens=1, eos_token_id=-1, pad_token_id=0,
                     greedy=True, engine="reference").completions[:, 0].tolist()
    eos = first if rank == 0 else [-1]
    result["eos"] = eos
    for name, plan in PLANS.items():
        pruned = pruned_copy(reference, plan)
        result["pruned"][name] = generate(pruned, ids, mask, SkipPlan(len(plan.kept)), max_new_tokens=MAX_NEW,
                                          eos_token_id=eos, pad_token_id=0, greedy=True,
                                          engine="reference").completions.tolist()
        expected = generate(reference, ids, mask, plan, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0,
                            greedy=True, engine="reference")
        result["expected"][name] = {"completions": expected.completions.tolist(),
                                    "logprobs": expected.behavior_logprobs.tolist()}

    # 1. ZeRO-3 engines A (no rollouts) and B (rollouts in every mode between steps); weights == base here.
    engine_a = engine_for("zero3.json", base, world, PERSISTENCE)
    engine_b = engine_for("zero3.json", base, world, PERSISTENCE)
    result["state_fresh"] = state_of(engine_b)
    rollouts = result["rollouts"] = {}
    for name, plan in PLANS.items():
        for mode in ("once", "streamed"):
            rollouts[f"{mode}_{name}"] = rollout(engine_b, plan, mode, rank, eos)
    rollouts["once_nocache"] = rollout(engine_b, PLANS["no_layer0"], "once", rank, eos, use_cache=False)
    auto_log = AutoLog()
    logging.getLogger(gather.__name__).addHandler(auto_log)
    logging.getLogger(gather.__name__).setLevel(logging.INFO)
    rollouts["auto"] = rollout(engine_b, PLANS["mid"], "auto", rank, eos)
    real_free = gather.free_device_memory
    if rank == 1:  # one rank short of memory: every rank must agree on streamed (all-reduce MIN)
        gather.free_device_memory = lambda dev: 1
    rollouts["auto_low_memory"] = rollout(engine_b, PLANS["mid"], "auto", rank, eos)
    gather.free_device_memory = real_free
    result["auto_log"] = auto_log.messages
    # Calling the full model inside gather-once (forgetting the nested view) must fail, not gather silently.
    with skip_aware_gather(engine_b, PLANS["mid"]) as gathered, comm_stats.record() as comm:
        try:
            gathered(input_ids=ids, attention_mask=mask)
            result["full_forward_inside_once"] = "ran"
        except RuntimeError as err:
            result["full_forward_inside_once"] = str(err)
    result["full_forward_inside_once_comm"] = comm.total_calls
    result["state_after_rollouts"] = state_of(engine_b)

    steps_a, steps_b, between = [], [], []
    for step in range(5):
        steps_a.append(train_step(engine_a, rank, step))
        if step >= 2:  # the trace is recorded at step 0 and complete from step 1
            kind = ("once", "streamed", "errors")[step - 2]
            if kind == "errors":
                between.append(rollout(engine_b, PLANS["mid"], "once", rank, eos, raise_at_forward=3))
                between.append(rollout(engine_b, PLANS["mid"], "streamed", rank, eos, raise_at_forward=3))
                # A single forward: the rollout coordinator never completes its trace (it records).
                between.append(rollout(engine_b, PLANS["mid"], "streamed", rank, eos, max_new=1))
            else:
                between.append(rollout(engine_b, PLANS["mid"], kind, rank, eos))
            result[f"state_before_step{step}"] = state_of(engine_b)
        steps_b.append(train_step(engine_b, rank, step))
    result.update(steps_a=steps_a, steps_b=steps_b, between_steps=between,
                  state_a_end=state_of(engine_a), state_b_end=state_of(engine_b))

    mismatched = SkipPlan(LAYERS, (1,)) if rank == 0 else SkipPlan(LAYERS, (2,))
    try:
        with skip_aware_gather(engine_b, mismatched, "streamed"):
            result["mismatch_streamed"] = "entered"
    except RuntimeError as err:
        result["mismatch_streamed"] = str(err)
    del engine_a, engine_b

    # 2. ZeRO-3 with parameters (and optimizer) offloaded to CPU: same tokens; a training step after a
    #    rollout runs the same collectives as the one before it.
    engine_c = engine_for("zero3_offload.json", base, world, PERSISTENCE)
    result["offload"] = {mode: rollout(engine_c, PLANS["mid"], mode, rank, eos) for mode in ("once", "streamed")}
    offload_steps = [train_step(engine_c, rank, step) for step in range(3)]
    result["offload"]["rollout_after_training"] = rollout(engine_c, PLANS["mid"], "once", rank, eos)
    offload_steps.append(train_step(engine_c, rank, 3))
    result["offload"]["steps"] = offload_steps
    del engine_c

    # 3. ZeRO-2: every mode only checks the plan.
    engine_d = engine_for("zero2.json", base, world, None)
    result["zero2"] = {mode: rollout(engine_d, PLANS["mid"], mode, rank, eos) for mode in ("once", "streamed", "auto")}
    result["cpu_seconds"] = time.process_time() - started
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
