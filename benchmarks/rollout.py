"""ZeRO-3 rollout cost per gather mode, measured in one 2-rank run: all-gathers, bytes moved, wall time.

    python benchmarks/zero3_rollout.py [--layers 12 --hidden-size 256 --new-tokens 32 ...]

launches itself on 2 ranks with the deepspeed launcher (CPU: gloo) and prints, per (mode, skip ratio), what
one rollout costs on each rank (collectives counted by wrapping torch.distributed, see engine.comm_stats):

- naive:    `generate(engine.module, ...)` with ZeRO-3's hooks on and DeepSpeed's own coordinator, i.e. what
            calling the model directly does: every decode step re-gathers every layer it runs (lockstep).
- hf:       `engine.module.generate(synced_gpus=True)` (transformers' loop, full model; ratio 0 only).
- once:     `skip_aware_gather(mode="once")`: one coalesced all-gather of the kept layers, no collective while
            decoding.
- streamed: `skip_aware_gather(mode="streamed")`: hooks on, kept layers streamed per step, skipped never.

Every rank decodes a fixed number of tokens (EOS disabled) so all rows do the same work. Each row is run once
to warm up (for naive/hf this also lets DeepSpeed record its trace for that model: their best case), then
`--repeats` times; the median wall time is reported. "peak MB" is the largest total size of gathered
non-persistent parameters seen before any decoder layer or the LM head runs (an untimed pass after the row's
timed ones);
"kept MB" is the size of the kept non-persistent parameters: what a nested rollout must gather at least once.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--ratios", default="0,0.5")
    parser.add_argument("--modes", default="naive,hf,once,streamed")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per rank")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=1, help="0: skip the training-step-after-rollout rows")
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def launch(args: argparse.Namespace) -> int:
    """Re-run this script on 2 ranks under the deepspeed launcher."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="zero3_rollout_")
    argv = [a for a in sys.argv[1:]]
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), __file__, *argv, "--workdir", workdir]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    return subprocess.call(command, cwd=REPO, env=env)


def main() -> int:
    args = parse_args()
    if "RANK" not in os.environ:
        return launch(args)
    sys.path.insert(0, str(REPO))
    from nested_reft_ds.engine import comm_stats

    comm_stats.install()  # before DeepSpeed's comm layer caches torch.distributed's functions
    return run(args)


def run(args: argparse.Namespace) -> int:
    import torch
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from nested_reft_ds import engine as ds
    from nested_reft_ds.config import ModelConfig, load_config
    from nested_reft_ds.engine import comm_stats
    from nested_reft_ds.engine.gather import kept_parameters, lockstep_done, lockstep_for, skip_aware_gather
    from nested_reft_ds.model import build_tiny_model
    from nested_reft_ds.nested import sample_skip_plan
    from nested_reft_ds.rollout import generate

    rank, world = ds.init_distributed()
    base = Path(args.workdir) / "model"
    if rank == 0:
        build_tiny_model(ModelConfig(num_layers=args.layers, hidden_size=args.hidden_size,
                                     intermediate_size=3 * args.hidden_size, num_heads=4, num_kv_heads=2), base, seed=0)
    ds.barrier()
    cfg = load_config(None, [f"rollout.prompts_per_step={world}", f"rollout.group_size={args.batch_size}",
                             f"train.micro_batch_size={args.batch_size}"])
    ds_config = ds.fill_ds_config(ds.load_ds_config(REPO / "ds_configs" / "zero3.json", cfg), cfg, world)
    model, _ = ds.load_model_for_engine(base, ds_config, "sdpa")
    engine = ds.build_engine(model, ds_config)
    engine.eval()
    module = engine.module
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(2, module.config.vocab_size, (args.batch_size, 16), generator=generator)
    mask = torch.ones_like(ids)
    decode = dict(max_new_tokens=args.new_tokens, eos_token_id=-1, pad_token_id=0, greedy=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    modes = args.modes.split(",")
    plans = {ratio: sample_skip_plan(args.layers, ratio, step=0, seed=0) for ratio in ratios}
    cases = [(mode, ratio) for ratio in ratios for mode in modes if not (mode == "hf" and ratio > 0)]

    def rollout(mode: str, ratio: float) -> None:
        plan = plans[ratio]
        if mode == "naive":
            generate(module, ids, mask, plan, all_ranks_done=lockstep_done, **decode)
        elif mode == "hf":
            module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False, synced_gpus=True, pad_token_id=0)
        else:
            with skip_aware_gather(engine, plan, mode) as gathered:
                generate(gathered, ids, mask, plan, all_ranks_done=lockstep_for(gathered), **decode)

    def peak_gathered_mb(mode: str, ratio: float) -> float:
        params = list(module.parameters())
        peak = [0]

        def sample(*_):
            peak[0] = max(peak[0], sum(p.ds_numel * p.ds_tensor.element_size() for p in params
                                       if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist))
        probes = [m.register_forward_pre_hook(sample) for m in (*module.model.layers, module.lm_head)]
        try:
            rollout(mode, ratio)
        finally:
            for probe in probes:
                probe.remove()
        return peak[0] / 2**20

    times = {case: [] for case in cases}
    counts, peaks = {}, {}
    for case in cases:
        for repeat in range(args.repeats + 1):  # repeat 0 warms up
            ds.barrier()
            start = time.perf_counter()
            with comm_stats.record() as comm:
                rollout(*case)
            ds.barrier()
            if repeat:
                times[case].append(time.perf_counter() - start)
                counts[case] = comm
        peaks[case] = peak_gathered_mb(*case)
    kept_mb = {ratio: sum(p.ds_numel * p.ds_tensor.element_size() for p in kept_parameters(module, plans[ratio])
                          if not p.ds_persist) / 2**20 for ratio in ratios}
    trace = training_after_rollouts(engine, rollout, ids, ratios[-1], comm_stats) if args.train_steps else []
    if rank == 0:
        print_table(args, cases, times, counts, peaks, kept_mb, plans)
        for before, comm in trace:
            print(f"training step after {before:<24}: {comm.all_gather_calls:>4} all-gathers, "
                  f"{comm.all_gather_bytes / 2**20:7.1f} MB gathered, {comm.total_calls:>4} collectives")
    ds.shutdown_distributed()
    return 0


