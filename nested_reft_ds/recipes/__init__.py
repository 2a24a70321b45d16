"""Recipes: the programs built from the library (training, evaluation, the comparison grid, benchmarks).

A recipe may import any library module; no library module imports a recipe (tests/test_layout.py).
"""
