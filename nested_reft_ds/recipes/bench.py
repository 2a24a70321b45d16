"""`nested-reft bench [nested]`: rollout throughput of the nested behaviour model vs the full target, in one run.

Prints a table of generated tokens/s per skip ratio and the speed-up ratio over ratio 0 (the ReFT baseline).
Ratios, not absolute numbers, are what carry across machines: the same prompts, lengths and model are used
for every row, rows are interleaved over repeats, and the median is reported. One process, no DeepSpeed;
`nested-reft bench rollout` (bench_rollout.py) measures the same under ZeRO-3 on 2 ranks.

The helpers below (arguments, embedded model, fixed-length decoding, ideal speed-up) are shared by both.
"""
from __future__ import annotations

import argparse
import ctypes
import platform
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import torch

from ..config import GenerationSettings, ModelConfig
from ..data import synthetic_problems
from ..data.templates import format_prompt
from ..model import build_tiny_model, load_model_and_tokenizer
from ..nested import SkipPlan, decoder_layers, parse_skip_ratios, sample_skip_plan
from ..rollout import ENGINES, encode_prompts, generate


def add_model_arguments(parser: argparse.ArgumentParser, *, layers: int, hidden_size: int, batch_size: int,
                        new_tokens: int, repeats: int) -> argparse.ArgumentParser:
    """Options every rollout benchmark takes: the model, the skip ratios and the decode workload."""
    parser.add_argument("--model", help="HF checkpoint directory (default: an embedded model, see --layers)")
    parser.add_argument("--layers", type=int, default=layers, help="decoder layers of the embedded model")
    parser.add_argument("--hidden-size", type=int, default=hidden_size, help="hidden size of the embedded model")
    parser.add_argument("--ratios", type=skip_ratios_argument, default="0,0.25,0.5",
                        help="comma-separated skip ratios; the first is the baseline the speed-ups are "
                             "measured against")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="prompts per rollout (per rank)")
    parser.add_argument("--new-tokens", type=int, default=new_tokens, help="tokens decoded per prompt (EOS ignored)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats per row (median reported)")
    parser.add_argument("--engine", choices=ENGINES, default="static", help="decode engine (rollout.engine)")
    return parser


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(parser, layers=12, hidden_size=128, batch_size=32, new_tokens=64, repeats=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return parser


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def device_name(device: str, threads: int) -> str:
    """What a benchmark ran on: the GPU's name for a CUDA device, else the CPU's with the thread count."""
    if device.startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}"
    return f"{threads} thread(s), {cpu_name()}"


def skip_ratios_argument(text: str) -> list[float]:
    """argparse `type` for --ratios: the validated list, or a usage error naming the bad entry."""
    try:
        return parse_skip_ratios(text, "--ratios")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def model_path(args: argparse.Namespace, out_dir: str | Path) -> Path:
    """`--model`, or the embedded model of `--layers` x `--hidden-size` written to `out_dir` (seed 0)."""
    if args.model is not None:
        return Path(args.model)
    return build_tiny_model(ModelConfig(num_layers=args.layers, hidden_size=args.hidden_size,
                                        intermediate_size=3 * args.hidden_size), out_dir, seed=0)


# An EOS id no token has: a benchmark's rows decode their full length, so every row does the same work.
NO_EOS = -1


def fixed_length(new_tokens: int, engine: str, **changes) -> GenerationSettings:
    """Decode settings for exactly `new_tokens` per row (with `NO_EOS` as the EOS id), no compaction."""
    return GenerationSettings(max_new_tokens=new_tokens, compact_below=0.0, engine=engine, **changes)


def ideal_speedup(full: SkipPlan, plan: SkipPlan) -> float:
    """1 / (1 - s) for the layer fraction s that `plan` skips beyond `full`: layers run, full ÷ nested."""
    return len(full.kept) / len(plan.kept)


