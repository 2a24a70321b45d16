"""Full-model SFT loss of warm-ups against step (100-step means), one line per warm-up: did they converge alike?

    python benchmarks/plot_warmup_loss.py out.png LABEL=runs/compare_long/sft/seed1/metrics.jsonl \
        LABEL=docs/results/compare_long/runs.jsonl.gz@2 ...

A compare grid's runs.jsonl(.gz) holds every warm-up: @SEED picks one.

LayerDrop steps (sft_skipped > 0) are left out, so warm-ups with and without it compare on the same model.
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def full_model_loss(path: Path, seed: int | None, window: int = 100) -> tuple[list[int], list[float]]:
    """(window start steps, mean SFT loss of the full-model steps in each window) of one run's metrics.jsonl(.gz),
    or of seed `seed`'s warm-up in a compare grid's runs.jsonl(.gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        records = [json.loads(line) for line in f]
    losses_by_window: dict[int, list[float]] = {}
    for r in records:
        if seed is not None and r.get("seed") != seed:
            continue
        if r.get("phase") == "sft" and r.get("sft_skipped", 0) == 0:
            losses_by_window.setdefault(r["step"] // window * window, []).append(r["sft_loss"])
    steps = sorted(losses_by_window)
    return steps, [sum(losses_by_window[s]) / len(losses_by_window[s]) for s in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output")
    parser.add_argument("runs", nargs="+", metavar="LABEL=METRICS[@SEED]",
                        help="a label and a warm-up's metrics.jsonl(.gz), or a grid's runs.jsonl(.gz)@SEED")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4))
    for item in args.runs:
        label, _, source = item.partition("=")
        path, _, seed = source.partition("@")
        if not path or not Path(path).is_file() or (seed and not seed.isdigit()):
            parser.error(f"expected LABEL=METRICS[@SEED] naming a file, got {item!r}")
        steps, losses = full_model_loss(Path(path), int(seed) if seed else None)
        if not steps:
            parser.error(f"no full-model SFT records in {item!r}")
        ax.plot(steps, losses, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("warm-up step")
    ax.set_ylabel("SFT loss per token, full-model steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
