"""`python -m nested_reft_ds.evaluate`: the same as `nested-reft eval`; the recipe is `recipes/evaluate.py`."""
import sys

from .recipes.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
