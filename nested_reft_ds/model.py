"""Models and tokenizers: the embedded tiny default, local HF checkpoints, and the attention choice.

The embedded default is a real `transformers` decoder (Qwen2 by default; Llama, Qwen3 and Mistral go through
the same code) built from a small config, with a character-level tokenizer built with `tokenizers`. Both are
written with `save_pretrained`, so the default run needs no model hub and its output loads like any checkpoint.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

PAD, EOS = "<pad>", "<eos>"
# Every printable ASCII character is one token: arithmetic, LaTeX (\boxed{}) and English all tokenise.
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids 0/1 are <pad>/<eos>, then one id per printable ASCII character."""
    vocab = {PAD: 0, EOS: 1, **{ch: i + 2 for i, ch in enumerate(CHARACTERS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    # Split into single characters; keep whitespace as tokens so decode(encode(x)) == x.
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, padding_side="left",
                                   clean_up_tokenization_spaces=False)


def _tiny_hf_config(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config, "mistral": MistralConfig}
    kwargs = dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=512, tie_word_embeddings=True,
                  bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if cfg.arch == "qwen3":
        kwargs["head_dim"] = cfg.hidden_size // cfg.num_heads
    return config_class[cfg.arch](**kwargs)


def build_tiny_model(cfg: ModelConfig, out_dir: str | Path, seed: int) -> Path:
    """Build the embedded model + tokenizer from `cfg` with a seeded init and `save_pretrained` both to out_dir."""
    out_dir = Path(out_dir)
    tokenizer = build_char_tokenizer()
    hf_config = _tiny_hf_config(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def select_attn_implementation(requested: str = "auto") -> str:
    """flash_attention_2 on CUDA when flash-attn imports, else sdpa; an explicit request is honoured/checked."""
    flash_ok = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if requested == "flash_attention_2" and not flash_ok:
        raise ConfigError("model.attn_implementation='flash_attention_2' needs CUDA and the flash-attn package "
                         "(pip install flash-attn); use 'auto' or 'sdpa'")
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    return requested


# Files any one of which a Hugging Face tokenizer loads from (fast, BPE vocab + merges, or sentencepiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_model_dir(path: str | Path, what: str = "model.path") -> Path:
    """`path` as a Path if it is a Hugging Face checkpoint directory with a tokenizer; else ConfigError naming
    `what`. Without a tokenizer file, loading picks up an empty or unrelated vocabulary and fails only while
    generating ("cannot reshape tensor of 0 elements")."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{what}={str(path)!r} is not a Hugging Face checkpoint directory (no config.json)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{what}={str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
                          "base model's tokenizer files into it")
    return path


def load_tokenizer(path: Path):
    # transformers 5's AutoTokenizer replaces a generic tokenizer.json with the model type's tokenizer class
    # (Qwen2Tokenizer re-splits our characters and drops spaces); a checkpoint that declares the generic
    # backend, as the embedded one does, is loaded with that backend.
    config_file = path / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    loader = PreTrainedTokenizerFast if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") else AutoTokenizer
    return loader.from_pretrained(path, padding_side="left")


def load_model_and_tokenizer(path: str | Path, attn_implementation: str = "auto",
                             dtype: torch.dtype = torch.float32):
    """Load a local HF checkpoint directory (model + tokenizer). Raises ValueError if it is not one."""
    path = check_model_dir(path)
    attn = select_attn_implementation(attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype)
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s (%s, %d layers, attention=%s, dtype=%s)", path, model.config.model_type,
             model.config.num_hidden_layers, attn, dtype)
    return model, tokenizer
