"""`python -m nested_reft_ds.train`: the module entry every launcher execs; the recipe is `recipes/train.py`."""
import sys

from .recipes.train import main

if __name__ == "__main__":
    sys.exit(main())