def decode_bytes_per_step(model: torch.nn.Module, plan: SkipPlan, rows: int, context: int) -> int:
    """Bytes one decode step must read from memory: the parameters of the decoder layers `plan` keeps and of the
    output head (once per step, whatever the batch), and the KV cache of `rows` rows at `context` tokens. A
    lower bound on traffic (activations and the embedding rows are left out); decode is bandwidth-bound when this
    over the step time approaches the device's memory bandwidth."""
    parent, attr = decoder_layers(model)
    layers = getattr(parent, attr)
    weights = sum(p.numel() * p.element_size() for i in plan.kept for p in layers[i].parameters())
    head = model.get_output_embeddings().weight
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_key_value_heads * head_dim * head.element_size() * len(plan.kept)
    return weights + head.numel() * head.element_size() + rows * context * kv_per_token


def copy_bandwidth(device: str, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device tensor copy (read + write) of `nbytes`: the memory bandwidth decode can
    reach on this device, measured rather than taken from a data sheet."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def run_bench(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    path = model_path(args, tempfile.mkdtemp())
    model, tokenizer = load_model_and_tokenizer(path, dtype=dtype)
    model.to(args.device).eval()
    problems = synthetic_problems(args.batch_size, seed=0)
    ids, mask = encode_prompts(tokenizer, [format_prompt(p.question, tokenizer) for p in problems], args.device)
    num_layers = model.config.num_hidden_layers
    ratios = args.ratios
    decode = fixed_length(args.new_tokens, args.engine)
    samples: dict[float, list[float]] = {r: [] for r in ratios}
    for repeat in range(args.repeats + 1):
        for ratio in ratios:
            plan = sample_skip_plan(num_layers, ratio, step=repeat, seed=0)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            generate(model, ids, mask, plan, decode, eos_token_id=NO_EOS, pad_token_id=tokenizer.pad_token_id,
                     seed=repeat)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if repeat:  # repeat 0 warms up
                samples[ratio].append(args.batch_size * args.new_tokens / (time.perf_counter() - start))
    base = statistics.median(samples[ratios[0]])
    bandwidth = copy_bandwidth(args.device)
    context = ids.shape[1] + args.new_tokens // 2  # mean KV length over the decode
    print(f"model {path} | {num_layers} layers | batch {args.batch_size} x {args.new_tokens} new tokens | "
          f"engine {args.engine} | "
          f"{args.device} {args.dtype} | median of {args.repeats} | copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'skip ratio':>10} {'layers run':>10} {'tokens/s':>10} {'speed-up':>9} {'of ideal':>8} "
          f"{'read GB/s':>9} {'of copy BW':>10}")
    full = sample_skip_plan(num_layers, ratios[0], 0, 0)
    for ratio in ratios:
        plan = sample_skip_plan(num_layers, ratio, 0, 0)
        tokens_per_s = statistics.median(samples[ratio])
        speedup = tokens_per_s / base
        read = decode_bytes_per_step(model, plan, args.batch_size, context) * tokens_per_s / args.batch_size
        print(f"{ratio:>10.2f} {len(plan.kept):>10d} {tokens_per_s:>10.0f} {speedup:>8.2f}x "
              f"{speedup / ideal_speedup(full, plan):>8.2f} {read / 1e9:>9.3g} {read / bandwidth:>10.3g}")
    print("of ideal = speed-up / (layers run at the first ratio / layers run); 1.00 = time proportional to layers")
    print("read GB/s = (kept layers' and head's parameters + KV cache at the mean context) per decode step x steps/s; "
          "of copy BW = that / the measured device-to-device copy bandwidth (1.00: decode is bandwidth-bound)")
    return 0


def release_free_heap() -> None:
    """Hand glibc's free heap back to the OS, so that RSS grows with what the next code really allocates."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Peak bytes added inside the block: CUDA max_memory_allocated, else process RSS sampled every 2 ms."""
    peak = {"bytes": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield peak
        torch.cuda.synchronize(device)
        peak["bytes"] = torch.cuda.max_memory_allocated(device) - start
        return
    release_free_heap()
    process, stop = psutil.Process(), threading.Event()
    start = process.memory_info().rss

    def sample() -> None:
        while not stop.is_set():
            peak["bytes"] = max(peak["bytes"], process.memory_info().rss - start)
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
        peak["bytes"] = max(peak["bytes"], process.memory_info().rss - start)