def training_after_rollouts(engine, rollout, ids, ratio, comm_stats) -> list:
    """Collectives of a training step (fwd+bwd+step) after: nothing, each rollout mode. Equal rows mean the
    rollout left ZeRO-3's prefetch trace intact; calling the model directly (naive) makes it re-record."""
    def train_step():
        engine.train()
        with comm_stats.record() as comm:
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        engine.eval()
        return comm

    for _ in range(3):  # record the trace, then run on it
        train_step()
    rows = [("another training step", train_step())]
    for mode in ("once", "streamed", "naive"):
        rollout(mode, ratio)
        rows.append((f"a {mode} rollout", train_step()))
    return rows


def print_table(args, cases, times, counts, peaks, kept_mb, plans) -> None:
    tokens = args.batch_size * args.new_tokens
    wall = {case: statistics.median(values) for case, values in times.items()}
    print(f"\nZeRO-3 rollout, 2 ranks (gloo, CPU), {args.layers} layers, hidden {args.hidden_size}, "
          f"{args.batch_size} prompts x {args.new_tokens} new tokens per rank; per rank per rollout; "
          f"median of {args.repeats}")
    header = (f"{'mode':<9} {'skip':>4} {'skipped':<14} {'all-gathers':>11} {'MB gathered':>11} {'other coll.':>11} "
              f"{'wall s':>7} {'tok/s':>7} {'speed-up vs naive':>17} {'MB vs naive':>11} {'peak MB':>8} {'kept MB':>8}")
    print(header)
    print("-" * len(header))
    for mode, ratio in cases:
        comm, naive = counts[(mode, ratio)], ("naive", ratio)
        speedup = wall[naive] / wall[(mode, ratio)] if naive in wall else float("nan")
        less = counts[naive].all_gather_bytes / max(comm.all_gather_bytes, 1) if naive in counts else float("nan")
        print(f"{mode:<9} {ratio:>4.2f} {str(plans[ratio].skipped):<14} {comm.all_gather_calls:>11} "
              f"{comm.all_gather_bytes / 2**20:>11.1f} {comm.total_calls - comm.all_gather_calls:>11} "
              f"{wall[(mode, ratio)]:>7.3f} {tokens / wall[(mode, ratio)]:>7.0f} {speedup:>17.2f} {less:>11.1f} "
              f"{peaks[(mode, ratio)]:>8.1f} {kept_mb[ratio]:>8.1f}")
    print("speed-up vs naive = naive wall / this wall; MB vs naive = naive bytes / these bytes")
    for ratio in (r for r in kept_mb if ("once", r) in counts):
        print(f"R3 (once, skip {ratio:.2f}): MB gathered / kept MB = "
              f"{counts[('once', ratio)].all_gather_bytes / 2**20 / kept_mb[ratio]:.3f}")
    full = min(kept_mb)
    for mode in ("once", "streamed"):
        for ratio in (r for r in kept_mb if r > full and (mode, r) in wall and (mode, full) in wall):
            ideal = len(plans[full].kept) / len(plans[ratio].kept)
            speedup = wall[(mode, full)] / wall[(mode, ratio)]
            print(f"R1 ({mode}, skip {ratio:.2f}): tok/s vs skip {full:.2f} = {speedup:.2f} (ideal {ideal:.2f}; "
                  f"fraction of ideal {speedup / ideal:.2f})")


if __name__ == "__main__":
    sys.exit(main())
