"""`nested-reft compare`: Nested-ReFT vs ReFT, measured — learning curves, wall time and tokens/s per arm and seed.

    nested-reft compare --config configs/compare_tiny.yaml --out runs/compare [--seeds 1 2 3] [--arms ...]
                        [--set section.key=value ...] [--rl-set section.key=value ...] [--parallel N] [--quick]
                        [--report-only | --warmup-only]

Runs every arm (baseline ReFT at skip ratio 0; Nested-ReFT at skip ratios 0.25 / 0.5 with the corrections
`none`, `token_tis`, `seq_mis`; the adaptive skip schedule) for every seed with `train.run`, the same recipe as
`nested-reft train`, then writes into --out:
  runs.jsonl    every metrics record of every run, tagged with `arm` and `seed` (the shared SFT warm-up as
                arm "sft")
  summary.json  per arm: mean, std and per-seed values of every summary metric, plus the definitions below
  summary.md    the same as a Markdown table
  acc_vs_time.png, acc_vs_step.png, tokens_per_s.png, ess_kl.png   (matplotlib, Agg)

The SFT warm-up does not depend on the arm, so it runs once per seed (`train.steps=0`) and every arm of that seed
starts from a copy of its output directory (`--resume auto` picks up its checkpoint). Finished runs are reused
when their resolved config is unchanged (the output directory aside, so a grid copied to another machine or path
is still reused), so an interrupted grid continues where it stopped, and `--warmup-only` can make the warm-ups on
one machine (a GPU) for the arms to run and be timed on another. Runs execute in N
worker processes (`--parallel`, default 1: sequential, the setting for timing); each worker imports torch once
and runs its jobs in-process; with N > 1 every run uses one CPU thread.

The numbers in the table are defined in DEFINITIONS below (also printed under the table).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..config import ConfigError, ExperimentConfig, config_from_dict, load_config

# ------------------------------------------------------------------------------------------------ the grid

BASELINE = "reft"
SFT_ARM = "sft"  # runs.jsonl tag of a seed's shared warm-up records
# Arm name -> the overrides that define it, applied after the config file and --set. Arms set only the rollout
# mode, skip ratio, schedule, correction and draft length; everything else (is_cap, the seq_mis band, the adaptive
# targets, rollout.max_draft_length) comes from the config file and --set, identical for every arm.
NESTED = ("rollout.mode=nested", "rollout.adaptive_draft=false")
SPECULATIVE = ("rollout.mode=speculative", "skip.schedule=fixed", "algorithm.correction=none")
ARMS: dict[str, tuple[str, ...]] = {
    BASELINE: (*NESTED, "skip.ratio=0", "skip.schedule=fixed", "algorithm.correction=none"),
    **{f"skip{ratio}-{correction}": (*NESTED, f"skip.ratio={ratio}", "skip.schedule=fixed",
                                     f"algorithm.correction={correction}")
       for ratio in (0.25, 0.5) for correction in ("none", "token_tis", "seq_mis")},
    # Starts at 0.25; moves by skip.step_size per step within [skip.ratio_min, skip.ratio_max] toward the largest
    # ratio whose ESS/N and KL stay inside skip.target_ess / skip.target_kl.
    "adaptive-token_tis": (*NESTED, "skip.ratio=0.25", "skip.schedule=adaptive", "algorithm.correction=token_tis"),
    # Exact Nested-ReFT: the nested model of skip ratio r drafts g tokens, the full model verifies (on-policy);
    # "-auto": the draft length chosen each step from the measured acceptance (rollout.adaptive_draft), from 3.
    **{f"spec{ratio}-g{g}": (*SPECULATIVE, f"skip.ratio={ratio}", f"rollout.draft_length={g}",
                             "rollout.adaptive_draft=false")
       for ratio in (0.25, 0.5, 0.75) for g in range(2, 7)},
    **{f"spec{ratio}-auto": (*SPECULATIVE, f"skip.ratio={ratio}", "rollout.draft_length=3",
                             "rollout.adaptive_draft=true")
       for ratio in (0.25, 0.5, 0.75)},
}
# The grid `compare` runs without --arms: every arm but the speculative ones, plus the speculative setting that
# `nested-reft bench speculative` measured fastest on the compare_long warm-ups (docs/results/speculative_cpu.md).
SPECULATIVE_DEFAULT = "spec0.75-g3"
DEFAULT_ARMS = tuple(arm for arm in ARMS if not arm.startswith("spec")) + (SPECULATIVE_DEFAULT,)
DEFAULT_SEEDS = (1, 2, 3)
# --quick: one seed, a 4-layer model, a few SFT and RL steps, two evaluations (before and after RL). The last layer
# is not protected, so skip 0.75 (3 of the 4 layers) can run.
QUICK_OVERRIDES = (
    "model.num_layers=4", "skip.protect_last=0", "model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2",
    "model.intermediate_size=64", "data.eval_problems=8", "rollout.prompts_per_step=2", "rollout.group_size=2",
    "rollout.max_new_tokens=8", "train.sft_steps=4", "train.sft_layer_drop_from=2", "train.steps=3",
    "train.micro_batch_size=4", "logging.eval_every=0",
)


@dataclass(frozen=True)
class CompareConfig:
    """Which runs make up the grid; errors name the option and the bad value, like config.ConfigError."""
    arms: tuple[str, ...] = DEFAULT_ARMS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    parallel: int = 1
    quick: bool = False

    def __post_init__(self) -> None:
        def require(ok: bool, key: str, value: Any, expected: str) -> None:
            if not ok:
                raise ConfigError(f"compare option '{key}' has invalid value {value!r}: expected {expected}")

        require(len(self.arms) > 0 and len(set(self.arms)) == len(self.arms), "--arms", self.arms,
                "one or more distinct arm names")
        for arm in self.arms:
            require(arm in ARMS, "--arms", arm, "one of " + ", ".join(ARMS))
        require(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "--seeds", self.seeds,
                "one or more distinct integers")
        require(self.parallel >= 1, "--parallel", self.parallel, "an integer >= 1")

    def run_seeds(self) -> tuple[int, ...]:
        return self.seeds[:1] if self.quick else self.seeds


# ----------------------------------------------------------------------- pure summary math (no I/O, no plots)

DEFINITIONS = """\
- RL wall time: the sum of the RL steps' `time_step_s` (rollout + reward + train). Held-out evaluation,
  checkpointing and start-up are excluded: they are identical across arms and not part of the method.
