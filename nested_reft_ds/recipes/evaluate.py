"""`nested-reft eval`: pass@1, unbiased pass@k, maj@k and completion statistics on math benchmarks.

    nested-reft eval --model PATH --benchmarks gsm8k,math500,svamp --data-dir ../shared/data \\
        --samples 8 --temperature 0.6 --output eval.json --samples-jsonl samples.jsonl

Data-parallel under any launcher that sets RANK / WORLD_SIZE (a plain process never imports deepspeed):

    deepspeed --num_gpus 8 --module nested_reft_ds.cli eval --model PATH ...   # or --module nested_reft_ds.evaluate

The metrics are pure (`eval_metrics`). `evaluate_problems` is given every problem of a benchmark and
evaluates one rank's shard: the problems are cut into generation chunks (`generation_chunks`: sorted by prompt
length, `batch_size // samples` problems each) and rank r takes chunks r, r + world, ...; each chunk samples
from its own seed (`chunk_seed(seed, chunk)`), so every completion, and every total, is the same on any number
of ranks (it does depend on --seed and --batch-size). It returns local sums (`EvalSums`, additive) and the
shard's per-problem records; `run_eval` all-reduces the sums (`EvalSums.as_list` / `from_list`) and rank 0
gathers the records through per-rank staging files next to --output / --samples-jsonl (`_merge_rank_records`;
on several nodes that directory must be shared), then writes the JSON report, the Markdown table (--markdown,
default --output with suffix .md; also printed) and the per-sample JSONL, in problem order.
`tokens_per_s` is generation throughput per rank (all tokens / all ranks' generation seconds).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

import torch

from ..checks import check_writable_file
from ..data import MathProblem, synthetic_problems
from ..data.sources import BUILTIN_SOURCES, load_problems
from ..data.templates import INSTRUCTION, check_template, format_prompt
from ..eval_metrics import EvalSums, majority_vote, pass_at_k
from ..nested import SkipPlan, parse_skip_ratios, sample_skip_plan
from ..reward import DEFAULT_REL_TOL, DEFAULT_TIMEOUT, Outcome, VerifierPool, score_batch_with_stats
from ..config import GenerationSettings
from ..rollout import ENGINES, completion_logprobs, encode_prompts, generate, stop_token_ids

SYNTHETIC_DEFAULT_COUNT = 256


# ----------------------------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class EvalSettings:
    """What an evaluation samples: `samples` completions per problem, decoded per `generation`."""
    samples: int = 8
    batch_size: int = 32  # sequences per generate() call
    prompt_template: str = "auto"  # "auto", "plain", "chat" or a template string with {question}
    instruction: str = INSTRUCTION  # the answer-format instruction the template adds
    seed: int = 0
    generation: GenerationSettings = GenerationSettings(temperature=0.6, max_new_tokens=1024)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.generation.greedy and self.samples != 1:
            raise ValueError(f"greedy decoding gives one sample per problem; got samples={self.samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_template(self.prompt_template)


@dataclass
class _Generated:
    texts: list[str]
    tokens: list[int]  # completion tokens per prompt (EOS included)
    truncated: list[bool]  # hit max_new_tokens without EOS
    seconds: float
    kl_sum: float = 0.0  # sum over completion tokens of log beta - log pi (k1 estimate of KL(beta || pi))
    kl_tokens: int = 0


def _target_logprobs(model, rollout, temperature: float, forwards: int, chunked_head: bool) -> torch.Tensor:
    """Log-probs [B, T] of the sampled completion tokens under the full `model`, at the sampling temperature, in
    exactly `forwards` forward passes (so the [rows, T, V] logits stay small, and so that ranks whose forwards are
    collective run the same number whatever their row count: a pass left without rows scores row 0, discarded)."""
    num_rows, new_tokens = rollout.sequences.shape[0], rollout.completions.shape[1]
    per_forward = max(1, -(-num_rows // forwards))
    chunks = []
    for start in range(0, per_forward * forwards, per_forward):
        rows = torch.arange(start, min(start + per_forward, num_rows)) if start < num_rows else torch.zeros(1).long()
        logprobs = completion_logprobs(model, rollout.select(rows), temperature, chunked_head=chunked_head)
        if start < num_rows:
            chunks.append(torch.nn.functional.pad(logprobs, (0, new_tokens - logprobs.shape[1])))
    return torch.cat(chunks)


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of generation chunk `chunk`: a pure function of (seed, chunk), never of the rank."""
    digest = hashlib.sha256(f"nested-reft-eval:{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generation_chunks(prompt_lengths: Sequence[int], samples: int, batch_size: int) -> list[list[int]]:
    """Problem indices in generation chunks: problems sorted by prompt length (longest first, ties by index, so
    similar lengths share a batch and padding stays small), `max(1, batch_size // samples)` problems per chunk.

    The chunks depend only on the problems and the settings, never on the number of ranks. A chunk is the
    unit of data parallelism (rank r evaluates chunks r, r + world, ...) and of seeding (`chunk_seed`), so a
    chunk's completions are the same whichever rank draws it and however many ranks there are.
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    per_chunk = max(1, batch_size // samples)
    return [order[start:start + per_chunk] for start in range(0, len(order), per_chunk)]


# How a model is made ready to run with a skip plan: `decoding(plan)` is a context manager yielding the module
# to call (a plain model: itself; a ZeRO-3 engine: `engine.skip_aware_gather(engine, plan, mode)`).
Decoding = Callable[[SkipPlan], AbstractContextManager]

# Rows per scoring forward of the full model (measure_kl); with a `decoding`, counted at the largest batch.
SCORING_ROWS = 4


def plain_decoding(model) -> Decoding:
    return lambda plan: nullcontext(model)


def _generate_completions(model, tokenizer, prompts: list[str], settings: EvalSettings, plan,
                          device: torch.device, measure_kl: bool = False, seed: int | None = None,
                          decoding: Decoding | None = None, group_size: int = 1) -> _Generated:
    """Sample one completion per prompt with `plan`, in order, `settings.batch_size` prompts per generate()
    call; prompt i samples with key i under `seed` (default `settings.seed`; `sampling.keyed_uniforms`). Runs of
    `group_size` identical prompts share their prefill where a batch holds whole runs. With `measure_kl`, also
    score the sampled tokens under the full model (behaviour-target KL of the nested model). `decoding` (default: the
    plain `model`) prepares the model for each plan; every call runs the same number of forwards outside
    `generate` for the same `settings`, so ranks whose forwards are collective stay in step."""
    balanced = decoding is not None  # forwards may be collective: a fixed number of scoring passes per batch
    decoding = decoding or plain_decoding(model)
    full_plan = SkipPlan(plan.num_layers)
    out = _Generated(texts=[], tokens=[], truncated=[], seconds=0.0)
    seed = settings.seed if seed is None else seed
    eos_id = tokenizer.eos_token_id
    stop_ids = torch.tensor(stop_token_ids(model, eos_id))  # what generate stops a row at
    for start in range(0, len(prompts), settings.batch_size):
        batch = prompts[start:start + settings.batch_size]
        input_ids, attention_mask = encode_prompts(tokenizer, batch, device)
        began = time.perf_counter()
        with decoding(plan) as decoder:
            rollout = generate(decoder, input_ids, attention_mask, plan,
                               settings.generation, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
                               seed=seed, row_keys=torch.arange(start, start + len(batch)),
                               group_size=group_size if start % group_size == len(batch) % group_size == 0 else 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.seconds += time.perf_counter() - began
        if measure_kl:
            with torch.no_grad(), decoding(full_plan) as scorer:
                rows = settings.batch_size if balanced else rollout.sequences.shape[0]
                target = _target_logprobs(scorer, rollout, settings.generation.temperature, -(-rows // SCORING_ROWS),
                                          chunked_head=not balanced)  # [b, T]; a sharded model keeps its head
            mask = rollout.completion_mask.float()
            out.kl_sum += float(((rollout.behavior_logprobs - target) * mask).sum())
            out.kl_tokens += int(mask.sum())
        completions = rollout.completions.cpu()  # [b, T]
        mask = rollout.completion_mask.cpu()  # [b, T]
        ended = (torch.isin(completions, stop_ids) & mask.bool()).any(dim=1)  # [b]
        out.texts += tokenizer.batch_decode(completions, skip_special_tokens=True)
        out.tokens += mask.sum(dim=1).tolist()
        out.truncated += (~ended).tolist()
    return out


def evaluate_problems(model, tokenizer, problems: Sequence[MathProblem], settings: EvalSettings, *,
                      plan: SkipPlan | None = None, measure_kl: bool = False,
                      reward_timeout: float = DEFAULT_TIMEOUT, rel_tol: float = DEFAULT_REL_TOL,
                      last_number: bool = True, pool: VerifierPool | None = None, rank: int = 0, world: int = 1,
                      decoding: Decoding | None = None) -> tuple[EvalSums, list[dict[str, Any]]]:
    """Sample `settings.samples` completions per problem of this rank's shard, score them, and return the
    shard's sums and per-problem records (sorted by problem index). Not collective: the caller adds the sums
    over ranks (`EvalSums.as_list` / `from_list`).

    Every rank passes the whole `problems` list; rank `rank` of `world` evaluates the generation chunks
    `rank, rank + world, ...` of `generation_chunks` (each sampled with its own `chunk_seed`), so the sums over
    ranks and the records are the same for any world size. `plan` is the skip plan to generate with (default:
    the full model); with `measure_kl` the sampled tokens are also scored under the full model, giving the
    nested behaviour model's KL to the target (`kl_behavior_target`; meaningful for sampled decoding).
    `last_number`: whether the verifier falls back to a completion's last number (`reward.last_number`).

    `decoding` prepares `model` for each plan (default: the plain model). Given one (a ZeRO-3 engine whose
    forwards may be collective), every rank runs the same number of chunks: a rank out of chunks in the last
    round generates chunk 0 again and discards it. Collective then: every rank must call it alike.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    device = next(model.parameters()).device
    plan = plan if plan is not None else SkipPlan(model.config.num_hidden_layers)
    n = settings.samples
    prompts = [format_prompt(p.question, tokenizer, settings.prompt_template,
                             instruction=settings.instruction)
               for p in problems]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids] if prompts else []
    chunks = generation_chunks(lengths, n, settings.batch_size)
    mine: list[int] = []  # problem indices of this shard, in generation order
    texts, tokens, truncated = [], [], []  # [len(mine) * n], problem-major
    generated = _Generated([], [], [], seconds=0.0)
    rounds = -(-len(chunks) // world) if decoding is not None else 0
    schedule = [rank + r * world for r in range(rounds)] if decoding is not None else range(rank, len(chunks), world)
    for chunk in schedule:
        if chunk >= len(chunks):  # a balancing round: only keeps this rank's collectives in step
            _generate_completions(model, tokenizer, [prompts[i] for i in chunks[0] for _ in range(n)], settings,
                                  plan, device, measure_kl=measure_kl, seed=chunk_seed(settings.seed, 0),
                                  decoding=decoding, group_size=n)
            continue
        indices = chunks[chunk]
        out = _generate_completions(model, tokenizer, [prompts[i] for i in indices for _ in range(n)], settings,
                                    plan, device, measure_kl=measure_kl, seed=chunk_seed(settings.seed, chunk),
                                    decoding=decoding, group_size=n)
        mine += indices
        texts, tokens, truncated = texts + out.texts, tokens + out.tokens, truncated + out.truncated
        generated.seconds += out.seconds
        generated.kl_sum += out.kl_sum
        generated.kl_tokens += out.kl_tokens
    scored = score_batch_with_stats(texts, [problems[i].answer for i in mine for _ in range(n)],
                                    timeout=reward_timeout, rel_tol=rel_tol, last_number=last_number, pool=pool)

    sums = EvalSums(n, problems=len(mine), samples=len(texts), completion_tokens=sum(tokens),
                    truncated=sum(truncated), no_answer=scored.num_no_answer,
                    timeouts=scored.count(Outcome.TIMEOUT), generation_seconds=generated.seconds,
                    kl_sum=generated.kl_sum, kl_tokens=generated.kl_tokens)
    records = []
    for position, index in sorted(enumerate(mine), key=lambda item: item[1]):
        problem = problems[index]
        rows = range(position * n, (position + 1) * n)
        answers = [scored.answers[r] for r in rows]
        correct = [scored.correct[r] for r in rows]
        for k in sums.pass_at_k:
            sums.pass_at_k[k] += pass_at_k(n, sum(correct), k)
        majority, majority_correct = majority_vote(answers, correct, timeout=reward_timeout, rel_tol=rel_tol,
                                                   pool=pool)
        sums.majority_correct += majority_correct
        records.append({
            "index": index, "question": problem.question, "reference": problem.answer,
            "prompt": prompts[index], "num_correct": sum(correct), "majority_answer": majority,
            "majority_correct": majority_correct,
            "samples": [{"completion": texts[r], "answer": scored.answers[r], "correct": scored.correct[r],
                         "outcome": None if scored.outcomes[r] is None else scored.outcomes[r].value,
                         "tokens": tokens[r], "truncated": truncated[r]} for r in rows],
        })
    return sums, records


# ------------------------------------------------------------------------------------------------------ CLI

def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--benchmarks", default="gsm8k",
                        help="comma-separated: built-in names (" + ", ".join(BUILTIN_SOURCES) + ", synthetic) read "
                             "from --data-dir, or NAME=PATH (a built-in name with its own file or directory, or any "
                             "name for a JSONL/parquet file with question/answer fields)")
    parser.add_argument("--data-dir", help="directory holding <benchmark>/<split>.jsonl (e.g. ../shared/data)")
    parser.add_argument("--split", default="test", help="split (file name in --data-dir folders)")
    parser.add_argument("--limit", type=int, help="first N problems of each benchmark (synthetic: how many, "
                                                  f"default {SYNTHETIC_DEFAULT_COUNT})")
    parser.add_argument("--samples", type=int, help="samples per problem (default 8; 1 with --greedy)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding, one sample per problem")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="sequences per generation batch (with --seed, it fixes which samples are drawn)")
    parser.add_argument("--prompt-template", default="auto", metavar="auto|plain|chat|TEMPLATE",
                        help="auto: the tokenizer's chat template when it has one, else plain; or a template string "
                             "with {question} (and optionally {instruction}) placeholders")
    parser.add_argument("--instruction", default=INSTRUCTION,
                        help=f"answer-format instruction added to each question (default: {INSTRUCTION!r})")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed (and the synthetic task's seed); samples do not depend on the world size")
    parser.add_argument("--engine", choices=list(ENGINES), default="static",
                        help="decode engine (rollout.engine): static (the default; qwen2/qwen3/llama/mistral), "
                             "static_compiled, static_graphs (CUDA), or reference (the model's forward, any model); "
                             "all sample the same tokens")
    parser.add_argument("--device", help="default: cuda (this rank's local GPU under a launcher) if available, "
                                         "else cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 on CUDA when supported, else float32")
    parser.add_argument("--skip-ratios", default="0",
                        help="comma-separated layer-skip ratios of the nested behaviour model to evaluate (first and "
                             "last layer kept); a ratio > 0 also reports its KL to the full model")
    parser.add_argument("--deepspeed", metavar="DS_CONFIG",
                        help="shard the model with this ZeRO-3 DeepSpeed JSON over the launched ranks (for models "
                             "that do not fit one device); without it every rank holds the whole model")
    parser.add_argument("--gather", choices=["once", "streamed", "auto"], default="once",
                        help="with --deepspeed: how generation gets the kept layers (rollout.gather: once gathers "
                             "them for the batch, streamed fetches layer by layer per decode step)")
    parser.add_argument("--reward-timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per comparison")
    parser.add_argument("--rel-tol", type=float, default=DEFAULT_REL_TOL, help="relative tolerance for decimals")
    parser.add_argument("--output", help="write metrics and per-problem records as JSON here")
    parser.add_argument("--markdown", help="write the Markdown table here (default: --output with suffix .md)")
    parser.add_argument("--samples-jsonl", help="write one JSON line per sample here")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def benchmark_problems(spec: str, *, data_dir: str | None, split: str, limit: int | None,
                       seed: int) -> tuple[str, list[MathProblem]]:
    """(name, problems) for one --benchmarks entry: "gsm8k", "gsm8k=path", "mine=path.jsonl" or "synthetic"."""
    name, _, path = spec.partition("=")
    name = name.strip()
    if name == "synthetic" and not path:
        return name, synthetic_problems(limit or SYNTHETIC_DEFAULT_COUNT, seed)
    if not path:
        if name not in BUILTIN_SOURCES:
            raise ValueError(f"unknown benchmark {name!r}: use one of {sorted(BUILTIN_SOURCES)} or 'synthetic', "
                             "or NAME=PATH for a JSONL file with question/answer fields")
        if data_dir is None:
            raise ValueError(f"benchmark {name!r} needs --data-dir DIR (reads DIR/{name}/{split}.jsonl) "
                             f"or {name}=PATH")
        path = str(Path(data_dir) / name)
    source = name if name in BUILTIN_SOURCES else "json"
    return name, load_problems(source, path, split=split, limit=limit)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    columns = [c for c in results[names[0]] if c.startswith(("pass@", "maj@"))] + [
        "mean_completion_tokens", "truncated_rate", "no_answer_rate", "tokens_per_s"]
    if any("kl_behavior_target" in row for row in results.values()):
        columns.append("kl_behavior_target")
    header = "| benchmark | problems | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for name in names:
        row = results[name]
        cells = ["-" if c not in row else f"{row[c]:.1f}" if c in ("mean_completion_tokens", "tokens_per_s")
                 else f"{row[c]:.4f}" for c in columns]
        lines.append(f"| {name} | {int(row['problems'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _distributed_context(sharded: bool = False):
    """(rank, world, collectives module or None). A process started by a launcher (WORLD_SIZE > 1 in the
    environment), or a `sharded` (ZeRO-3) evaluation, joins the process group; a plain single process stays
    single and never imports deepspeed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not sharded:
        return 0, 1, None
    from ..engine import distributed as collectives

    rank, world = collectives.init_distributed()
    return rank, world, collectives


def _device(requested: str | None, distributed: bool) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ValueError(f"--device {requested!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested!r}: CUDA is not available on this machine (use --device cpu)")
    if distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
    return device


def _sharded_model(args: argparse.Namespace, world: int, dtype: torch.dtype):
    """(module, tokenizer, decoding) of `args.model` partitioned by the ZeRO-3 JSON `args.deepspeed` over the
    launched ranks: an inference-only engine (no optimizer), decoded through `engine.skip_aware_gather`."""
    from ..config import ConfigError, load_config
    from ..engine import build_inference_engine, fill_ds_config, load_ds_config, load_model_for_engine, \
        skip_aware_gather

    # The batch keys a DeepSpeed engine insists on, filled for one sequence per rank (nothing is trained).
    layout = load_config(None, [f"rollout.prompts_per_step={world}", "rollout.group_size=2",
                                "train.micro_batch_size=2",
                                f"train.precision={'bf16' if dtype == torch.bfloat16 else 'fp32'}"])
    ds_config = fill_ds_config(load_ds_config(args.deepspeed, layout), layout, world)
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        raise ConfigError(f"--deepspeed {args.deepspeed!r}: eval shards with ZeRO stage 3 only (got stage "
                          f"{ds_config.get('zero_optimization', {}).get('stage')}); without --deepspeed every rank "
                          "holds the whole model")
    model, tokenizer = load_model_for_engine(args.model, ds_config, "auto")
    engine = build_inference_engine(model, ds_config)
    return engine.module, tokenizer, lambda plan: skip_aware_gather(engine, plan, args.gather)


def _merge_rank_records(records: dict[str, list[dict[str, Any]]], staging: Path, rank: int, world: int,
                        collectives) -> dict[str, list[dict[str, Any]]] | None:
    """Gather every rank's per-problem records on rank 0 (None elsewhere). Collective (one barrier).

    Each rank writes its records to `staging.rank<r>` (one JSON line per problem); after the barrier rank 0
    reads all parts in rank order, deletes them and sorts each row's records by problem index. The staging
    files are next to the output, so on several nodes the output directory must be on a filesystem all nodes
    share (the usual setup for checkpoints too); a missing part is reported with its path.
    """
    part = staging.with_name(f"{staging.name}.rank{rank}")
    with open(part, "w", encoding="utf-8") as handle:
        for row, row_records in records.items():
            for record in row_records:
                handle.write(json.dumps({"row": row, "record": record}, ensure_ascii=False) + "\n")
    collectives.barrier()
    if rank != 0:
        return None
    merged: dict[str, list[dict[str, Any]]] = {row: [] for row in records}
    for r in range(world):
        path = staging.with_name(f"{staging.name}.rank{r}")
        if not path.is_file():
            raise RuntimeError(f"rank {r}'s records are not at {path}: with ranks on several nodes, --output and "
                               "--samples-jsonl must be on a filesystem every node shares")
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                item = json.loads(line)
                merged[item["row"]].append(item["record"])
        path.unlink()
    return {row: sorted(row_records, key=lambda record: record["index"]) for row, row_records in merged.items()}


def run_eval(args: argparse.Namespace) -> int:
    """`nested-reft eval`, single process or data-parallel under a launcher (`deepspeed --num_gpus N --module
    nested_reft_ds.evaluate ...`, or `--module nested_reft_ds.cli eval ...`). Collective when launched on
    several ranks: every rank evaluates its chunks of every benchmark row (`evaluate_problems`), the sums are
    all-reduced, and rank 0 gathers the per-problem records and writes every output."""
    rank, world, collectives = _distributed_context(sharded=args.deepspeed is not None)
    if collectives is None:
        return _run_eval(args, rank, world, collectives)
    from ..engine.failstop import fail_stop, start_watchdog, stop_watchdog

    start_watchdog()  # an exception on one rank ends every rank (engine.failstop), never a hang
    code: list[int] = []
    try:
        failed = fail_stop(lambda: code.append(_run_eval(args, rank, world, collectives)))
        stop_watchdog()
        collectives.barrier()  # no rank tears down the store while another's watchdog still polls it
        return failed or code[0]
    finally:
        collectives.shutdown_distributed()


def _run_eval(args: argparse.Namespace, rank: int, world: int, collectives) -> int:
    from ..model import load_model_and_tokenizer

    try:
        # Before anything runs, so that a report cannot be lost at the end of a long evaluation.
        for option, target in (("--output", args.output), ("--markdown", args.markdown),
                               ("--samples-jsonl", args.samples_jsonl)):
            if target:
                check_writable_file(target, option)
        generation = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        top_p=args.top_p, greedy=args.greedy, engine=args.engine)
        settings = EvalSettings(samples=args.samples if args.samples is not None else 1 if args.greedy else 8,
                                batch_size=args.batch_size, prompt_template=args.prompt_template,
                                instruction=args.instruction, seed=args.seed, generation=generation)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        ratios = parse_skip_ratios(args.skip_ratios, "--skip-ratios")
        benchmarks = [benchmark_problems(spec, data_dir=args.data_dir, split=args.split, limit=args.limit,
                                         seed=args.seed) for spec in args.benchmarks.split(",") if spec.strip()]
        if not benchmarks:
            raise ValueError("--benchmarks is empty")
        device = _device(args.device, collectives is not None)
        decoding = None
        if args.deepspeed is not None:
            model, tokenizer, decoding = _sharded_model(args, world, _dtype(args.dtype, device))
            device = next(model.parameters()).device
        else:
            model, tokenizer = load_model_and_tokenizer(args.model, dtype=_dtype(args.dtype, device))
        num_layers = model.config.num_hidden_layers
        plans = {ratio: sample_skip_plan(num_layers, ratio, step=0, seed=args.seed) for ratio in ratios}
        warm_up_prompt = format_prompt("1+1", tokenizer, settings.prompt_template,
                                       instruction=settings.instruction)  # checks the template choice
    except ValueError as error:
        if rank == 0:
            print(f"nested-reft eval: error: {error}", file=sys.stderr)
        return 2
    if decoding is None:
        model.to(device).eval()
    # One short generation first, so that one-time initialisation is not counted in the first row's tokens/s.
    warm_up = dataclasses.replace(settings, batch_size=1,
                                  generation=dataclasses.replace(settings.generation, max_new_tokens=2))
    _generate_completions(model, tokenizer, [warm_up_prompt], warm_up, SkipPlan(num_layers), device,
                          decoding=decoding)

    results: dict[str, dict[str, float]] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    report: dict[str, Any] = {"model": args.model, "settings": dataclasses.asdict(settings), "world_size": world,
                              "benchmarks": {}}
    with VerifierPool() as pool:
        for name, problems in benchmarks:
            for ratio, plan in plans.items():
                row = name if ratios == [0.0] else f"{name} skip={ratio:g}"
                sums, records[row] = evaluate_problems(
                    model, tokenizer, problems, settings, plan=plan,
                    measure_kl=bool(plan.skipped) and not settings.generation.greedy, reward_timeout=args.reward_timeout,
                    rel_tol=args.rel_tol, pool=pool, rank=rank, world=world, decoding=decoding)
                if collectives is not None:
                    sums = EvalSums.from_list(settings.samples, collectives.all_reduce_sum(sums.as_list()))
                results[row] = sums.metrics()
                report["benchmarks"][row] = {"skip_ratio": ratio, "skipped_layers": list(plan.skipped),
                                             "metrics": results[row]}
                if rank == 0:
                    print(f"{row}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[row].items() if "@" in k),
                          file=sys.stderr)
    record_target = args.output or args.samples_jsonl
    if collectives is not None and record_target:
        staging = Path(record_target)
        records = _merge_rank_records(records, staging.with_name(f".{staging.name}.records"), rank, world, collectives)
    if rank != 0:
        return 0
    table = markdown_table(results)
    print(table)
    markdown = args.markdown or (str(Path(args.output).with_suffix(".md")) if args.output else None)
    if markdown:
        Path(markdown).write_text(table + "\n", encoding="utf-8")
    for row, benchmark in report["benchmarks"].items():
        benchmark["problems"] = records[row]
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    if args.samples_jsonl:
        with open(args.samples_jsonl, "w", encoding="utf-8") as handle:
            for name, benchmark in report["benchmarks"].items():
                for record in benchmark["problems"]:
                    for s, sample in enumerate(record["samples"]):
                        handle.write(json.dumps({"benchmark": name, "index": record["index"], "sample": s,
                                                 "prompt": record["prompt"], "reference": record["reference"],
                                                 **sample}, ensure_ascii=False) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m nested_reft_ds.evaluate ...`: the same as `nested-reft eval ...` (any launcher)."""
    parser = add_eval_arguments(argparse.ArgumentParser(prog="nested-reft eval", description=__doc__.split("\n")[0]))
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
