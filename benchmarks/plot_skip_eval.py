"""Accuracy and KL(behaviour || target) of the nested model vs skip ratio, from `nested-reft eval --skip-ratios ...
--output EVAL.json`: one PNG, to choose the ratio before training.

    python benchmarks/plot_skip_eval.py EVAL.json OUT.png
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(eval_json: str, out_png: str) -> None:
    by_benchmark: dict[str, list[dict]] = {}
    for key, row in json.load(open(eval_json))["benchmarks"].items():  # keys "NAME skip=R"
        by_benchmark.setdefault(key.split(" skip=")[0], []).append(row)
    fig, (accuracy, divergence) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, points in by_benchmark.items():
        points.sort(key=lambda r: r["skip_ratio"])
        ratios = [p["skip_ratio"] for p in points]
        for key in sorted(k for k in points[0]["metrics"] if k.startswith(("pass@", "maj@"))):
            accuracy.plot(ratios, [p["metrics"][key] for p in points], marker="o", label=key)
        kl = [(p["skip_ratio"], p["metrics"]["kl_behavior_target"]) for p in points
              if "kl_behavior_target" in p["metrics"]]
        divergence.plot([0.0] + [r for r, _ in kl], [0.0] + [v for _, v in kl], marker="o", label=name)
    accuracy.set(xlabel="skip ratio", ylabel="accuracy", title="nested model accuracy")
    divergence.set(xlabel="skip ratio", ylabel="KL per token", title="KL(behaviour || target)")
    accuracy.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