- final acc: held-out greedy accuracy of the full model at the last RL step; best acc: the highest over the
  run's evaluations (including the one before RL).
- acc @ equal time: per seed, T* = the shortest RL wall time among that seed's arms (the fastest arm's whole
  run); each run's eval accuracy, as a function of its RL wall time, is linearly interpolated at T*. The
  fastest arm reports its final accuracy; slower arms report where they were when it had finished.
- rollout share: time in rollout / RL wall time, over the whole run.
- rollout tok/s: completion tokens generated / time in rollout, over the whole run (a ratio of sums).
- step tok/s: completion tokens generated / RL wall time (end-to-end throughput of the RL loop).
- speed-up: step tok/s of the arm / step tok/s of the baseline, per seed (paired), then mean ± std.
- wall speed-up: RL wall time of the baseline / that of the arm, per seed (paired): the same number of RL steps
  in less time. Below the speed-up when the arm samples longer completions (more tokens to train on).
- bound: 1 / ((1 - f) + f / r), per seed, with f the baseline's rollout share and r the arm's rollout tok/s over
  the baseline's: the end-to-end speed-up if rollout alone got r times faster and nothing else changed. With
  r = e / (1 - s) it is 1 / ((1 - f) + f (1 - s) / e), e the rollout efficiency at skip ratio s.
