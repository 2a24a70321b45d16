import os
import socket
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


def free_port() -> int:
    """A TCP port free on the loopback now, for a launcher's rendezvous (tests import it from here)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Embedded tiny checkpoints for each supported architecture, built once per session."""
    from nested_reft_ds.config import ModelConfig
    from nested_reft_ds.model import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(ModelConfig(arch=arch, num_layers=6, hidden_size=64, num_heads=4,
                                               num_kv_heads=2, intermediate_size=128), root / arch, seed=0)
            for arch in ("qwen2", "llama", "qwen3", "mistral")}


# A Qwen-style chat template: each turn `<|im_start|>role\ncontent<|im_end|>\n`, then the assistant's turn opened.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2


def build_bpe_model(out_dir: Path) -> Path:
    """A tiny Qwen2 checkpoint with a real byte-level BPE tokenizer, built locally (no hub) the way Qwen ships
    one: special tokens `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (the tokenizer's EOS), a chat template,
    and both `<|im_end|>` and `<|endoftext|>` as EOS ids in generation_config.json."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast, Qwen2Config

    from nested_reft_ds.data import synthetic_problems
    from nested_reft_ds.data.templates import INSTRUCTION

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(QWEN_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"{p.question}\n{INSTRUCTION}\n{p.solution}" for p in synthetic_problems(300, seed=0)]
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left", clean_up_tokenization_spaces=False)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(bos_token_id=endoftext, eos_token_id=[im_end, endoftext],
                                               pad_token_id=endoftext)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def bpe_model(tmp_path_factory):
    """`build_bpe_model` once per session."""
    return build_bpe_model(tmp_path_factory.mktemp("bpe_qwen2"))


@pytest.fixture(scope="session")
def bpe_run(bpe_model, tmp_path_factory):
    """`nested-reft train` (the real CLI) on the BPE model: 2 warm-up and 2 RL steps, nothing held out, a
    checkpoint per step. Returns (output_dir, the completed process)."""
    import subprocess

    out = tmp_path_factory.mktemp("bpe_run") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "nested_reft_ds.cli", "train", "--config", str(REPO / "configs" / "tiny_zero3_2rank.yaml"),
         *(arg for setting in (f"model.path={bpe_model}", f"train.output_dir={out}", "train.cpu_threads=1",
                               "data.eval_problems=0", "train.save_every=1", "rollout.max_new_tokens=12")
           for arg in ("--set", setting))],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc
