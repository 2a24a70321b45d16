"""`nested-reft train | eval | bench | export`."""
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
    from . import bench, evaluate, train
    from . import compare

    parser = argparse.ArgumentParser(prog="nested-reft", description="Nested-ReFT on DeepSpeed")
    commands = parser.add_subparsers(dest="command", required=True)
    train.build_parser(commands.add_parser("train", help="train with Nested-ReFT (single process or any launcher)"))
    evaluate.add_eval_arguments(commands.add_parser("eval", help="pass@k / maj@k on math benchmarks"))
    bench.add_bench_arguments(commands.add_parser("bench", help="rollout tokens/s: nested vs full model"))
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
    args = parser.parse_args(argv)
    if args.command == "compare":
        return compare.compare_main(args)
    handlers = {"train": train.train_main, "eval": evaluate.run_eval, "bench": bench.run_bench, "export": _export}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
