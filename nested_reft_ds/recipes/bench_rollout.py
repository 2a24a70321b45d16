"""`nested-reft bench rollout` (also `python benchmarks/rollout.py`): what one rollout costs under ZeRO-3, per
gather mode x skip ratio, measured in one 2-rank run, with the ratios R1-R3 and their targets.

    nested-reft bench rollout [--layers 24 --hidden-size 512 --batch-size 4 --new-tokens 12 --repeats 3 ...]

launches itself on 2 ranks with the deepspeed launcher (gloo on CPU, nccl on CUDA) and prints, per (mode, skip
ratio), what one rollout costs on each rank. Collectives are counted by wrapping torch.distributed
(recipes/comm_stats.py), not assumed. Modes:

- naive:    `rollout.generate(engine.module, ...)` with ZeRO-3's hooks on and DeepSpeed's own coordinator, i.e.
            what calling the model directly does: every decode step re-gathers every layer it runs (lockstep).
- hf:       `engine.module.generate(synced_gpus=True)`, transformers' loop (inside `nested_view` when skipping).
- once:     `skip_aware_gather(mode="once")`: one coalesced all-gather of the kept layers, none while decoding.
- streamed: `skip_aware_gather(mode="streamed")`: hooks on, kept layers streamed per step, skipped never.

Every rank decodes `--batch-size` random prompts of 16 tokens for exactly `--new-tokens` tokens (EOS ignored),
so all rows do the same work. Each row first runs untimed for 2 new tokens, then `--repeats` times for
`--new-tokens`, the rows interleaved within each repeat; the median wall time (barrier to barrier, i.e. until
both ranks are done) is reported. naive and hf are timed at their best: with DeepSpeed's prefetch trace
recorded for their plan by an untimed 2-token rollout just before. Columns, per rank and rollout:

- tok/s:       decoded tokens / median wall time; "x hf": this row's tok/s / the hf row's at the same skip ratio.
- wall s, gather s: median seconds of the rollout, and (once) of entering `skip_aware_gather`: the plan check
               and the coalesced all-gather; the rest of the wall time is decoding.
- all-gathers, MB gathered, other coll.: collectives (calls and result bytes) of one timed rollout.
- gath. MB:    peak bytes materialised at once of the parameters that were partitioned when the rollout started
               (sampled before and after every decoder layer and the LM head in the untimed run).
- peak MB:     peak memory the rollout added: on CUDA max_memory_allocated above the allocation at its start; on
               CPU the process RSS above its start (free heap returned to the OS first), sampled as above.

Ratios and their targets:
- R1 = (tok/s at skip s ÷ tok/s at the first ratio) ÷ ideal, ideal = layers run at the first ratio ÷ layers run
  at skip s = 1/(1-s): the nested speed-up as a fraction of proportional-to-layers. Target ≥ 0.9 (gather-once).
- R2 = gather-once tok/s ÷ `engine.module.generate` (hf) tok/s at the same skip ratio. Target ≥ 5.
- R3 = bytes all-gathered in a gather-once rollout (counted at the collective) ÷ full bytes of the kept decoder
  layers' and the embeddings/norm/head parameters that are partitioned when the rollout starts. Parameters
  below `stage3_param_persistence_threshold` (norms, biases) stay resident once ZeRO-3 has fetched them (after
  the first hooks-on forward) and need no gather; they are listed apart. Target 1.0.
Finally, the collectives of a training step after each kind of rollout: equal rows mean the rollout left
ZeRO-3's prefetch trace valid (calling the model directly invalidates it, so the next step re-records).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import psutil
import torch

from .bench import NO_EOS, add_model_arguments, cpu_name, fixed_length, ideal_speedup, model_path, peak_memory

MODES = ("naive", "hf", "once", "streamed")
HOOKS_ON = ("naive", "hf")  # modes that call engine.module with ZeRO-3's hooks and its training coordinator
WORLD_SIZE = 2
PROMPT_LENGTH = 16
# The untimed first run of each row: enough to record DeepSpeed's trace and reach the row's peak gathered bytes.
WARMUP_TOKENS = 2
R1_TARGET, R2_TARGET, R3_TARGET = 0.9, 5.0, 1.0
# The directory holding the package: launched ranks import the same copy as this process (a source checkout too).
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def add_rollout_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(parser, layers=24, hidden_size=512, batch_size=4, new_tokens=12, repeats=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--train-steps", type=int, choices=(0, 1), default=1,
                        help="1: also print a training step's collectives after each rollout mode; 0: skip that")
    return parser


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The benchmark's own options of `args`, as command-line arguments for the launched ranks."""
    argv = []
    for action in add_rollout_arguments(argparse.ArgumentParser())._actions:
        value = getattr(args, action.dest, None)
        if action.option_strings and action.dest != "help" and value is not None:
            # Parsed lists (--ratios) go back in the comma-separated form their `type` reads.
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            argv += [action.option_strings[0], text]
    return argv


