"""Up-front checks of a run's inputs: what can be known wrong before the first step runs.

A check either raises `ConfigError` (one line naming the key and the value, exit 2) or returns warnings, one line
each, for the caller to print once. Everything here runs before any training or evaluation starts, so a bad input
costs seconds rather than a warm-up.

Pure: no deepspeed, no torch.distributed; the model's config and tokenizer are passed in.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

from .config import ConfigError, ExperimentConfig
from .data import MathProblem
from .data.templates import format_prompt
from .nested.plan import num_skipped
from .reward import too_large_to_verify

# Characters named in a warning about characters the tokenizer cannot represent.
SHOWN_CHARACTERS = 8


def check_output_dir(path: str | Path, key: str = "train.output_dir") -> Path:
    """Create the directory `path` (and its parents) and prove it writable with a probe file, or raise ConfigError.

    A file at `path` (or above it), or a directory this process cannot write, would otherwise fail only at the
    first checkpoint or log line, after the warm-up."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"config key '{key}' has invalid value {str(path)!r}: it is a file, expected a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError(f"config key '{key}' has invalid value {str(path)!r}: cannot write there "
                          f"({error.strerror or error})") from None
    return path


def check_writable_file(path: str | Path, option: str) -> None:
    """Raise ConfigError unless a file can be written at `path`: its directory exists and is writable, and `path`
    is not a directory. Checked before an evaluation runs, so its report cannot be lost at the end."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a directory, expected a file path")
    if not parent.is_dir():
        raise ConfigError(f"{option} {str(path)!r}: directory {str(parent)!r} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise ConfigError(f"{option} {str(path)!r}: cannot write in {str(parent)!r} "
                          f"({error.strerror or error})") from None


def check_solutions(cfg: ExperimentConfig, problems: Sequence[MathProblem]) -> None:
    """The SFT warm-up trains on worked solutions: refuse train.sft_steps > 0 when the training problems have none."""
    if cfg.train.sft_steps == 0:
        return
    missing = sum(problem.solution is None for problem in problems)
    if missing:
        raise ConfigError(
            f"config key 'train.sft_steps' has invalid value {cfg.train.sft_steps}: the warm-up trains on worked "
            f"solutions and data.source={cfg.data.source!r} ({cfg.data.path}) has none for {missing} of "
            f"{len(problems)} problems; set train.sft_steps=0 (RL only, for a model that already scores some reward) "
            "or use a source with solutions (synthetic, gsm8k, math500, aime24, or json with a 'solution' field)")


def check_skip_layers(cfg: ExperimentConfig, num_layers: int) -> list[str]:
    """Refuse protected layers or skip ratios the model's `num_layers` cannot satisfy; warn when a nonzero skip ratio
    rounds to skipping no layer at all (the run would be plain ReFT)."""
    skip = cfg.skip
    if skip.protect_first + skip.protect_last >= num_layers:
        raise ConfigError(f"config key 'skip.protect_first/protect_last' has invalid value "
                          f"{(skip.protect_first, skip.protect_last)}: the model has {num_layers} layers, so together "
                          f"they must be < {num_layers} (at least one layer must be skippable)")
    # The largest ratio the schedule can reach: the adaptive controller moves up to ratio_max.
    ratios = {"skip.ratio": skip.ratio}
    if skip.schedule == "adaptive":
        ratios["skip.ratio_max"] = skip.ratio_max
    for key, ratio in ratios.items():
        try:
            num_skipped(num_layers, ratio, skip.protect_first, skip.protect_last)
        except ValueError as error:
            raise ConfigError(f"config key '{key}' has invalid value {ratio!r}: {error}") from None
    if cfg.train.sft_steps and cfg.train.sft_layer_drop:  # the warm-up's LayerDrop keeps the first and last layer
        try:
            num_skipped(num_layers, cfg.train.sft_layer_drop, 1, 1)
        except ValueError as error:
            raise ConfigError(f"config key 'train.sft_layer_drop' has invalid value {cfg.train.sft_layer_drop!r}: "
                              f"{error}") from None
    warnings = []
    if cfg.train.steps and skip.schedule != "adaptive" and 0 < skip.ratio and round(skip.ratio * num_layers) == 0:
        warnings.append(f"skip.ratio={skip.ratio:g} of {num_layers} layers rounds to 0 skipped layers: every RL "
                        "step samples from the full model (plain ReFT)")
    if cfg.train.sft_steps and 0 < cfg.train.sft_layer_drop and round(cfg.train.sft_layer_drop * num_layers) == 0:
        warnings.append(f"train.sft_layer_drop={cfg.train.sft_layer_drop:g} of {num_layers} layers rounds to 0 "
                        "dropped layers: the warm-up trains the full model only")
    return warnings


def unknown_characters(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """The characters of `texts` that `tokenizer` encodes as its unknown token (or, where it has none, its pad
    token): they reach the model as that token, their meaning lost. Byte-level tokenizers have none."""
    unknown_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id
    if unknown_id is None:
        return []
    characters = sorted(set("".join(texts)))
    ids = tokenizer(characters, add_special_tokens=False).input_ids if characters else []
    return [ch for ch, row in zip(characters, ids) if unknown_id in row and ch not in tokenizer.all_special_tokens]


def _max_positions(model_config: Any) -> int | None:
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text_config, "max_position_embeddings", None)


def check_model_inputs(cfg: ExperimentConfig, model_config: Any, tokenizer: Any,
                       train_problems: Sequence[MathProblem], eval_problems: Sequence[MathProblem]) -> list[str]:
    """Checks that need the model's config and tokenizer: layer counts (`check_skip_layers`), the context length
    against rollout.max_new_tokens (refused) and the prompts (warned), characters the tokenizer cannot represent,
    reference answers the verifier rejects, and an empty held-out set. Returns the warnings."""
    warnings = check_skip_layers(cfg, model_config.num_hidden_layers)
    problems = [*train_problems, *eval_problems]
    limit = _max_positions(model_config)
    if limit is not None and cfg.rollout.max_new_tokens >= limit:
        raise ConfigError(f"config key 'rollout.max_new_tokens' has invalid value {cfg.rollout.max_new_tokens}: "
                          f"expected an integer < the model's max_position_embeddings={limit} (prompt included)")
    prompts = [format_prompt(p.question, tokenizer, cfg.data.prompt_template) for p in problems]
    if limit is not None and prompts:
        lengths = [len(row) for row in tokenizer(prompts, add_special_tokens=False).input_ids]
        too_long = [n for n in lengths if n + cfg.rollout.max_new_tokens > limit]
        if too_long:
            warnings.append(f"{len(too_long)} of {len(prompts)} prompts (longest {max(lengths)} tokens) plus "
                            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} exceed the model's "
                            f"max_position_embeddings={limit}: positions past it are outside what the model "
                            "was trained on")
    texts = prompts + [p.solution for p in train_problems if p.solution is not None and cfg.train.sft_steps]
    unknown = unknown_characters(tokenizer, texts)
    if unknown:
        token = tokenizer.unk_token if tokenizer.unk_token_id is not None else tokenizer.pad_token
        shown = "".join(unknown[:SHOWN_CHARACTERS]) + ("..." if len(unknown) > SHOWN_CHARACTERS else "")
        warnings.append(f"{len(unknown)} characters in the problems are not in the tokenizer's vocabulary and "
                        f"become {token}: {shown!r}")
    unverifiable = [p for p in problems if too_large_to_verify(p.answer)]
    if unverifiable:
        warnings.append(f"{len(unverifiable)} of {len(problems)} reference answers are too long or deeply nested for "
                        f"the verifier (first: {unverifiable[0].answer[:40]!r}...): no completion can score on them")
    if not eval_problems:
        warnings.append("no held-out problems (data.eval_problems=0): held-out accuracy is n/a")
    return warnings

