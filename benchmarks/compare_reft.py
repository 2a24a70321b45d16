"""Nested-ReFT vs ReFT across skip ratios, corrections and seeds: learning curves, wall time, tokens/s, plots.

    python benchmarks/compare_reft.py --config configs/compare_tiny.yaml --out runs/compare [--quick] [--parallel N]

The same as `nested-reft compare` (nested_reft_ds/recipes/compare.py documents the options, outputs and definitions).
"""
import sys

from nested_reft_ds.recipes.compare import main

if __name__ == "__main__":
    sys.exit(main())
