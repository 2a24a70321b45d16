"""ZeRO-3 rollout benchmark: gather mode x skip ratio -> tokens/s, bytes all-gathered, collectives, peak memory,
and the ratios R1-R3 with their targets, measured in one 2-rank run (see nested_reft_ds/recipes/bench_rollout.py).

    python benchmarks/rollout.py [--layers 24 --hidden-size 512 --batch-size 4 --new-tokens 12 --repeats 3 ...]

is `nested-reft bench rollout` with the same options.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nested_reft_ds.recipes.bench_rollout import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
