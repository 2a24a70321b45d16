"""`nested-reft bench`: rollout throughput of the nested behaviour model vs the full target, in one run.

Prints a table of generated tokens/s per skip ratio and the speed-up ratio over ratio 0 (the ReFT baseline).
Ratios, not absolute numbers, are what carry across machines: the same prompts, lengths and model are used
for every row, rows are interleaved over repeats, and the median is reported.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from .config import ModelConfig
from .data import synthetic_problems
from .data.templates import format_prompt
from .model import build_tiny_model, load_model_and_tokenizer
from .nested import sample_skip_plan
from .rollout import generate


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="HF checkpoint directory (default: an embedded model, see --layers)")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers of the embedded model")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--ratios", default="0,0.25,0.5", help="comma-separated skip ratios")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return parser


def run_bench(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    path = args.model
    if path is None:
        path = build_tiny_model(ModelConfig(num_layers=args.layers, hidden_size=args.hidden_size,
                                            intermediate_size=3 * args.hidden_size), tempfile.mkdtemp(), seed=0)
    model, tokenizer = load_model_and_tokenizer(path, dtype=dtype)
    model.to(args.device).eval()
    problems = synthetic_problems(args.batch_size, seed=0)
    enc = tokenizer([format_prompt(p.question, tokenizer) for p in problems], padding=True, return_tensors="pt")
    ids, mask = enc.input_ids.to(args.device), enc.attention_mask.to(args.device)
    num_layers = model.config.num_hidden_layers
    ratios = [float(r) for r in args.ratios.split(",")]
    # A fixed-length decode (EOS never ends it) so every row does the same work.
    never = -1
    samples: dict[float, list[float]] = {r: [] for r in ratios}
    for repeat in range(args.repeats + 1):
        for ratio in ratios:
            plan = sample_skip_plan(num_layers, ratio, step=repeat, seed=0)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            generate(model, ids, mask, plan, max_new_tokens=args.new_tokens, eos_token_id=never,
                     pad_token_id=tokenizer.pad_token_id, generator=torch.Generator(args.device).manual_seed(repeat))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if repeat:  # repeat 0 warms up
                samples[ratio].append(args.batch_size * args.new_tokens / (time.perf_counter() - start))
    base = statistics.median(samples[ratios[0]])
    print(f"model {path} | {num_layers} layers | batch {args.batch_size} x {args.new_tokens} new tokens | "
          f"{args.device} {args.dtype} | median of {args.repeats}")
    print(f"{'skip ratio':>10} {'layers run':>10} {'tokens/s':>10} {'speed-up':>9}")
    for ratio in ratios:
        kept = num_layers - len(sample_skip_plan(num_layers, ratio, 0, 0).skipped)
        rate = statistics.median(samples[ratio])
        print(f"{ratio:>10.2f} {kept:>10d} {rate:>10.0f} {rate / base:>8.2f}x")
    return 0
