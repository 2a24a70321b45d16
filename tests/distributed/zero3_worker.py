"""Every multi-rank ZeRO-3 check in one launch (DeepSpeed start-up is the expensive part on CPU).

Training runs: (1) 3 steps with the default estimator (token_tis), checkpointing every step, (2) a resume of it,
(6) 2 steps with correction=seq_is and KL to a frozen reference (a ZeRO-3 inference engine), every parameter
partitioned, (7) a resume of that one from its step-1 checkpoint (the reference restored from partitions), (7b) 2 steps
with the KL penalty in the reward and the kept-token normaliser, and
(8) run 1's RL phase once per rollout mode (once / streamed / auto forced to stream), (9) run 1 at ZeRO-0 (the
built-in config), and (10) `nested-reft eval` sharded with ZeRO-3 in streamed mode.

Run by tests/test_distributed.py as `deepspeed --num_gpus 2 tests/distributed/zero3_worker.py --out DIR`; each
rank writes DIR/rank<r>.json, which the tests assert on. Nothing is mocked: real engine, real ZeRO-3, gloo.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

import nested_reft_ds.recipes.train as train
from nested_reft_ds.recipes import evaluate
from nested_reft_ds import engine as ds
from nested_reft_ds.config import load_config
from nested_reft_ds.engine.gather import zero3_coordinator
from nested_reft_ds.model import load_model_and_tokenizer
from nested_reft_ds.nested import SkipPlan
from nested_reft_ds.rollout import generate

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=32", "model.num_layers=6", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "rollout.prompts_per_step=4", "rollout.group_size=2",
        "rollout.max_new_tokens=20", "train.micro_batch_size=2", "train.sft_steps=30", "train.sft_lr=0.01",
        "data.min_operand=0", "data.max_operand=1", "train.steps=3",
        "train.save_every=1", "data.num_problems=32", "data.eval_problems=4", "logging.tensorboard=false",
        "logging.progress_bar=false", "train.lr=1e-3", "train.keep_checkpoints=0",
        # Adaptive ratio + learned layer choice: plans depend on all-reduced statistics and scheduler state,
        # so equal plans across ranks and an exact replay after resume both test that state end to end.
        "skip.schedule=adaptive", "skip.strategy=learned", "skip.ratio=0.34", "skip.ratio_min=0.17",
        "skip.ratio_max=0.5", "skip.step_size=0.17", "skip.target_ess=0.999"]


# What each recorded RL step keeps: the estimator's diagnostics, and kl_ref when a reference exists.
RECORDED = ("skipped_layers", "loss", "train_packed_micro_batches", "longest_completion_min", "longest_completion_max", "rollout_lockstep", "reward_mean", "completion_length", "grad_norm", "pg_loss", "ess",
            "ess_seq_raw", "ess_tok_raw", "frac_truncated", "frac_masked", "kl_behavior_k1", "kl_behavior_k3",
            "accept", "weight_mean", "nonfinite_count", "kl_ref", "kl_penalty_mean", "spec_acceptance",
            "spec_tokens_per_verify", "spec_predicted_speedup", "spec_draft_length",
            *(f"layer_cost/{layer}" for layer in range(6)),  # the learned strategy's per-layer costs (TINY: 6 layers)
            *(f"ratio_{unit}_{stat}" for unit in ("tok", "seq") for stat in ("mean", "min", "max", "p10", "p50", "p90")))


def eval_arguments(model: Path, output: Path) -> list[str]:
    """5 synthetic problems in chunks of 2 (3 chunks: on 2 ranks one rank balances the last round), sampled, with a
    nested row whose behaviour-target KL is scored by extra full-model forwards."""
    return ["--model", str(model), "--benchmarks", "synthetic", "--limit", "5", "--samples", "2", "--temperature",
            "1.0", "--max-new-tokens", "40", "--batch-size", "4", "--skip-ratios", "0,0.34", "--output", str(output)]


def record_rl_steps(records: list) -> None:
    """Wrap the real rl_step to keep what this rank saw at each step (the skip plan is this rank's own)."""
    real_step = train.rl_step

    def recording(*args, **kwargs):
        metrics = real_step(*args, **kwargs)
        records.append({key: metrics[key] for key in RECORDED if key in metrics} | {"step": args[1]})
        return metrics

    train.rl_step = recording


def start_from_warm_up(out: Path, run_dir: Path, rank: int) -> None:
    """Lay out `run_dir` as a run resuming from run 1's SFT checkpoint (its base model and sft_step30). Collective."""
    if rank == 0:
        shutil.copytree(out / "run_a" / "base_model", run_dir / "base_model")
        shutil.copytree(out / "run_a" / "checkpoints" / "sft_step30", run_dir / "checkpoints" / "sft_step30")
        (run_dir / "checkpoints" / "latest").write_text("sft_step30")
    ds.barrier()


def statuses(layers) -> list[list[str]]:
    return [sorted({p.ds_status.name for p in layer.parameters()}) for layer in layers]


def record_references(built: list) -> None:
    """Keep every reference train.run builds (it calls ds.build_reference), to inspect it afterwards."""
    real_build = ds.build_reference

    def recording(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    ds.build_reference = recording


def describe_reference(reference) -> dict:
    params = list(reference.module.parameters())
    return {"zero_stage": reference.zero_optimization_stage(), "optimizer": type(reference.optimizer).__name__,
            "statuses": sorted({p.ds_status.name for p in params}), "requires_grad": any(p.requires_grad for p in params),
            "grads": any(p.grad is not None for p in params), "training": reference.module.training}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)
    out = Path(parser.parse_args().out)
    rank, world = ds.init_distributed()
    result: dict = {"world": world}
    zero3 = str(REPO / "ds_configs" / "zero3.json")

    # 1. A continuous 3-step run, checkpointing every step.
    records_a: list = []
    record_rl_steps(records_a)
    cfg_a = load_config(None, TINY + [f"train.output_dir={out}/run_a"])
    result["summary_a"] = train.run(cfg_a, zero3, resume="none")
    result["steps_a"] = list(records_a)

    # 2. Resume from the step-2 checkpoint in a fresh directory: step 2 must replay exactly.
    if rank == 0:
        run_b = out / "run_b"
        shutil.copytree(out / "run_a" / "base_model", run_b / "base_model")
        shutil.copytree(out / "run_a" / "checkpoints" / "rl_step2", run_b / "checkpoints" / "rl_step2")
        (run_b / "checkpoints" / "latest").write_text("rl_step2")
    ds.barrier()
    records_a.clear()
    cfg_b = load_config(None, TINY + [f"train.output_dir={out}/run_b"])
    train.run(cfg_b, zero3, resume="auto")
    result["steps_b"] = list(records_a)

    # 3. Gather-once invariants on a fresh engine with every parameter partitioned (persistence threshold 0).
    ds_config = ds.fill_ds_config(ds.load_ds_config(zero3, cfg_a), cfg_a, world)
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    base = out / "run_a" / "base_model"
    reference, tokenizer = load_model_and_tokenizer(base, "sdpa")  # plain, unsharded copy of the same weights
    model, _ = ds.load_model_for_engine(base, ds_config, "sdpa")
    engine = ds.build_engine(model, ds_config)
    layers = engine.module.model.layers
    coordinator = zero3_coordinator(engine)
    hooks_before = [len(coordinator.forward_hooks), len(coordinator.backward_hooks)]
    prompts = [f"Question: {rank + 3}+{rank + 4}?", "Q: 5-2?"]
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    plan = SkipPlan(6, (1, 2))
    kwargs = dict(max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  greedy=True)
    with ds.skip_aware_gather(engine, plan) as gathered:
        result["status_inside"] = statuses(layers)
        result["embed_status_inside"] = engine.module.model.embed_tokens.weight.ds_status.name
        nested_tokens = generate(gathered, enc.input_ids, enc.attention_mask, plan, **kwargs).sequences
        result["hooks_inside"] = sum(len(m._forward_pre_hooks) for m in layers)
    result["status_after"] = statuses(layers)
    result["hooks_after"] = [len(coordinator.forward_hooks), len(coordinator.backward_hooks)]
    result["hooks_before"] = hooks_before
    expected = generate(reference.eval(), enc.input_ids, enc.attention_mask, plan, **kwargs).sequences
    result["tokens_match_plain_model"] = bool(torch.equal(nested_tokens, expected))

    # 4. Ranks holding different plans: a clear error on every rank, never a hang.
    mismatched = SkipPlan(6, (1,)) if rank == 0 else SkipPlan(6, (2,))
    try:
        with ds.skip_aware_gather(engine, mismatched):
            result["mismatch"] = "entered"
    except RuntimeError as err:
        result["mismatch"] = str(err)

    # 5. An exception inside generation: hooks and partitioning restored, and training goes on.
    try:
        with ds.skip_aware_gather(engine, plan):
            raise KeyError("failure inside generation")
    except KeyError:
        pass
    result["status_after_error"] = statuses(layers)
    result["hooks_after_error"] = [len(coordinator.forward_hooks), len(coordinator.backward_hooks)]
    problems, _ = train.problems_from_config(cfg_a.data, cfg_a.train.seed)
    skip = train.SkipScheduler(cfg_a.skip, 6, cfg_a.train.seed)
    metrics = train.rl_step(train.StepContext(engine, tokenizer, cfg_a, problems, skip, rank, world), 0)
    result["loss_after_error"] = metrics["loss"]
    result["loss_after_error_finite"] = math.isfinite(metrics["loss"])

    # 6. seq_is (capped) + KL to a frozen reference under ZeRO-3 with every parameter partitioned (persistence
    # threshold 0: the reference engine really fetches and releases each layer). RL starts from run 1's SFT
    # checkpoint, so the reference is the warmed-up policy and its KL is ~0 at the first step.
    kl_config = out / "zero3_partitioned.json"
    run_c = out / "run_c"
    if rank == 0:
        partitioned = json.loads(Path(zero3).read_text())
        partitioned["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        kl_config.write_text(json.dumps(partitioned))
        shutil.copytree(out / "run_a" / "base_model", run_c / "base_model")
        shutil.copytree(out / "run_a" / "checkpoints" / "sft_step30", run_c / "checkpoints" / "sft_step30")
        (run_c / "checkpoints" / "latest").write_text("sft_step30")
    ds.barrier()
    # A cap of 1.2 sits inside the spread of sequence ratios this tiny model produces, so truncation happens.
    kl_overrides = ["train.steps=2", "algorithm.correction=seq_is", "algorithm.is_cap=1.2", "algorithm.kl_coef=0.1"]
    references: list = []
    record_references(references)
    records_a.clear()
    cfg_c = load_config(None, TINY + kl_overrides + [f"train.output_dir={run_c}"])
    train.run(cfg_c, str(kl_config), resume="auto")
    result["steps_kl"] = list(records_a)
    result["reference_kl"] = describe_reference(references[-1])
    result["reference_files_kl"] = sorted(p.name for p in (run_c / "checkpoints" / "rl_step1" / "reference").iterdir())

    # 7. Resume that run from its step-1 checkpoint: the reference comes back from the saved partitions.
    run_d = out / "run_d"
    if rank == 0:
        shutil.copytree(run_c / "base_model", run_d / "base_model")
        shutil.copytree(run_c / "checkpoints" / "rl_step1", run_d / "checkpoints" / "rl_step1")
        (run_d / "checkpoints" / "latest").write_text("rl_step1")
    ds.barrier()
    records_a.clear()
    cfg_d = load_config(None, TINY + kl_overrides + [f"train.output_dir={run_d}"])
    train.run(cfg_d, str(kl_config), resume="auto")
    result["steps_kl_resumed"] = list(records_a)
    result["reference_kl_resumed"] = describe_reference(references[-1])
    result["references_built"] = len(references)

    # 7b. The KL penalty in the reward and the kept-token normaliser: pi_prox and the reference are scored before the
    # update (collective no-grad forwards under ZeRO-3, every parameter partitioned), from run 1's SFT checkpoint.
    run_e = out / "run_kl_in_reward"
    start_from_warm_up(out, run_e, rank)
    records_a.clear()
    cfg_e = load_config(None, TINY + ["train.steps=2", "algorithm.kl_coef=0.1", "algorithm.kl_in_reward=true",
                                      "algorithm.correction=token_mis", "algorithm.normalize_over=kept_tokens",
                                      "train.save_every=0", f"train.output_dir={run_e}"])
    train.run(cfg_e, str(kl_config), resume="auto")
    result["steps_kl_in_reward"] = list(records_a)

    # 8. The RL phase of run 1 again from its SFT checkpoint, once per rollout mode: gather-once, streamed (ZeRO-3
    # hooks on, lockstep decoding) and auto forced to stream, with every parameter partitioned (run 6's config,
    # persistence threshold 0: this tiny model would otherwise stay resident whole). 5 held-out problems give the ranks unequal eval
    # shards (3 and 2), so streamed greedy eval must pad; each run writes its rl_step3 checkpoint. Then gather-once
    # again with every exact saving off (no decode compaction, no shared prefill, consecutive micro-batches, the
    # plain training layout): the runs above score each prompt group packed (the shared-prompt forward pays at
    # these lengths), through the model's own head (ZeRO-3).
    for mode, overrides in (("once", ["rollout.gather=once"]), ("streamed", ["rollout.gather=streamed"]),
                            ("auto", ["rollout.gather=auto", "rollout.gather_memory_fraction=1e-12"]),
                            ("savings_off", ["rollout.gather=once", "train.shared_prompt_forward=never",
                                             "rollout.compact_below=0", "rollout.shared_prefill=false",
                                             "train.bucket_by_length=false"])):
        run_dir = out / f"mode_{mode}"
        start_from_warm_up(out, run_dir, rank)
        records_a.clear()
        # 40 new tokens: at step 0 the ranks' longest completions end at 34 and 39 (at 20 both are cut at 20).
        # The reference engine in every mode: streamed decoding always runs it, so gather-once with it gives the
        # same bits (the static engine's agreement with it is tests/test_decode_entry_points.py's).
        cfg_mode = load_config(None, TINY + overrides + [f"train.output_dir={run_dir}", "data.eval_problems=5",
                                                         "rollout.max_new_tokens=40", "rollout.engine=reference"])
        result[f"summary_mode_{mode}"] = train.run(cfg_mode, str(kl_config), resume="auto")
        result[f"steps_mode_{mode}"] = list(records_a)

    # 8b. Speculative rollouts (rollout.mode=speculative) under ZeRO-3 gather-once with every parameter partitioned:
    # the verifier runs every layer, so all are gathered; the drafter is the step's nested model. The draft length
    # is adaptive: step 1's is chosen from step 0's all-reduced acceptance.
    run_spec = out / "mode_speculative"
    start_from_warm_up(out, run_spec, rank)
    records_a.clear()
    cfg_spec = load_config(None, TINY + [f"train.output_dir={run_spec}", "rollout.mode=speculative",
                                         "rollout.draft_length=3", "rollout.adaptive_draft=true",
                                         "rollout.max_draft_length=6", "skip.schedule=fixed", "skip.ratio=0.5",
                                         "algorithm.correction=none", "train.steps=2", "train.save_every=0",
                                         "rollout.max_new_tokens=40"])
    result["summary_mode_speculative"] = train.run(cfg_spec, str(kl_config), resume="auto")
    result["steps_mode_speculative"] = list(records_a)

    # 9. Run 1 again at ZeRO-0 (the built-in config: whole fp32 parameters, gradients all-reduced), where DeepSpeed
    # clips without keeping the gradient norm and `engine.optimizer_step` computes it from the reduced gradients.
    records_a.clear()
    cfg_zero0 = load_config(None, TINY + [f"train.output_dir={out}/run_zero0", "train.zero_stage=0",
                                          "train.save_every=0"])
    train.run(cfg_zero0, None, resume="none")
    result["steps_zero0"] = list(records_a)

    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))

    # 10. `nested-reft eval` sharded with ZeRO-3 (every parameter partitioned) and streamed decoding, on run 1's final
    # model; tests/test_distributed.py compares it with a plain single-process eval. Last: it ends the process group.
    hf = out / "hf_a"
    if rank == 0:
        ds.export_hf_model(out / "run_a" / "checkpoints", hf)
    ds.barrier()
    code = evaluate.main(eval_arguments(hf, out / "eval_streamed.json")
                         + ["--deepspeed", str(kl_config), "--gather", "streamed"])
    (out / f"eval_rank{rank}.code").write_text(str(code))


if __name__ == "__main__":
    main()
