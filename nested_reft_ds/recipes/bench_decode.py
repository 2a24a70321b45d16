"""`nested-reft bench decode`: what one decode costs per engine and skip ratio, with transformers' `generate` as the
anchor, measured in one run (one process, no DeepSpeed).

    nested-reft bench decode [--arch qwen3 --layers 16 --hidden-size 64 --batch-size 16 --prompt-length 40
                              --new-tokens 256 --ratios 0,0.25,0.5 --repeats 3 --threads 1]

Workload: `--batch-size` random prompts of `--prompt-length` tokens (seeded, no padding), each decoded for exactly
`--new-tokens` tokens (EOS ignored, so every row and every engine does the same work), sampled at temperature 1
with keyed sampling. Rows: each engine of `rollout.generate` ("static", "reference", ...) at each skip ratio, and
two anchors at skip 0: transformers' `model.generate(do_sample=True)` with its dynamic cache (what TRL calls) and
with `cache_implementation="static"`. Rows are interleaved within each repeat (a drift of the machine's load hits
every row alike), the first repeat is an untimed warm-up, and the median is reported. Columns:

- ms/layer-step: rollout wall time / (new tokens x decoder layers run); the prefill, head and sampling are
  included, spread over the layer-steps.
- aten/layer-step: aten operator calls (torch.profiler on the CPU, nested calls included) / the same count, from
  one extra profiled rollout per row; on CUDA, launches/layer-step: kernel and graph launches instead.
- host reads/step: device values the host read per forward of the rollout, prefill included
  (`DecodeStats.host_reads` for our engines; for the anchors `aten::_local_scalar_dense` calls in the profile, the
  op every `.item()` / `bool()` runs). Each one is a device->host synchronisation on a GPU.
- tokens/s: new tokens of all rows / wall time. x reference: / the reference engine's at the same skip ratio;
  x generate: / transformers' dynamic-cache `generate` at skip 0.
- of ideal: (tokens/s at this ratio / tokens/s of the same engine at the first ratio) / (1 / (1 - s)), with s the
  fraction of layers skipped: 1.00 = decode time proportional to the layers run.
- first call s: wall time of the row's untimed warm-up rollout minus its median (compilation, graph capture,
  allocation).
- of copy BW (CUDA): bytes a decode step must read (kept layers' and head's parameters, KV cache at the mean
  context) x steps/s / the measured device-to-device copy bandwidth.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model import build_tiny_model, load_model_and_tokenizer
from ..nested import sample_skip_plan
from ..rollout import ENGINES, DecodeStats, generate
from .bench import NO_EOS, copy_bandwidth, cpu_name, decode_bytes_per_step, fixed_length, ideal_speedup, skip_ratios_argument

ANCHORS = ("hf-dynamic", "hf-static")
# CUDA runtime calls that launch work on the device (a graph launch replays a whole captured graph).
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")


def add_decode_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="HF checkpoint directory (default: an embedded model, see --arch/--layers)")
    parser.add_argument("--arch", choices=["qwen2", "qwen3", "llama", "mistral"], default="qwen3",
                        help="architecture of the embedded model")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the embedded model")
    parser.add_argument("--hidden-size", type=int, default=64, help="hidden size of the embedded model (4 heads, "
                                                                    "2 KV heads, MLP 3x hidden)")
    parser.add_argument("--ratios", type=skip_ratios_argument, default="0,0.25,0.5",
                        help="comma-separated skip ratios; the first is the baseline of 'of ideal'")
    parser.add_argument("--engines", default="static,reference", help=f"comma-separated subset of {ENGINES}")
    parser.add_argument("--anchors", default=",".join(ANCHORS),
                        help=f"comma-separated subset of {','.join(ANCHORS)} ('' for none), run at skip 0")
    parser.add_argument("--batch-size", type=int, default=16, help="rows decoded together")
    parser.add_argument("--prompt-length", type=int, default=40, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens decoded per row (EOS ignored)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled rollouts (aten counts)")
    return parser


def _check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    engines = [e for e in args.engines.split(",") if e]
    anchors = [a for a in args.anchors.split(",") if a]
    for engine in engines:
        if engine not in ENGINES:
            raise SystemExit(f"nested-reft bench decode: --engines: {engine!r} is not one of {ENGINES}")
    for anchor in anchors:
        if anchor not in ANCHORS:
            raise SystemExit(f"nested-reft bench decode: --anchors: {anchor!r} is not one of {ANCHORS}")
    for name in ("batch_size", "prompt_length", "new_tokens", "repeats", "threads", "layers", "hidden_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"nested-reft bench decode: --{name.replace('_', '-')} must be >= 1, got "
                             f"{getattr(args, name)}")
    return engines, anchors


def run_decode_bench(args: argparse.Namespace) -> int:
    engines, anchors = _check(args)
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else build_tiny_model(
        ModelConfig(arch=args.arch, num_layers=args.layers, hidden_size=args.hidden_size, num_heads=4,
                    num_kv_heads=2, intermediate_size=3 * args.hidden_size), tempfile.mkdtemp(), seed=0)
    model, tokenizer = load_model_and_tokenizer(path, dtype=getattr(torch, args.dtype))
    model.to(args.device).eval()
    num_layers = model.config.num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (args.batch_size, args.prompt_length), generator=generator)
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)
    pad = tokenizer.pad_token_id
    plans = {ratio: sample_skip_plan(num_layers, ratio, step=0, seed=0) for ratio in args.ratios}
    rows = [(engine, ratio) for engine in engines for ratio in args.ratios] + [(a, 0.0) for a in anchors]
    if anchors and 0.0 not in plans:
        plans[0.0] = sample_skip_plan(num_layers, 0.0, step=0, seed=0)

    def rollout(row: tuple[str, float], stats: DecodeStats | None = None) -> None:
        name, ratio = row
        if name in ANCHORS:
            extra = dict(cache_implementation="static") if name == "hf-static" else {}
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                           pad_token_id=pad, **extra)
        else:
            generate(model, ids, mask, plans[ratio], fixed_length(args.new_tokens, name), eos_token_id=NO_EOS,
                     pad_token_id=pad, seed=0, stats=stats)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    times: dict[tuple[str, float], list[float]] = {row: [] for row in rows}
    first: dict[tuple[str, float], float] = {}
    began = time.perf_counter()
    for repeat in range(args.repeats + 1):
        for row in rows:
            start = time.perf_counter()
            rollout(row)
            elapsed = time.perf_counter() - start
            if repeat:
                times[row].append(elapsed)
            else:
                first[row] = elapsed
    load = os.getloadavg()[0]
    cuda = args.device.startswith("cuda")
    bandwidth = copy_bandwidth(args.device) if cuda else None
    context = args.prompt_length + args.new_tokens // 2  # mean KV length over the decode
    reads, aten = {}, {}
    for row in rows:
        stats = DecodeStats()
        if args.no_profile:
            rollout(row, stats)
            counts = {}
        else:
            counts = _profiled(lambda: rollout(row, stats), cuda)
        steps = args.new_tokens  # forwards per rollout: the prefill samples the first token
        reads[row] = stats.host_reads / steps if row[0] not in ANCHORS else (
            counts.get("aten::_local_scalar_dense", float("nan")) / steps)
        total = (sum(count for name, count in counts.items() if name.startswith("aten::")) if not cuda else
                 sum(count for name, count in counts.items() if name in LAUNCHES))
        aten[row] = total / (args.new_tokens * len(plans[row[1]].kept)) if counts else float("nan")

    def tokens_per_s(row) -> float:
        return args.batch_size * args.new_tokens / statistics.median(times[row])

    described = path if args.model else f"embedded {args.arch}, {num_layers} layers x hidden {args.hidden_size}"
    print(f"decode benchmark: {described}; "
          f"{args.batch_size} rows x {args.prompt_length} prompt tokens -> {args.new_tokens} new tokens; {args.device} "
          f"{args.dtype}, {args.threads} thread(s), {cpu_name()}; median of {args.repeats}; 1-min load {load:.1f}; "
          f"{time.perf_counter() - began:.0f} s")
    calls = "launches/layer-step" if cuda else "aten/layer-step"
    header = (f"{'engine':<15} {'skip':>4} {'layers':>6} {'ms/layer-step':>13} {calls:>19} "
              f"{'host reads/step':>15} {'tokens/s':>9} {'x reference':>11} {'x generate':>10} {'of ideal':>8} "
              f"{'first call s':>12}" + (f" {'of copy BW':>10}" if cuda else ""))
    print(header)
    print("-" * len(header))
    generate_rate = tokens_per_s(("hf-dynamic", 0.0)) if ("hf-dynamic", 0.0) in times else float("nan")
    base_ratio = args.ratios[0]
    for row in rows:
        name, ratio = row
        layers = len(plans[ratio].kept)
        rate = tokens_per_s(row)
        median = statistics.median(times[row])
        per_layer_step = median / (args.new_tokens * layers) * 1e3
        vs_reference = rate / tokens_per_s(("reference", ratio)) if ("reference", ratio) in times else float("nan")
        of_ideal = (rate / tokens_per_s((name, base_ratio)) / ideal_speedup(plans[base_ratio], plans[ratio])
                    if (name, base_ratio) in times else float("nan"))
        read = ""
        if cuda:
            read_per_s = decode_bytes_per_step(model, plans[ratio], args.batch_size, context) * rate / args.batch_size
            read = f" {read_per_s / bandwidth:>10.3f}"
        print(f"{name:<15} {ratio:>4.2f} {layers:>6} {per_layer_step:>13.3f} {aten[row]:>19.1f} {reads[row]:>15.3f} "
              f"{rate:>9.0f} {vs_reference:>11.2f} {rate / generate_rate:>10.2f} {of_ideal:>8.2f} "
              f"{first[row] - median:>12.2f}" + read)
    if cuda:
        print(f"of copy BW: (kept layers' and head's parameters + KV cache at the mean context) read per decode step "
              f"x steps/s / the measured device copy bandwidth ({bandwidth / 1e9:.0f} GB/s)")
    return 0


def _profiled(fn, cuda: bool = False) -> dict[str, int]:
    """Profiler events of one call of `fn` by name: aten operator calls (nested included) and, with `cuda`, the
    CUDA runtime's kernel and graph launches."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
    return {event.key: event.count for event in prof.key_averages()}
