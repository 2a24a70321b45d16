"""Throughput of `score_batch`: completions scored per second on three workloads.

- fast path: GSM8K-style completions with integer answers (decided in-process, no sympy);
- mixed: the same with one in ten answers written symbolically (`\\frac{\\sqrt{n^2}}{1}`), which goes to workers;
- sympy only: every answer needs a worker (distinct pairs, so deduplication does not help).

    python benchmarks/reward_throughput.py [--pairs 10000] [--sympy-pairs 500] [--workers N]
"""
from __future__ import annotations

import argparse
import random
import time

from nested_reft_ds.reward import VerifierPool, score_batch_with_stats


def _fast_path_workload(count: int, rng: random.Random) -> tuple[list[str], list[str]]:
    references = [str(rng.randint(0, 100_000)) for _ in range(count)]
    completions = [f"She sells {rng.randint(1, 50)} eggs a day, so the total is \\boxed{{{int(r) + rng.choice((0, 0, 1)):,}}}."
                   for r in references]
    return completions, references


def _mixed_workload(count: int, rng: random.Random) -> tuple[list[str], list[str]]:
    completions, references = _fast_path_workload(count, rng)
    for i in range(0, count, 10):
        n = int(references[i])
        completions[i] = f"Simplifying, \\boxed{{\\frac{{\\sqrt{{{n * n}}}}}{{1}}}}"
    return completions, references


def _sympy_workload(count: int, rng: random.Random) -> tuple[list[str], list[str]]:
    completions, references = [], []
    for i in range(count):
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        references.append(f"\\frac{{{a}\\sqrt{{{b}}}}}{{{i + 2}}}")
        completions.append(f"\\boxed{{\\frac{{\\sqrt{{{a * a * b}}}}}{{{i + 2}}}}}")
    return completions, references


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10_000, help="pairs in the fast-path and mixed workloads")
    parser.add_argument("--sympy-pairs", type=int, default=500, help="pairs in the sympy-only workload")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: min(4, CPUs))")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()

    rng = random.Random(0)
    workloads = {"fast path": _fast_path_workload(args.pairs, rng), "mixed (10% sympy)": _mixed_workload(args.pairs, rng),
                 "sympy only": _sympy_workload(args.sympy_pairs, rng)}
    with VerifierPool(args.workers) as pool:
        start = time.perf_counter()
        pool.start()
        print(f"{pool.max_workers} workers ready in {time.perf_counter() - start:.2f} s")
        print(f"{'workload':<20} {'pairs':>7} {'to workers':>10} {'seconds':>8} {'pairs/s':>10} {'accuracy':>9}")
        for name, (completions, references) in workloads.items():
            result = score_batch_with_stats(completions, references, timeout=args.timeout, pool=pool)
            print(f"{name:<20} {len(completions):>7} {result.worker_comparisons:>10} {result.seconds:>8.2f} "
                  f"{len(completions) / result.seconds:>10.0f} {sum(result.correct) / len(completions):>9.3f}")


if __name__ == "__main__":
    main()
