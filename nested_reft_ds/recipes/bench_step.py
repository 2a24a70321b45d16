"""`nested-reft bench step`: the whole RL step on a rollout-dominated workload, with each exact saving switched on
alone and all together, at several skip ratios, measured in one run (one process, the real `rl_step`).

    nested-reft bench step --layers 24 --hidden-size 128 --prompts 4 --group-size 8 --max-new-tokens 256

Workload: long-chain synthetic problems (2-20 steps, a geometric count with continue probability 0.6, operands
up to 30) through the plain template, G samples per prompt, sampled at temperature 1 until EOS or `--max-new-tokens`.
The default model is the embedded one at random initialisation: it emits EOS with probability about 1/V per
token, so completion lengths are geometric with a long tail (mean about 90 tokens at V = 98, a few reaching the
cap); `--model` takes a warmed checkpoint instead, whose completions follow its worked-solution format. Sampling
is keyed per token and the optimizer steps at lr 0 (the whole step runs, the weights stay), so every variant of
a repeat decodes exactly the same tokens and only the work done differs.

Variants (rollout.compact_below, rollout.shared_prefill, train.bucket_by_length, train.shared_prompt_forward):
  none     0,   off, off, never   every finished row decodes to the end; every sample prefills its prompt;
                                  micro-batches are consecutive rows (each still trimmed to its own longest row)
  compact  0.75, off, off, never  finished rows leave the decode batch once at most 3/4 of it is still decoding
  prefill  0,   on,  off, never   each prompt is prefilled once for its G samples
  bucket   0,   off, on,  never   micro-batches of similar-length rows, bucketed singly
  packed   0,   off, off, always  training scores each prompt group as one packed sequence (prompt encoded once)
  all      0.75, on, on,  auto    packed where that computes fewer FLOPs (then rows bucket by whole groups)
Logits are computed only at completion positions in every variant (see --vocab for that saving).

Columns: phase times (median over repeats); decode row-steps run / row-steps of rows still decoding; training
token positions run / real tokens; peak memory the step added (RSS above its start, sampled every 2 ms; CUDA:
max_memory_allocated); speed-up = step time of `none` / step time of the row, at the same skip ratio, and
against `none` at the first ratio. The log-prob memory row (--vocab, default 151,936) compares, on a 2-layer
model with that vocabulary, one training micro-batch's log-prob forward+backward through the full [b, P+T, V]
logits (the path before this benchmark's savings) with `completion_logprobs` (head chunked over positions).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .bench import cpu_name, peak_memory, skip_ratios_argument

VARIANTS = {
    "none": dict(compact_below=0.0, shared_prefill=False, bucket_by_length=False, shared_prompt_forward="never"),
    "compact": dict(compact_below=0.75, shared_prefill=False, bucket_by_length=False, shared_prompt_forward="never"),
    "prefill": dict(compact_below=0.0, shared_prefill=True, bucket_by_length=False, shared_prompt_forward="never"),
    "bucket": dict(compact_below=0.0, shared_prefill=False, bucket_by_length=True, shared_prompt_forward="never"),
    "packed": dict(compact_below=0.0, shared_prefill=False, bucket_by_length=False, shared_prompt_forward="always"),
    "all": dict(compact_below=0.75, shared_prefill=True, bucket_by_length=True, shared_prompt_forward="auto"),
}


def add_step_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="HF checkpoint directory, e.g. a warmed run (default: the embedded model)")
    parser.add_argument("--layers", type=int, default=24, help="decoder layers of the embedded model")
    parser.add_argument("--hidden-size", type=int, default=128, help="hidden size of the embedded model")
    parser.add_argument("--ratios", type=skip_ratios_argument, default="0,0.25,0.5", help="comma-separated skip ratios")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per training forward/backward")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per row (median reported)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--vocab", type=int, default=151_936,
                        help="vocabulary of the log-prob memory row (0: skip that row)")
    parser.add_argument("--workdir", help="where the embedded model is written (default: a temporary directory)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value for every row, e.g. --set train.precision=bf16 (repeatable)")
    return parser


def step_config(args: argparse.Namespace, workdir: Path):
    from ..config import load_config

    overrides = [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden_size}",
                 f"model.intermediate_size={3 * args.hidden_size}", "data.source=synthetic", "data.num_problems=512",
                 "data.eval_problems=0", "data.min_steps=2", "data.max_steps=20", "data.step_continue_probability=0.6",
                 "data.min_operand=1", "data.max_operand=30", "data.prompt_template=plain", f"rollout.prompts_per_step={args.prompts}",
                 f"rollout.group_size={args.group_size}", f"rollout.max_new_tokens={args.max_new_tokens}",
                 "rollout.temperature=1.0", f"train.micro_batch_size={args.micro_batch_size}", "train.steps=1",
                 "train.sft_steps=0", "train.zero_stage=0", "train.precision=fp32", f"train.output_dir={workdir}",
                 "skip.schedule=fixed", "algorithm.kl_coef=0"]
    if args.model:
        overrides.append(f"model.path={args.model}")
    return load_config(None, overrides + list(args.overrides))


def variant_config(cfg, name: str, ratio: float):
    knobs = VARIANTS[name]
    return dataclasses.replace(
        cfg, skip=dataclasses.replace(cfg.skip, ratio=ratio),
        rollout=dataclasses.replace(cfg.rollout, compact_below=knobs["compact_below"],
                                    shared_prefill=knobs["shared_prefill"]),
        train=dataclasses.replace(cfg.train, bucket_by_length=knobs["bucket_by_length"],
                                  shared_prompt_forward=knobs["shared_prompt_forward"]))


def logprob_memory(vocab: int, rows: int, prompt: int, completion: int, device: torch.device) -> dict[str, int]:
    """Peak bytes of one micro-batch's log-prob forward+backward: full logits vs `completion_logprobs`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ..rl import token_logprobs
    from ..rollout import Rollout, completion_logprobs, position_ids_from_mask

    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(device)
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, vocab, (rows, prompt + completion), generator=generator).to(device)
    ones = torch.ones(rows, prompt, dtype=torch.long, device=device)
    rollout = Rollout(sequences=sequences, prompt_mask=ones, completion_mask=torch.ones_like(sequences[:, prompt:]),
                      behavior_logprobs=torch.zeros(rows, completion, device=device))

    def full_logits() -> None:
        mask = rollout.attention_mask
        logits = model(input_ids=sequences, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        token_logprobs(logits[:, prompt - 1:-1], rollout.completions, chunk_elements=2**62).sum().backward()

    def chunked() -> None:
        completion_logprobs(model, rollout, 1.0).sum().backward()

    peaks = {}
    for name, run in (("full logits", full_logits), ("completion_logprobs", chunked)):
        run()  # warm the allocator and autograd once, then measure
        model.zero_grad(set_to_none=True)
        with peak_memory(device) as peak:
            run()
        model.zero_grad(set_to_none=True)
        peaks[name] = peak["bytes"]
    return peaks


def run_step_bench(args: argparse.Namespace) -> int:
    from .. import engine as ds
    from ..data import problems_from_config
    from ..nested import SkipScheduler
    from .rl_step import StepContext, rl_step
    from .train import prepare_model_dir

    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or "none" not in names:
        raise SystemExit(f"nested-reft bench step: --variants must include none and name only "
                         f"{', '.join(VARIANTS)}; got {args.variants!r}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_step_"))
    cfg = step_config(args, workdir)
    rank, world = ds.init_distributed()
    if world != 1:
        raise SystemExit("nested-reft bench step runs in one process")
    ds_config = ds.fill_ds_config(ds.load_ds_config(None, cfg), cfg, world)
    problems, _ = problems_from_config(cfg.data, cfg.train.seed)
    model_dir = prepare_model_dir(cfg, workdir, rank)
    model, tokenizer = ds.load_model_for_engine(model_dir, ds_config, cfg.model.attn_implementation)
    engine = ds.build_engine(model, ds_config)
    ds.set_learning_rate(engine, 0.0)  # every variant must decode with the same weights
    device = ds.device()
    num_layers = model.config.num_hidden_layers
    cases = [(ratio, name) for ratio in args.ratios for name in names]
    records: dict[tuple[float, str], list[dict]] = {case: [] for case in cases}
    peaks: dict[tuple[float, str], list[int]] = {case: [] for case in cases}
    began = time.perf_counter()
    for repeat in range(args.repeats + 1):  # repeat 0 warms up; every variant of a repeat decodes the same tokens
        for ratio, name in cases:
            variant = variant_config(cfg, name, ratio)
            skip = SkipScheduler(variant.skip, num_layers, variant.train.seed)
            with peak_memory(device) as peak:
                metrics = rl_step(StepContext(engine, tokenizer, variant, problems, skip, rank, world), repeat)
            if repeat:
                records[(ratio, name)].append(metrics)
                peaks[(ratio, name)].append(peak["bytes"])
    print_table(args, cfg, cases, records, peaks, num_layers, model.config.hidden_size, time.perf_counter() - began)
    if args.vocab:
        rows, prompt = args.micro_batch_size, 64
        memory = logprob_memory(args.vocab, rows, prompt, args.max_new_tokens, device)
        full, chunked = memory["full logits"], memory["completion_logprobs"]
        print(f"\nlog-prob memory, vocab {args.vocab:,}, micro-batch {rows} x ({prompt} prompt + {args.max_new_tokens} "
              f"completion) tokens, forward+backward of the log-probs on a 2-layer hidden-64 model:")
        print(f"  full [b, P+T, V] logits      {full / 2**20:8.0f} MB")
        print(f"  completion_logprobs          {chunked / 2**20:8.0f} MB   ratio {chunked / max(full, 1):.3f} "
              f"(target <= 0.25: {'met' if chunked <= full / 4 else 'NOT met'})")
    ds.shutdown_distributed()
    return 0


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(args, cfg, cases, records, peaks, num_layers: int, hidden_size: int, seconds: float) -> None:
    lengths = [m["completion_length"] for runs in records.values() for m in runs]
    print(f"{num_layers} layers x {hidden_size} hidden | {args.prompts} prompts x G={args.group_size}, "
          f"max_new_tokens {args.max_new_tokens}, mean completion {_median(lengths):.0f} tokens | micro-batch "
          f"{args.micro_batch_size} | {cpu_name()}, {torch.get_num_threads()} threads | median of {args.repeats} | "
          f"{seconds:.0f} s")
    header = (f"{'skip':>5} {'variant':>8} {'rollout s':>9} {'reward s':>8} {'train s':>8} {'step s':>7} "
              f"{'decode run/need':>15} {'train run/need':>14} {'peak MB':>8} {'speed-up':>8} {'vs skip0':>8}")
    print(header)
    first_ratio = cases[0][0]
    baseline_first = _median([m["time_step_s"] for m in records[(first_ratio, "none")]])
    for ratio, name in cases:
        runs = records[(ratio, name)]
        step = _median([m["time_step_s"] for m in runs])
        baseline = _median([m["time_step_s"] for m in records[(ratio, "none")]])
        last = runs[-1]
        decode_ratio = last["decode_row_steps"] / max(last["decode_alive_row_steps"], 1)
        train_ratio = last["train_tokens_computed"] / max(last["train_tokens_needed"], 1)
        print(f"{ratio:>5.2f} {name:>8} {_median([m['time_rollout_s'] for m in runs]):>9.2f} "
              f"{_median([m['time_reward_s'] for m in runs]):>8.2f} {_median([m['time_train_s'] for m in runs]):>8.2f} "
              f"{step:>7.2f} {decode_ratio:>15.2f} {train_ratio:>14.2f} "
              f"{_median(peaks[(ratio, name)]) / 2**20:>8.0f} {baseline / step:>7.2f}x {baseline_first / step:>7.2f}x")
    print("decode run/need: decode row-steps computed / row-steps of rows still decoding (1.00: no finished row "
          "computed); train run/need: token positions the training forwards ran / real tokens")
    for ratio in dict.fromkeys(r for r, _ in cases):
        if (ratio, "compact") not in records:
            continue
        none = records[(ratio, "none")][-1]
        decode_time = (_median([m["time_rollout_s"] for m in records[(ratio, "compact")]])
                       / _median([m["time_rollout_s"] for m in records[(ratio, "none")]]))
        alive = none["decode_alive_row_steps"] / max(none["decode_row_steps"], 1)
        print(f"skip {ratio:.2f}: compacted / uncompacted rollout time {decode_time:.2f}; alive token-steps / total "
              f"{alive:.2f}; target time <= 1.2 x alive = {1.2 * alive:.2f}: "
              f"{'met' if decode_time <= 1.2 * alive else 'NOT met'}")
        if (ratio, "bucket") in records:
            bucket = records[(ratio, "bucket")][-1]
            ratio_tokens = bucket["train_tokens_computed"] / max(bucket["train_tokens_needed"], 1)
            print(f"skip {ratio:.2f}: training tokens computed / needed with bucketing {ratio_tokens:.2f} "
                  f"(target <= 1.15: {'met' if ratio_tokens <= 1.15 else 'NOT met'}); without "
                  f"{none['train_tokens_computed'] / max(none['train_tokens_needed'], 1):.2f}")
