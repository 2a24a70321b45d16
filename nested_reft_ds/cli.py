"""`nested-reft train | eval | bench [nested | rollout] | export`."""
from __future__ import annotations

import argparse
import sys


def _export(args: argparse.Namespace) -> int:
    from .engine import export_hf_model
    try:
        out = export_hf_model(args.checkpoint_dir, args.output, tag=args.tag, base_model=args.base_model)
    except ValueError as err:
        print(f"nested-reft: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote Hugging Face model to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import bench, bench_rollout, compare, evaluate, train

    parser = argparse.ArgumentParser(prog="nested-reft", description="Nested-ReFT on DeepSpeed")
    commands = parser.add_subparsers(dest="command", required=True)
    train.build_parser(commands.add_parser("train", help="train with Nested-ReFT (single process or any launcher)"))
    evaluate.add_eval_arguments(commands.add_parser("eval", help="pass@k / maj@k on math benchmarks"))
    benches = commands.add_parser("bench", help="rollout benchmarks (default: nested)").add_subparsers(
        dest="bench", required=True)
    bench.add_bench_arguments(benches.add_parser("nested", help="rollout tokens/s: nested vs full model, one process"))
    bench_rollout.add_rollout_arguments(benches.add_parser(
        "rollout", help="ZeRO-3 rollout per gather mode x skip ratio on 2 ranks: tokens/s, bytes, collectives, "
                        "memory, R1-R3"))
    compare.add_compare_arguments(commands.add_parser(
        "compare", help="Nested-ReFT vs ReFT over skip ratios, corrections and seeds: table, JSONL, plots"))
    export = commands.add_parser("export", help="consolidate a (ZeRO-3) checkpoint into a HF model directory")
    export.add_argument("--checkpoint-dir", required=True, help="<output_dir>/checkpoints of a run")
    export.add_argument("--output", required=True, help="directory to write (save_pretrained)")
    export.add_argument("--tag", help="checkpoint tag (default: latest)")
    export.add_argument("--base-model", help="architecture/tokenizer source (default: the run's own model)")
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N before the subcommand; ranks read LOCAL_RANK from the environment.
    argv = [arg for arg in argv if not arg.startswith(("--local_rank=", "--local-rank="))]
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1] not in ("nested", "rollout", "-h", "--help")):
        argv.insert(1, "nested")  # plain `nested-reft bench [options]` is the single-process benchmark
    args = parser.parse_args(argv)
    if args.command == "compare":
        return compare.compare_main(args)
    if args.command == "bench":
        return {"nested": bench.run_bench, "rollout": bench_rollout.launch}[args.bench](args)
    handlers = {"train": train.train_main, "eval": evaluate.run_eval, "export": _export}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
