"""`nested-reft bench speculative`: self-speculative sampling against plain full and nested decoding, in one run.

    nested-reft bench speculative --model runs/compare_long/hf_seed1 --config configs/compare_long.yaml \
        [--ratios 0.25,0.5,0.75 --drafts 2,3,4,5,6 --prompts 2 --group-size 8 --repeats 3 --threads 1] \
        [--engine static|static_eager|static_graphs --device cpu|cuda --dtype float32|bfloat16]

Workload: the RL rollout of the config: `--prompts` held-out problems of `--config` (its prompt template), each
sampled `--group-size` times (shared prefill), up to rollout.max_new_tokens tokens, stopping at EOS, at
rollout.temperature; each repeat takes the next prompts. Completions are real, so their lengths differ between
rows and modes: rates are ratios of sums over the repeats (tokens / seconds). A trained model is what makes the
acceptance meaningful (an embedded random model is the default only so the command runs anywhere).

Rows, interleaved within each repeat after an untimed warm-up repeat, every one decoded by `--engine`: `full`
(every layer: ReFT's rollout), `nested` at each skip ratio (the off-policy behaviour model), `speculative` at each
ratio and draft length. Columns:
- tokens/s and x full: completion tokens per second, and over `full`'s: the measured speed-up of speculative
  sampling over sampling the full model directly (the same distribution).
- acceptance a: drafts kept / drafts tested (a row's test stops at its first rejection), the per-token acceptance
  rate of the cost model; tokens/verify: tokens committed per row per verify forward.
- c, v: one drafter step and one verify forward (with the rule and the commit), each over one decode step of
  `full` (`full`'s time / its forwards), from the engine's host timers (`DecodeStats.draft_s`, `verify_s`). On a
  GPU, which runs ahead of the host, c and v are approximate (each phase ends at a host read, but the timers
  split at launch time); tokens/s and x full are exact (a rollout ends with a device read).
- predicted: (1 - a^(g+1)) / ((1 - a) (g c + v)) with the measured a, c, v; predicted (ideal): the same with c the
  kept fraction of the layers and v = 1 (a memory-bound GPU's cost model: a step costs the weights it reads).
- rows/fwd: the batch rows a decode forward (speculative: a round) ran, on average.
- in phases: the share of the speculative rollouts' time spent in the draft and verify phases, which is all the
  formula counts. The rest (the drafter's prefill besides the full model's, the per-round host read, compaction,
  set-up) and fewer rows per round than per full step (long drafts end a rollout in few rounds, more of them in
  its tail where few rows remain) separate x full from predicted.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from ..config import GenerationSettings, ModelConfig, load_config
from ..data import problems_from_config
from ..data.templates import format_prompt
from ..model import build_tiny_model, load_model_and_tokenizer
from ..nested import SkipPlan, sample_skip_plan
from ..rollout import DecodeStats, encode_prompts, generate
from ..speculative import predicted_speedup
from .bench import device_name, skip_ratios_argument


def add_speculative_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="HF checkpoint directory (default: an embedded random 16 x 64 Qwen3)")
    parser.add_argument("--config", default="configs/compare_long.yaml",
                        help="experiment YAML: its held-out problems, prompt template and rollout settings")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the config (repeatable)")
    parser.add_argument("--ratios", type=skip_ratios_argument, default="0.25,0.5,0.75", help="skip ratios")
    parser.add_argument("--drafts", default="2,3,4,5,6", help="comma-separated draft lengths")
    parser.add_argument("--prompts", type=int, default=2, help="problems per rollout")
    parser.add_argument("--group-size", type=int, default=8, help="samples per problem")
    parser.add_argument("--repeats", type=int, default=3, help="timed rollouts per row")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--engine", choices=["static", "static_eager", "static_graphs"], default="static",
                        help="decode engine of every row (static_graphs: CUDA graphs, on a CUDA device)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return parser


def run_speculative_bench(args: argparse.Namespace) -> int:
    try:
        drafts = [int(g) for g in args.drafts.split(",") if g]
    except ValueError:
        raise SystemExit(f"nested-reft bench speculative: --drafts {args.drafts!r} is not a list of integers")
    if not drafts or min(drafts) < 1:
        raise SystemExit(f"nested-reft bench speculative: --drafts must be integers >= 1, got {args.drafts!r}")
    for name in ("prompts", "group_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"nested-reft bench speculative: --{name.replace('_', '-')} must be >= 1")
    if args.engine == "static_graphs" and not args.device.startswith("cuda"):
        raise SystemExit("nested-reft bench speculative: --engine static_graphs needs --device cuda")
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    path = Path(args.model) if args.model else build_tiny_model(
        ModelConfig(arch="qwen3", num_layers=16, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=192),
        tempfile.mkdtemp(), seed=0)
    model, tokenizer = load_model_and_tokenizer(path, dtype=getattr(torch, args.dtype))
    model.to(args.device).eval()
    num_layers = model.config.num_hidden_layers
    _, held_out = problems_from_config(cfg.data, cfg.train.seed)
    needed = args.prompts * (args.repeats + 1)
    if len(held_out) < needed:
        raise SystemExit(f"nested-reft bench speculative: {args.config} holds {len(held_out)} held-out problems; "
                         f"{needed} are needed (--prompts x (--repeats + 1)); raise data.eval_problems with --set")
    settings = GenerationSettings(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                  compact_below=cfg.rollout.compact_below, engine=args.engine)
    plans = {ratio: sample_skip_plan(num_layers, ratio, step=0, seed=cfg.train.seed,
                                     protect_first=cfg.skip.protect_first,
                                     protect_last=cfg.skip.protect_last) for ratio in args.ratios}
    rows = ([("full", 0.0, 0)] + [("nested", ratio, 0) for ratio in args.ratios]
            + [("speculative", ratio, g) for ratio in args.ratios for g in drafts])
    totals = {row: {"tokens": 0, "seconds": 0.0, "stats": DecodeStats()} for row in rows}

    def rollout(row, repeat: int) -> tuple[int, float, DecodeStats]:
        mode, ratio, g = row
        problems = held_out[repeat * args.prompts:(repeat + 1) * args.prompts]
        prompts = [format_prompt(p.question, tokenizer, cfg.data.prompt_template) for p in problems]
        ids, mask = encode_prompts(tokenizer, [p for p in prompts for _ in range(args.group_size)], args.device)
        stats = DecodeStats()
        start = time.perf_counter()
        out = generate(model, ids, mask, SkipPlan(num_layers) if mode == "full" else plans[ratio], settings,
                       draft_length=g, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       seed=repeat, group_size=args.group_size, stats=stats)
        return out.num_completion_tokens, time.perf_counter() - start, stats

    began = time.perf_counter()
    for repeat in range(args.repeats + 1):
        for row in rows:
            tokens, seconds, stats = rollout(row, repeat)
            if repeat:  # the first repeat warms up
                total = totals[row]
                total["tokens"] += tokens
                total["seconds"] += seconds
                total["stats"].add(stats)

    def rate(row) -> float:
        return totals[row]["tokens"] / totals[row]["seconds"]

    full = totals[("full", 0.0, 0)]
    full_step_s = full["seconds"] / (full["stats"].steps + args.repeats)  # decode forwards + one prefill a rollout
    print(f"speculative benchmark: {path}; {args.prompts} problems x G={args.group_size} of {args.config}, up to "
          f"{settings.max_new_tokens} tokens at T={settings.temperature}; engine {args.engine}, {args.dtype} on "
          f"{device_name(args.device, args.threads)}; "
          f"ratio of sums over {args.repeats} repeats; 1-min load {os.getloadavg()[0]:.1f}; "
          f"{time.perf_counter() - began:.0f} s; compilations / graph captures inside the timed repeats: "
          f"{sum(total['stats'].compilations for total in totals.values())} / "
          f"{sum(total['stats'].captures for total in totals.values())} (the warm-up repeat takes the first ones)")
    header = (f"{'mode':<12} {'skip':>4} {'g':>2} {'layers':>6} {'tokens/s':>9} {'x full':>6} {'rows/fwd':>8} "
              f"{'accept':>6} {'tok/verify':>10} {'c':>5} {'v':>5} {'predicted':>9} {'pred.ideal':>10} "
              f"{'in phases':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        mode, ratio, g = row
        layers = num_layers if mode == "full" else len(plans[ratio].kept)
        stats = totals[row]["stats"]
        line = (f"{mode:<12} {ratio:>4.2f} {g or '-':>2} {layers:>6} {rate(row):>9.0f} "
                f"{rate(row) / rate(('full', 0.0, 0)):>6.2f} {stats.row_steps / stats.steps:>8.2f}")
        if mode == "speculative" and stats.verify_passes:
            acceptance = stats.accepted_drafts / stats.tested_drafts  # per token: the formula's a
            committed = totals[row]["tokens"] - args.repeats * args.prompts * args.group_size  # first tokens: prefill
            draft_cost = stats.draft_s / (stats.steps - stats.verify_passes) / full_step_s
            verify_cost = stats.verify_s / stats.verify_passes / full_step_s
            line += (f" {acceptance:>6.3f} {committed / stats.verified_rows:>10.2f} {draft_cost:>5.2f} "
                     f"{verify_cost:>5.2f} {predicted_speedup(acceptance, g, draft_cost, verify_cost):>9.2f} "
                     f"{predicted_speedup(acceptance, g, layers / num_layers):>10.2f} "
                     f"{(stats.draft_s + stats.verify_s) / totals[row]['seconds']:>9.2f}")
        print(line)
    return 0