- completion tokens: mean sampled completion length per RL step (behaviour model's samples).
- run CPU s: CPU seconds of the run's worker process (start-up, RL steps, evaluations, checkpoints; not the
  reward verifier's helper processes). Unlike wall time it does not grow when other jobs share the machine.
- ESS, KL: run means of the per-step ESS/N of the weights used and KL(beta || pi) per token (k3 estimator).
- mean ± std: over seeds, sample standard deviation (n - 1); with one seed no std is shown.
"""


def mean_std(values: Iterable[float]) -> dict[str, float | None]:
    """{"mean", "std", "n"} over seeds; std is the sample std (n - 1), None for one value; empty -> mean None."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def rl_wall_times(records: list[dict]) -> dict[int, float]:
    """RL wall time after k completed steps, {k: seconds} for k = 0..steps (sum of `time_step_s`)."""
    steps = sorted((r["step"], r["time_step_s"]) for r in records if r["phase"] == "rl")
    assert [s for s, _ in steps] == list(range(len(steps))), "RL records must be steps 0..N-1, each once"
    wall, total = {0: 0.0}, 0.0
    for step, seconds in steps:
        total += seconds
        wall[step + 1] = total
    return wall


def eval_curve(records: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """(steps, RL wall seconds, accuracy) of a run's held-out evaluations, in step order."""
    wall = rl_wall_times(records)
    evals = sorted((r["step"], r["heldout_accuracy"]) for r in records if r["phase"] == "eval")
    return [s for s, _ in evals], [wall[s] for s, _ in evals], [a for _, a in evals]


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Linear interpolation of the curve (xs increasing) at x; outside [xs[0], xs[-1]] the nearest end value."""
    return float(np.interp(x, xs, ys))


def run_metrics(records: list[dict]) -> dict[str, float]:
    """Summary numbers of one run from its records (phases rl and eval, and the runner's "job" record)."""
    rl = [r for r in records if r["phase"] == "rl"]
    _, _, accuracy = eval_curve(records)
    rollout_s = sum(r["time_rollout_s"] for r in rl)
    step_s = sum(r["time_step_s"] for r in rl)
    tokens = sum(r["rollout_tokens_per_s"] * r["time_rollout_s"] for r in rl)  # completion tokens generated
    return {
        "final_accuracy": accuracy[-1], "best_accuracy": max(accuracy), "initial_accuracy": accuracy[0],
        "rl_steps": len(rl), "rollout_share": rollout_s / step_s,
        "rl_wall_s": step_s, "rollout_tokens_per_s": tokens / rollout_s, "step_tokens_per_s": tokens / step_s,
        "time_per_step_s": step_s / len(rl),
        "time_rollout_s": rollout_s, "time_reward_s": sum(r["time_reward_s"] for r in rl),
        "time_train_s": sum(r["time_train_s"] for r in rl),
        "completion_length": statistics.fmean(r["completion_length"] for r in rl),
        "reward_mean": statistics.fmean(r["reward_mean"] for r in rl),
        "skip_ratio": statistics.fmean(r["skip_ratio"] for r in rl),
        "ess": statistics.fmean(r["ess"] for r in rl),
        "kl_behavior_k3": statistics.fmean(r["kl_behavior_k3"] for r in rl),
        "frac_truncated": statistics.fmean(r["frac_truncated"] for r in rl),
        "frac_masked": statistics.fmean(r["frac_masked"] for r in rl),
        "run_cpu_s": next((r["cpu_s"] for r in records if r["phase"] == "job"), None),
    }


def amdahl_bound(rollout_share: float, rollout_speedup: float) -> float:
    """End-to-end speed-up when the rollout share f of a step gets `rollout_speedup` times faster, the rest not."""
    return 1.0 / ((1.0 - rollout_share) + rollout_share / rollout_speedup)


def summarize(runs: dict[tuple[str, int], list[dict]], baseline: str = BASELINE) -> dict[str, Any]:
    """Per arm: mean ± std over seeds of every `run_metrics` number, accuracy at equal wall time and speed-up.

    `runs` maps (arm, seed) to that run's records. The equal-time budget T* of a seed is its shortest RL wall
    time over arms; speed-up is paired by seed and absent for seeds without a baseline run."""
    per_run = {key: run_metrics(records) for key, records in runs.items()}
    seeds = sorted({seed for _, seed in runs})
    equal_time = {seed: min(m["rl_wall_s"] for (_, s), m in per_run.items() if s == seed) for seed in seeds}
    for (arm, seed), metrics in per_run.items():
        _, wall, accuracy = eval_curve(runs[(arm, seed)])
        metrics["accuracy_at_equal_time"] = interpolate(wall, accuracy, equal_time[seed])
        base = per_run.get((baseline, seed))
        metrics["speedup"] = metrics["step_tokens_per_s"] / base["step_tokens_per_s"] if base else None
        metrics["wall_speedup"] = base["rl_wall_s"] / metrics["rl_wall_s"] if base else None
        metrics["speedup_bound"] = amdahl_bound(base["rollout_share"], metrics["rollout_tokens_per_s"]
                                                / base["rollout_tokens_per_s"]) if base else None
    order = list(ARMS)
    arms = sorted({arm for arm, _ in runs}, key=lambda a: (order.index(a) if a in ARMS else len(order), a))
    table = {}
    for arm in arms:
        arm_runs = {seed: per_run[(a, seed)] for a, seed in per_run if a == arm}
        names = next(iter(arm_runs.values())).keys()
        table[arm] = {name: {**mean_std(m[name] for m in arm_runs.values()),
                             "per_seed": {str(seed): m[name] for seed, m in sorted(arm_runs.items())}}
                      for name in names}
    return {"baseline": baseline, "seeds": seeds, "equal_time_s": {str(s): t for s, t in equal_time.items()},
            "arms": table, "paired": paired_differences(runs, equal_time, baseline)}


BOOTSTRAP_RESAMPLES = 10_000


def correct_vectors(records: list[dict]) -> tuple[list[float], list[np.ndarray]] | None:
    """(RL wall seconds, per-problem correctness [problems]) of a run's evaluations, or None when its records
    predate `heldout_correct`."""
    wall = rl_wall_times(records)
    evals = sorted((r["step"], r.get("heldout_correct")) for r in records if r["phase"] == "eval")
    if not evals or any(vector is None for _, vector in evals):
        return None
    return [wall[s] for s, _ in evals], [np.frombuffer(v.encode(), dtype=np.uint8) - ord("0") for _, v in evals]


def vector_at(walls: list[float], vectors: list[np.ndarray], t: float) -> np.ndarray:
    """Each problem's correctness linearly interpolated at wall time t (the nearest end outside the evaluations):
    its mean is `interpolate` of the accuracy curve at t."""
    if t <= walls[0]:
        return vectors[0].astype(float)
    if t >= walls[-1]:
        return vectors[-1].astype(float)
    i = int(np.searchsorted(walls, t, side="right")) - 1
    w = (t - walls[i]) / (walls[i + 1] - walls[i])
    return (1 - w) * vectors[i] + w * vectors[i + 1]


def bootstrap_mean(differences: list[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> dict[str, float]:
    """Mean over seeds of each seed's mean per-problem difference, with a 95% percentile interval from
    resampling each seed's problems with replacement (problems are the unit: both runs of a pair saw the same)."""
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for d in differences:
        means += d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1)
    means /= len(differences)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(np.mean([d.mean() for d in differences])), "low": float(low), "high": float(high),
            "problems": int(sum(len(d) for d in differences))}


def paired_differences(runs: dict[tuple[str, int], list[dict]], equal_time: dict[int, float],
                       baseline: str = BASELINE) -> dict[str, dict[str, Any]]:
    """Per arm, held-out accuracy minus the baseline's on the same problems, at the end and at equal wall time:
    per seed and pooled over seeds, each with a 95% bootstrap interval over problems. Arms or seeds whose
    records lack per-problem results are left out."""
    out: dict[str, dict[str, Any]] = {}
    for (arm, seed), records in sorted(runs.items()):
        base = runs.get((baseline, seed))
        mine, theirs = correct_vectors(records), correct_vectors(base) if base is not None else None
        if arm == baseline or mine is None or theirs is None or len(mine[1][-1]) != len(theirs[1][-1]):
            continue
        entry = out.setdefault(arm, {"final": {}, "equal_time": {}})
        entry["final"][seed] = mine[1][-1].astype(float) - theirs[1][-1]
        entry["equal_time"][seed] = (vector_at(*mine, equal_time[seed]) - vector_at(*theirs, equal_time[seed]))
    return {arm: {when: {"per_seed": {str(seed): bootstrap_mean([d]) for seed, d in per_seed.items()},
                         "pooled": bootstrap_mean(list(per_seed.values()))}
                  for when, per_seed in entry.items()}
            for arm, entry in out.items()}


def paired_table(summary: dict[str, Any]) -> str:
    """The paired differences against the baseline, pooled and per seed: mean [95% interval]."""
    def cell(stat: dict[str, float]) -> str:
        return f"{stat['mean']:+.3f} [{stat['low']:+.3f}, {stat['high']:+.3f}]"
    header = ["arm", "final acc - baseline (pooled)", "per seed", "acc @ equal time - baseline (pooled)", "per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, entry in summary.get("paired", {}).items():
        row = [arm]
        for when in ("final", "equal_time"):
            row += [cell(entry[when]["pooled"]),
                    " / ".join(f"{seed}: {cell(stat)}" for seed, stat in entry[when]["per_seed"].items())]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def fmt(stat: dict[str, float | None], digits: int, suffix: str = "") -> str:
    """'mean ± std' (or just the mean for one seed; '–' when absent)."""
    if stat["mean"] is None:
        return "–"
    text = f"{stat['mean']:.{digits}f}{suffix}"
    return text if stat["std"] is None else f"{text} ± {stat['std']:.{digits}f}{suffix}"


TABLE_COLUMNS = (("final acc", "final_accuracy", 3, ""), ("best acc", "best_accuracy", 3, ""),
                 ("acc @ equal time", "accuracy_at_equal_time", 3, ""), ("rollout share", "rollout_share", 2, ""),
                 ("rollout tok/s", "rollout_tokens_per_s", 0, ""), ("step tok/s", "step_tokens_per_s", 0, ""),
                 ("speed-up", "speedup", 2, "x"), ("wall speed-up", "wall_speedup", 2, "x"),
                 ("bound", "speedup_bound", 2, "x"), ("RL wall s", "rl_wall_s", 1, ""), ("run CPU s", "run_cpu_s", 1, ""),
                 ("completion tokens", "completion_length", 0, ""), ("skip ratio", "skip_ratio", 2, ""),
                 ("ESS", "ess", 3, ""), ("KL(β‖π)", "kl_behavior_k3", 4, ""))
# The per-seed table: what decides "faster at the baseline's accuracy on every seed".
PER_SEED_COLUMNS = (("initial acc", "initial_accuracy", 3), ("final acc", "final_accuracy", 3),
                    ("best acc", "best_accuracy", 3), ("speed-up", "speedup", 2), ("wall speed-up", "wall_speedup", 2),
                    ("bound", "speedup_bound", 2), ("rollout share", "rollout_share", 2))


def markdown_table(summary: dict[str, Any]) -> str:
    header = ["arm"] + [title for title, *_ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, stats in summary["arms"].items():
        lines.append("| " + " | ".join([arm] + [fmt(stats[key], digits, suffix)
                                                for _, key, digits, suffix in TABLE_COLUMNS]) + " |")
    return "\n".join(lines)


def per_seed_table(summary: dict[str, Any]) -> str:
    """Each arm's per-seed values ("seed 1 / seed 2 / ..."); '–' where a seed has no run or no baseline."""
    seeds = [str(seed) for seed in summary["seeds"]]
    header = ["arm"] + [title for title, *_ in PER_SEED_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, stats in summary["arms"].items():
        cells = []
        for _, key, digits in PER_SEED_COLUMNS:
            values = [stats[key]["per_seed"].get(seed) for seed in seeds]
            cells.append(" / ".join("–" if v is None else f"{v:.{digits}f}" for v in values))
        lines.append("| " + " | ".join([arm] + cells) + " |")
    return "\n".join(lines)


def markdown_report(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    times = ", ".join(f"seed {seed}: {t:.1f} s" for seed, t in summary["equal_time_s"].items())
    return "\n".join([
        "# Nested-ReFT vs ReFT", "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; {meta['parallel']} run(s) at a time  ",
        f"Seeds: {', '.join(map(str, summary['seeds']))}; RL steps per run: {meta['rl_steps']}; "
        f"baseline: `{summary['baseline']}`; equal-time budget T*: {times}", "",
        markdown_table(summary), "", f"Per seed ({' / '.join(map(str, summary['seeds']))}):", "",
        per_seed_table(summary), "",
        *(["Paired differences against the baseline on the same held-out problems (mean [95% bootstrap "
           "interval over problems]; pooled: the mean over seeds):", "", paired_table(summary), ""]
          if summary.get("paired") else []),
        "Definitions:", "", DEFINITIONS])


# ------------------------------------------------------------------------------------------------------ plots

PLOTS = ("acc_vs_time.png", "acc_vs_step.png", "tokens_per_s.png", "ess_kl.png")


def seed_band(curves: list[tuple[list[float], list[float]]], grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (0 for one seed) over seeds of curves (xs, ys), each interpolated on `grid`."""
    values = np.stack([np.interp(grid, xs, ys) for xs, ys in curves])  # [seeds, len(grid)]
    return values.mean(0), values.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(grid))


def moving_mean(ys: list[float], window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start), same length as `ys`."""
    sums = np.concatenate([[0.0], np.cumsum(ys, dtype=float)])
    end = np.arange(1, len(ys) + 1)
    start = np.maximum(0, end - window)
    return (sums[end] - sums[start]) / (end - start)


def plot_all(runs: dict[tuple[str, int], list[dict]], summary: dict[str, Any], out: Path) -> None:
    """Write the PLOTS into `out`: one line per arm, the band is ± one std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary["arms"])
    colors = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    seeds_of = {arm: [seed for a, seed in runs if a == arm] for arm in arms}

    def band(ax, arm, curves, grid, label=True):
        mean, std = seed_band(curves, grid)
        style = "--" if arm == summary["baseline"] else "-"
        ax.plot(grid, mean, style, color=colors[arm], label=arm if label else None, lw=1.6)
        ax.fill_between(grid, mean - std, mean + std, color=colors[arm], alpha=0.15, lw=0)

    def save(fig, name, rect=(0, 0, 1, 1)):
        fig.tight_layout(rect=rect)
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    # Accuracy vs RL wall time (each arm up to its shortest seed) and vs step.
    for name, x_index, xlabel in (("acc_vs_time.png", 1, "RL wall time (s)"), ("acc_vs_step.png", 0, "RL step")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for arm in arms:
            curves = [eval_curve(runs[(arm, seed)]) for seed in seeds_of[arm]]
            xy = [(c[x_index], c[2]) for c in curves]
            grid = np.linspace(0.0, min(xs[-1] for xs, _ in xy), 60)
            band(ax, arm, xy, grid)
        if x_index == 1:
            for t in summary["equal_time_s"].values():
                ax.axvline(t, color="grey", lw=0.6, ls=":")
        ax.set(xlabel=xlabel, ylabel="held-out accuracy (greedy)", ylim=(0, 1),
               title=f"Held-out accuracy vs {xlabel.split(' (')[0]} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        save(fig, name)

    # Throughput per arm.
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(arms) + 2), 4.5))
    x = np.arange(len(arms))
    for offset, key, alpha in ((-0.2, "rollout_tokens_per_s", 1.0), (0.2, "step_tokens_per_s", 0.55)):
        stats = [summary["arms"][arm][key] for arm in arms]
        ax.bar(x + offset, [s["mean"] for s in stats], 0.4, yerr=[s["std"] or 0.0 for s in stats], capsize=3,
               color=[colors[a] for a in arms], alpha=alpha, edgecolor="black", lw=0.5)
    ax.set_xticks(x, arms, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="completion tokens / s", title="Throughput per arm (solid: rollout, light: end-to-end step)")
    ax.grid(axis="y", alpha=0.3)
    save(fig, "tokens_per_s.png")

    # Off-policy diagnostics over training, smoothed over ~1/20 of the run.
    window = max(1, max(sum(r["phase"] == "rl" for r in records) for records in runs.values()) // 20)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, key, title, smooth in zip(axes, ("ess", "kl_behavior_k3", "skip_ratio"),
                                      ("ESS / N of the weights used", "KL(β ‖ π) per token (k3)", "skip ratio"),
                                      (window, window, 1)):
        for arm in arms:
            curves = []
            for seed in seeds_of[arm]:
                rl = sorted((r["step"], r[key]) for r in runs[(arm, seed)] if r["phase"] == "rl")
                curves.append(([s for s, _ in rl], moving_mean([v for _, v in rl], smooth)))
            grid = np.arange(min(len(xs) for xs, _ in curves), dtype=float)
            band(ax, arm, curves, grid, label=key == "ess")
        ax.set(xlabel="RL step", title=title + (f" ({smooth}-step mean)" if smooth > 1 else ""))
        ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="lower center", ncol=min(len(arms), 5))
    save(fig, "ess_kl.png", rect=(0, 0.12, 1, 1))


# ----------------------------------------------------------------------------------------------- orchestration

@dataclass(frozen=True)
class Job:
    """One `train.run`: a seed's SFT warm-up (arm SFT_ARM) or one arm started from that warm-up."""
    arm: str
    seed: int
    cfg: ExperimentConfig

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


DONE_FILE = "compare_job.json"  # written when a run finishes: its resolved config (reused on a rerun), its times


def plan_jobs(config: str | None, overrides: list[str], grid: CompareConfig, out: Path,
              rl_overrides: Sequence[str] = ()) -> tuple[dict[int, Job | None], list[Job]]:
    """The SFT job per seed (None when train.sft_steps is 0) and the arm jobs, every config resolved and
    validated up front. Order of overrides: quick settings, --set, --rl-set (arms only), the arm's, then seed and
    output directory. --rl-set leaves the warm-ups' configs alone, so RL settings (lr, steps, is_cap...) can be
    swept on warm-ups that are already made; the arm's own settings come last and keep the arm what it says."""
    common = [*(QUICK_OVERRIDES if grid.quick else ()), *overrides,
              *(["train.cpu_threads=1"] if grid.parallel > 1 else [])]
    warmup = load_config(config, common).train.sft_steps > 0
    sft, arms = {}, []
    for index, seed in enumerate(grid.run_seeds()):
        sft[seed] = Job(SFT_ARM, seed, load_config(config, [*common, f"train.seed={seed}", "train.steps=0",
                                                             f"train.output_dir={out / 'sft' / f'seed{seed}'}"])
                        ) if warmup else None
        # Each seed runs the arms in a rotated order, so slow drifts in machine load do not favour one arm.
        for arm in grid.arms[index % len(grid.arms):] + grid.arms[:index % len(grid.arms)]:
            arms.append(Job(arm, seed, load_config(config, [*common, *rl_overrides, *ARMS[arm], f"train.seed={seed}",
                                                            f"train.output_dir={out / 'runs' / arm / f'seed{seed}'}"])))
    return sft, arms


def is_done(job: Job, ds_config: str | None) -> bool:
    """Whether the job's directory holds a finished run of the same resolved config and DeepSpeed JSON. Where the
    directory lies does not matter: `--out` resolves to an absolute path, which a copied grid does not keep."""
    done = job.out_dir / DONE_FILE
    if not done.is_file():
        return False
    record = json.loads(done.read_text())

    def located_anywhere(config: dict) -> dict:
        return {**config, "train": {**config["train"], "output_dir": None}}

    try:  # read as a config today: a key added since takes its default, which is how the run ran
        saved = config_from_dict(record["config"]).to_dict()
    except ConfigError:  # a key removed or renamed since: not this job's run
        return False
    return located_anywhere(saved) == located_anywhere(job.cfg.to_dict()) and record["deepspeed"] == ds_config


def prepare_dir(job: Job, sft: Job | None) -> None:
    """Fresh output directory: a copy of the seed's SFT run (its checkpoint and base model), minus its logs. What the
    directory held (a run of another config, or an unfinished one) is moved aside, never deleted: a warm-up can be
    an hour of compute."""
    if job.out_dir.exists() and any(job.out_dir.iterdir()):
        aside = job.out_dir.with_name(f"{job.out_dir.name}.previous-{time.strftime('%Y%m%dT%H%M%S')}")
        job.out_dir.rename(aside)
        print(f"compare: {job.out_dir} held a run of another config or an unfinished one; moved to {aside}",
              flush=True)
    shutil.rmtree(job.out_dir, ignore_errors=True)
    if sft is None:
        job.out_dir.mkdir(parents=True)
        return
    shutil.copytree(sft.out_dir, job.out_dir,
                    ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard", "train.log", DONE_FILE))


def _die_with_parent() -> None:
    """A worker of a killed `compare` would go on training into a directory the next compare clears: on Linux the
    kernel sends it SIGTERM when its parent dies, whatever killed the parent (SIGKILL included)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    from multiprocessing import parent_process

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    parent = parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker() -> None:
    """Each worker is a bare single process (its own 1-rank process group, never a launcher's) that imports the
    training stack once, before its first job's clock starts, and does not outlive `compare`."""
    _die_with_parent()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from . import train  # noqa: F401


def _train_in_worker(cfg: ExperimentConfig, ds_config: str | None, log_path: str) -> tuple[float, float]:
    """`train.run` in this worker process with its output going to `log_path`; returns (wall, CPU) seconds."""
    from .train import run

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    start, cpu_start = time.perf_counter(), time.process_time()
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            run(cfg, ds_config, "auto")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return time.perf_counter() - start, time.process_time() - cpu_start


def execute(sft: dict[int, Job | None], arms: list[Job], parallel: int, ds_config: str | None) -> None:
    """Run every job not already done: each seed's SFT first, then its arms (as soon as that SFT finishes)."""
    todo_arms = [job for job in arms if not is_done(job, ds_config)]
    total, finished = sum(j is not None and not is_done(j, ds_config) for j in sft.values()) + len(todo_arms), 0
    print(f"compare: {total} run(s) to do, {len(arms) - len(todo_arms)} arm run(s) reused", flush=True)
    with ProcessPoolExecutor(parallel, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        def submit(job: Job):
            prepare_dir(job, sft[job.seed] if job.arm != SFT_ARM else None)
            return pool.submit(_train_in_worker, job.cfg, ds_config, str(job.out_dir / "train.log"))

        def arms_of(seed: int) -> dict:
            return {submit(job): job for job in todo_arms if job.seed == seed}

        pending = {}
        for seed, job in sft.items():
            if job is not None and not is_done(job, ds_config):
                pending[submit(job)] = job
            else:
                pending.update(arms_of(seed))
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                try:
                    wall, cpu = future.result()
                except Exception as err:
                    for other in pending:
                        other.cancel()
                    raise RuntimeError(f"run {job.arm} seed {job.seed} failed ({err}); its log: "
                                       f"{job.out_dir / 'train.log'}") from err
                (job.out_dir / DONE_FILE).write_text(json.dumps({"config": job.cfg.to_dict(), "deepspeed": ds_config,
                                                                 "wall_s": wall, "cpu_s": cpu}))
                finished += 1
                print(f"[{finished}/{total}] {job.arm} seed {job.seed}: {wall:.1f} s wall, {cpu:.1f} s CPU",
                      flush=True)
                if job.arm == SFT_ARM:
                    pending.update(arms_of(job.seed))


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(sft: dict[int, Job | None], arms: list[Job], out: Path) -> Path:
    """runs.jsonl: every record of every run, tagged with arm and seed, then the run's "job" record (wall and
    CPU seconds of the whole run as the runner measured them)."""
    path = out / "runs.jsonl"
    with open(path, "w") as f:
        for job in [j for j in sft.values() if j is not None] + arms:
            done = json.loads((job.out_dir / DONE_FILE).read_text())
            job_record = {"phase": "job", "step": None, "wall_s": done["wall_s"], "cpu_s": done["cpu_s"]}
            for record in read_records(job.out_dir / "metrics.jsonl") + [job_record]:
                f.write(json.dumps({"arm": job.arm, "seed": job.seed, **record}) + "\n")
    return path


def load_runs(path: Path) -> dict[tuple[str, int], list[dict]]:
    """runs.jsonl -> {(arm, seed): records} for the RL arms (SFT records left out)."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for record in read_records(path):
        if record["arm"] != SFT_ARM:
            runs.setdefault((record["arm"], record["seed"]), []).append(record)
    return runs


def machine() -> str:
    import torch

    from .bench import cpu_name
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs, "
            f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}")


def report(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """summary.json, summary.md and the plots from out/runs.jsonl."""
    runs = load_runs(out / "runs.jsonl")
    summary = summarize(runs)
    steps = sorted({sum(r["phase"] == "rl" for r in records) for records in runs.values()})
    meta = {**meta, "rl_steps": steps[0] if len(steps) == 1 else steps}
    (out / "summary.json").write_text(json.dumps({**summary, "meta": meta,
                                                  "definitions": DEFINITIONS}, indent=1))
    (out / "summary.md").write_text(markdown_report(summary, meta))
    plot_all(runs, summary, out)
    return summary


# ------------------------------------------------------------------------------------------------------- CLI

def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", default="configs/compare_tiny.yaml", help="base experiment YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the base config for every run, e.g. --set train.steps=60 (repeatable)")
    parser.add_argument("--rl-set", dest="rl_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the config of the RL arms only, not the warm-ups, e.g. --rl-set "
                             "train.lr=5e-5: reuses warm-ups made without it (repeatable)")
    parser.add_argument("--out", default="runs/compare", help="output directory (runs, tables, plots)")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), metavar="ARM",
                        help=f"arms to run (default: {' '.join(DEFAULT_ARMS)}): {', '.join(ARMS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="train.seed of each run")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="runs at a time, one CPU thread each (default 1: sequential, for timing)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: first seed only, 4-layer model, a few SFT/RL steps, two evaluations")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON for every run (default: train.zero_stage)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true",
                      help="only rebuild summary and plots from <out>/runs.jsonl")
    mode.add_argument("--warmup-only", action="store_true",
                      help="only run each seed's SFT warm-up (reused by a later compare on the same config, "
                           "also after <out> is copied to another machine)")
    return parser


def command_line(args: argparse.Namespace) -> str:
    """The `nested-reft compare` command that regenerates this grid (defaults left out)."""
    def repeated(flag: str, values: list[str]) -> list[str]:
        return [word for value in values for word in (flag, value)]

    words = ["nested-reft", "compare", "--config", args.config, *repeated("--set", args.overrides),
             *repeated("--rl-set", args.rl_overrides), "--out", args.out]
    if tuple(args.seeds) != DEFAULT_SEEDS:
        words += ["--seeds", *map(str, args.seeds)]
    if list(args.arms) != list(DEFAULT_ARMS):
        words += ["--arms", *args.arms]
    words += ["--parallel", str(args.parallel)] if args.parallel != 1 else []
    words += ["--quick"] if args.quick else []
    words += ["--deepspeed", args.deepspeed] if args.deepspeed else []
    return shlex.join(words)


def compare_main(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    try:  # every user error surfaces here, before anything starts
        grid = CompareConfig(arms=tuple(args.arms), seeds=tuple(args.seeds), parallel=args.parallel, quick=args.quick)
        if args.report_only and not (out / "runs.jsonl").is_file():
            raise ConfigError(f"--report-only: {str(out / 'runs.jsonl')!r} does not exist")
        sft, arms = ({}, []) if args.report_only else plan_jobs(args.config, args.overrides, grid, out,
                                                                args.rl_overrides)
    except ConfigError as err:
        print(f"nested-reft: error: {err}", file=sys.stderr)
        return 2
    meta = {"command": command_line(args), "machine": machine(), "parallel": grid.parallel, "config": args.config,
            "overrides": args.overrides, "rl_overrides": args.rl_overrides, "quick": grid.quick}
    if args.report_only:
        previous = out / "summary.json"  # keep the command and machine of the run that made runs.jsonl
        report(out, json.loads(previous.read_text())["meta"] if previous.is_file() else meta)
        print(f"compare: wrote {out / 'summary.md'}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        execute(sft, [] if args.warmup_only else arms, grid.parallel, args.deepspeed)
    except RuntimeError as err:
        print(f"nested-reft compare: {err}", file=sys.stderr)
        return 1
    if args.warmup_only:
        print(f"compare: {time.perf_counter() - start:.0f} s; warm-ups in {out / 'sft'}")
        return 0
    collect(sft, arms, out)
    report(out, meta)
    print((out / "summary.md").read_text())
    print(f"compare: {time.perf_counter() - start:.0f} s; wrote {out}/runs.jsonl, summary.md, summary.json, "
          + ", ".join(PLOTS))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nested-reft compare", description=__doc__.splitlines()[0])
    return compare_main(add_compare_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
