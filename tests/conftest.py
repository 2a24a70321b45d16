import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny test models run fastest on one thread per process (and test subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
# Fixtures shared with the benchmarks (the exactly solvable toy problem) live in benchmarks/, not in the package.
sys.path.insert(0, str(REPO / "benchmarks"))
# Benchmark files live beside the repository (../shared/data); tests that need them skip without it.
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Embedded tiny checkpoints for each supported architecture, built once per session."""
    from nested_reft_ds.config import ModelConfig
    from nested_reft_ds.model import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(ModelConfig(arch=arch, num_layers=6, hidden_size=64, num_heads=4,
                                               num_kv_heads=2, intermediate_size=128), root / arch, seed=0)
            for arch in ("qwen2", "llama", "qwen3", "mistral")}