def launch(args: argparse.Namespace) -> int:
    """Run the benchmark on 2 ranks under the deepspeed launcher; rank 0 prints the table to stdout."""
    unknown = sorted(set(args.modes.split(",")) - set(MODES))
    for bad, problem in ((unknown, f"--modes: unknown mode(s) {unknown}; choose from {MODES}"),
                         (args.repeats < 1, f"--repeats must be >= 1, got {args.repeats}")):
        if bad:
            print(f"nested-reft: error: {problem}", file=sys.stderr)
            return 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="bench_rollout_")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(WORLD_SIZE), "--master_port",
               str(port), "--module", __spec__.name, *_forwarded(args), "--workdir", workdir]
    path = os.pathsep.join(p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false")
    try:
        return subprocess.call(command, env=env)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = add_rollout_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        return launch(args)
    from . import comm_stats

    comm_stats.install()  # before DeepSpeed's comm layer caches torch.distributed's functions
    return run(args)


@contextmanager
def memory_probe(module: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Peak bytes materialised of the parameters partitioned at entry ("gathered", sampled before and after every
    decoder layer and the LM head) and peak memory added inside the block ("memory", `bench.peak_memory`)."""
    from ..engine.gather import gather_bytes
    from ..engine.distributed import device
    from ..nested import decoder_layers

    params = [p for p in module.parameters() if gather_bytes([p])]  # partitioned now
    partitioned = gather_bytes(params)
    dev = device()
    peak = {"gathered": 0, "memory": 0}

    def sample(*_) -> None:
        peak["gathered"] = max(peak["gathered"], partitioned - gather_bytes(params))

    parent, attr = decoder_layers(module)
    watched = (*getattr(parent, attr), module.get_output_embeddings())
    probes = [hook(sample) for m in watched for hook in (m.register_forward_pre_hook, m.register_forward_hook)]
    try:
        with peak_memory(dev) as added:
            yield peak
    finally:
        for probe in probes:
            probe.remove()
    peak["memory"] = added["bytes"]


def machine(module: torch.nn.Module) -> str:
    """Where the numbers come from: device, cores, memory, dtype, library versions."""
    dev = next(module.parameters()).device
    if dev.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(dev)}, nccl"
    else:
        where = (f"CPU {cpu_name()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, no GPU, "
                 f"gloo, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("torch", "deepspeed", "transformers"))
    return f"{where}; {str(next(module.parameters()).dtype).removeprefix('torch.')}; {versions}"


def run(args: argparse.Namespace) -> int:
    from .. import engine as ds
    from ..config import load_config
    from . import comm_stats
    from ..engine import internals
    from ..engine.gather import gather_bytes, kept_parameters, lockstep_done, skip_aware_gather
    from ..model import select_attn_implementation
    from ..nested import decoder_layers, nested_view, sample_skip_plan
    from ..rollout import generate

    rank, world = ds.init_distributed()
    load_at_start, began = os.getloadavg()[0], time.perf_counter()
    out = Path(args.workdir) / "model"
    if rank == 0:
        model_path(args, out)
    ds.barrier()
    cfg = load_config(None, [f"rollout.prompts_per_step={world}", f"rollout.group_size={args.batch_size}",
                             f"train.micro_batch_size={args.batch_size}", "train.zero_stage=3"])
    # The built-in ZeRO-3 config (no file outside the package: this runs from a plain `pip install` too).
    ds_config = ds.fill_ds_config(ds.load_ds_config(None, cfg), cfg, world)
    model, _ = ds.load_model_for_engine(args.model or out, ds_config, select_attn_implementation("auto"))
    engine = ds.build_engine(model, ds_config)
    engine.eval()
    module = engine.module
    parent, attr = decoder_layers(module)
    num_layers = len(getattr(parent, attr))
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(2, module.config.vocab_size, (args.batch_size, PROMPT_LENGTH), generator=generator)
    ids = ids.to(ds.device())
    mask = torch.ones_like(ids)
    pad = module.config.pad_token_id if module.config.pad_token_id is not None else 0
    ratios, modes = args.ratios, args.modes.split(",")
    plans = {ratio: sample_skip_plan(num_layers, ratio, step=0, seed=0) for ratio in ratios}
    cases = [(mode, ratio) for ratio in ratios for mode in modes]

    def rollout(mode: str, ratio: float, new_tokens: int = args.new_tokens) -> float | None:
        """Decode; returns when gather-once's gather was done (time.perf_counter), else None."""
        plan, gathered_at = plans[ratio], None
        decode = fixed_length(new_tokens, args.engine, greedy=True)
        stops = dict(eos_token_id=NO_EOS, pad_token_id=pad)
        if mode == "naive":
            generate(module, ids, mask, plan, decode, all_ranks_done=lockstep_done, **stops)
        elif mode == "hf":
            with nested_view(module, plan):
                module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, synced_gpus=True, pad_token_id=pad)
        else:
            with skip_aware_gather(engine, plan, mode) as gathered:
                if mode == "once":
                    gathered_at = time.perf_counter()
                generate(gathered, ids, mask, plan, decode, **stops)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return gathered_at

    layer_ids = {id(p) for p in getattr(parent, attr).parameters()}

    def needed(ratio: float) -> dict[str, int]:
        """Bytes of the plan's kept parameters: partitioned now (decoder layers, the rest), and resident now."""
        kept = kept_parameters(module, plans[ratio])
        layers = gather_bytes([p for p in kept if id(p) in layer_ids])
        outside = gather_bytes([p for p in kept if id(p) not in layer_ids])
        total = sum(internals.full_numel(p) * internals.partition_of(p).element_size() for p in kept)
        return {"layers": layers, "outside": outside, "resident": total - layers - outside}

    times = {case: [] for case in cases}
    gather_times = {case: [] for case in cases}
    counts, peaks, expected = {}, {}, {}
    # Repeat 0 runs every row untimed for WARMUP_TOKENS and samples memory. Rows are interleaved within each
    # repeat, so a slow drift of the machine's load hits every row alike. A rollout with ZeRO-3's hooks on (naive,
    # hf) after one of another plan would run without DeepSpeed's recorded trace (no prefetch): an untimed
    # WARMUP_TOKENS rollout re-records it first, so that naive and hf are timed at their best.
    traced = None  # the skip ratio of DeepSpeed's recorded trace
    for repeat in range(args.repeats + 1):
        for case in cases:
            if case[0] in HOOKS_ON:
                if repeat and traced != case[1]:
                    rollout(*case, new_tokens=WARMUP_TOKENS)
                traced = case[1]
            if repeat and case[0] == "once":
                expected[case[1]] = needed(case[1])
            ds.barrier()
            start = time.perf_counter()
            with memory_probe(module) if repeat == 0 else nullcontext() as peak, comm_stats.record() as comm:
                gathered_at = rollout(*case, new_tokens=args.new_tokens if repeat else min(WARMUP_TOKENS,
                                                                                          args.new_tokens))
            ds.barrier()
            elapsed = time.perf_counter() - start
            if repeat:
                times[case].append(elapsed)
                counts[case] = comm
                if gathered_at is not None:
                    gather_times[case].append(gathered_at - start)
            else:
                peaks[case] = peak
        if rank == 0:
            print(f"bench rollout: repeat {repeat} of {args.repeats} done after {time.perf_counter() - began:.0f} s",
                  file=sys.stderr, flush=True)

    trace = training_after_rollouts(engine, rollout, ids, ratios[-1], modes, comm_stats) if args.train_steps else []
    if rank == 0:
        print(f"\nZeRO-3 rollout benchmark: {world} ranks; {machine(module)}; 1-min load average "
              f"{load_at_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
        print(f"model: {args.model or f'embedded qwen2, {num_layers} layers, hidden {args.hidden_size}'}; "
              f"{args.batch_size} prompts x {PROMPT_LENGTH} tokens -> {args.new_tokens} new tokens per rank; "
              f"per rank per rollout; median of {args.repeats}")
        print_table(args, cases, times, gather_times, counts, peaks, plans)
        print_ratios(args, times, counts, plans, expected)
        for before, comm in trace:
            print(f"training step after {before:<24}: {comm.all_gather_calls:>4} all-gathers, "
                  f"{comm.all_gather_bytes / 2**20:7.1f} MB gathered, {comm.total_calls:>4} collectives")
    ds.barrier()  # every rank has finished its work and rank 0 has printed the table
    # Leave without tearing down: in full test-suite runs one rank has aborted in teardown ("terminate called
    # without an active exception", exit -6) after all of its work, a cause not yet found, which failed the launch
    # although every number had been printed. The benchmark keeps no state a teardown would save.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def training_after_rollouts(engine, rollout, ids, ratio, modes, comm_stats) -> list:
    """Collectives of a training step (fwd+bwd+step) after: another step, each rollout mode. Before each, steps run
    until ZeRO-3's trace is recorded and in use: at the start and after a hooks-on rollout (the step after it
    re-records the trace), so those modes go last."""
    def train_step():
        engine.train()
        with comm_stats.record() as comm:
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        engine.eval()
        return comm

    rows, settled = [], False
    for mode in (None, *sorted(modes, key=lambda m: m in HOOKS_ON)):
        for _ in range(0 if settled else 3):
            train_step()
        settled = mode not in HOOKS_ON
        if mode is not None:
            rollout(mode, ratio, new_tokens=WARMUP_TOKENS)
        rows.append((f"a {mode} rollout" if mode else "another training step", train_step()))
    return rows


def _tokens_per_s(args, times, case) -> float:
    return args.batch_size * args.new_tokens / statistics.median(times[case])


def print_table(args, cases, times, gather_times, counts, peaks, plans) -> None:
    header = (f"{'mode':<9} {'skip':>4} {'layers':>6} {'tok/s':>8} {'x hf':>6} {'wall s':>7} {'gather s':>8} "
              f"{'all-gathers':>11} {'MB gathered':>11} {'other coll.':>11} {'gath. MB':>8} {'peak MB':>8}")
    print(header)
    print("-" * len(header))
    for mode, ratio in cases:
        comm, rate = counts[(mode, ratio)], _tokens_per_s(args, times, (mode, ratio))
        vs_hf = rate / _tokens_per_s(args, times, ("hf", ratio)) if ("hf", ratio) in times else float("nan")
        gather = f"{statistics.median(gather_times[(mode, ratio)]):.3f}" if gather_times[(mode, ratio)] else "-"
        print(f"{mode:<9} {ratio:>4.2f} {len(plans[ratio].kept):>6} {rate:>8.1f} {vs_hf:>6.2f} "
              f"{statistics.median(times[(mode, ratio)]):>7.3f} {gather:>8} {comm.all_gather_calls:>11} {comm.all_gather_bytes / 2**20:>11.1f} "
              f"{comm.total_calls - comm.all_gather_calls:>11} {peaks[(mode, ratio)]['gathered'] / 2**20:>8.1f} "
              f"{peaks[(mode, ratio)]['memory'] / 2**20:>8.1f}")


def _verdict(value: float, ok: bool) -> str:
    return f"{value:.3f} ({'meets' if ok else 'BELOW'} target)"


def print_ratios(args, times, counts, plans, expected) -> None:
    full = next(iter(plans))
    for mode in ("once", "streamed"):
        for ratio in (r for r in plans if r != full and (mode, r) in times and (mode, full) in times):
            speedup = _tokens_per_s(args, times, (mode, ratio)) / _tokens_per_s(args, times, (mode, full))
            ideal = ideal_speedup(plans[full], plans[ratio])
            r1 = speedup / ideal
            target = f"target >= {R1_TARGET}: {_verdict(r1, r1 >= R1_TARGET)}" if mode == "once" else f"{r1:.3f}"
            print(f"R1 ({mode}, skip {ratio:.2f}): speed-up {speedup:.2f} over skip {full:.2f} / ideal {ideal:.2f} "
                  f"= {target}")
    for ratio in (r for r in plans if ("once", r) in times and ("hf", r) in times):
        r2 = _tokens_per_s(args, times, ("once", ratio)) / _tokens_per_s(args, times, ("hf", ratio))
        print(f"R2 (skip {ratio:.2f}): gather-once / engine.module.generate tok/s, target >= {R2_TARGET}: "
              f"{_verdict(r2, r2 >= R2_TARGET)}")
    for ratio, need in expected.items():
        gathered = counts[("once", ratio)].all_gather_bytes
        r3 = gathered / (need["layers"] + need["outside"])
        print(f"R3 (skip {ratio:.2f}): {gathered} bytes gathered / ({need['layers']} kept-layer + {need['outside']} "
              f"embeddings/norm/head bytes not yet on the rank) = {_verdict(r3, r3 == R3_TARGET)}; "
              f"{need['resident']} kept bytes already resident (persistent)")


if __name__ == "__main__":
    sys.exit(main())
