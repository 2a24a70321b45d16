"""`nested-reft train | eval | bench [nested | rollout | decode | step | speculative] | compare | config | export`.

Each subcommand's recipe is imported only when that subcommand runs: `nested-reft --help` imports no recipe, and
`eval` on plain processes never imports DeepSpeed.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

# name -> (recipe module, function adding its arguments, function running it, help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("recipes.train", "build_parser", "train_main",
              "train with Nested-ReFT (single process or any launcher)"),
    "eval": ("recipes.evaluate", "add_eval_arguments", "run_eval", "pass@k / maj@k on math benchmarks"),
    "compare": ("recipes.compare", "add_compare_arguments", "compare_main",
                "Nested-ReFT vs ReFT over skip ratios, corrections and seeds: table, JSONL, plots"),
    "config": ("cli", "add_config_arguments", "config_main",
               "the configuration reference: every key's type, default, allowed values and meaning"),
    "export": ("cli", "add_export_arguments", "export_main",
               "consolidate a (ZeRO-3) checkpoint into a HF model directory"),
}
BENCHES: dict[str, tuple[str, str, str, str]] = {
    "nested": ("recipes.bench", "add_bench_arguments", "run_bench",
               "rollout tokens/s: nested vs full model, one process"),
    "rollout": ("recipes.bench_rollout", "add_rollout_arguments", "launch",
                "ZeRO-3 rollout per gather mode x skip ratio on 2 ranks: tokens/s, bytes, collectives, memory, R1-R3"),
    "decode": ("recipes.bench_decode", "add_decode_arguments", "run_decode_bench",
               "decode per engine x skip ratio vs transformers' generate: ms and aten calls per layer-step, "
               "host reads, tokens/s, of ideal"),
    "step": ("recipes.bench_step", "add_step_arguments", "run_step_bench",
             "the whole RL step on a long-tailed workload: phase times, padding, memory, each saving's speed-up"),
    "speculative": ("recipes.bench_speculative", "add_speculative_arguments", "run_speculative_bench",
                    "self-speculative sampling vs full and nested decoding: tokens/s, acceptance, measured vs "
                    "predicted speed-up"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--markdown", action="store_true", help="as Markdown (docs/configuration.md)")
    return parser


def config_main(args: argparse.Namespace) -> int:
    from .config import reference_markdown, reference_text

    print(reference_markdown() if args.markdown else reference_text())
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--checkpoint-dir", required=True, help="<output_dir>/checkpoints of a run")
    parser.add_argument("--output", required=True,
                        help="directory to write (save_pretrained); must not exist or be empty unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output (only once the new export is complete)")
    parser.add_argument("--tag", help="checkpoint tag (default: latest)")
    parser.add_argument("--base-model", help="architecture/tokenizer source (default: the run's own model)")
    return parser


def export_main(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .engine import export_hf_model

    try:
        out = export_hf_model(args.checkpoint_dir, args.output, tag=args.tag, base_model=args.base_model,
                              overwrite=args.overwrite)
    except ConfigError as err:
        print(f"nested-reft: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote Hugging Face model to {out}")
    return 0


def _attach(subparsers, table: dict[str, tuple[str, str, str, str]], chosen: str | None) -> Callable | None:
    """Add every entry of `table` as a subcommand; only `chosen`'s recipe is imported (for its arguments).
    Returns `chosen`'s run function."""
    run = None
    for name, (module_name, add_arguments, run_name, help_text) in table.items():
        parser = subparsers.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(f"{__package__}.{module_name}")
            getattr(module, add_arguments)(parser)
            run = getattr(module, run_name)
    return run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N before the subcommand; ranks read LOCAL_RANK from the environment.
    argv = [arg for arg in argv if not arg.startswith(("--local_rank=", "--local-rank="))]
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1] not in (*BENCHES, "-h", "--help")):
        argv.insert(1, "nested")  # plain `nested-reft bench [options]` is the single-process benchmark
    command = argv[0] if argv and argv[0] in (*COMMANDS, "bench") else None
    bench = argv[1] if command == "bench" and len(argv) > 1 and argv[1] in BENCHES else None

    parser = argparse.ArgumentParser(prog="nested-reft", description="Nested-ReFT on DeepSpeed")
    commands = parser.add_subparsers(dest="command", required=True)
    run = _attach(commands, COMMANDS, command)
    benches = commands.add_parser("bench", help="rollout benchmarks (default: nested)").add_subparsers(
        dest="bench", required=True)
    run = _attach(benches, BENCHES, bench) or run
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
