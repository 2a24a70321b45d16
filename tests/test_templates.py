"""Prompt templates: the chat-template branch (a local tokenizer with a Jinja chat template), the plain
template, custom template strings and instructions."""
from __future__ import annotations

import pytest

from nested_reft_ds.data.templates import INSTRUCTION, PLAIN_TEMPLATE, check_template, format_prompt, render

CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
QUESTION = "What is 3 + {4}?"  # braces in a question are text, not placeholders


@pytest.fixture
def chat_tokenizer():
    from nested_reft_ds.model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_plain_template_without_a_tokenizer_or_chat_template():
    from nested_reft_ds.model import build_char_tokenizer

    expected = "Question: What is 3 + {4}?\nPut the final answer in \\boxed{}.\nAnswer:"
    assert format_prompt(QUESTION) == expected
    assert format_prompt(QUESTION, build_char_tokenizer()) == expected  # "auto" without a chat template
    assert format_prompt(QUESTION, build_char_tokenizer(), "plain") == expected
    with pytest.raises(ValueError, match="has no chat template"):
        format_prompt(QUESTION, build_char_tokenizer(), "chat")
    with pytest.raises(ValueError, match="has no chat template"):
        format_prompt(QUESTION, None, "chat")


def test_chat_template_renders_a_user_turn_with_the_instruction_and_the_generation_prompt(chat_tokenizer):
    expected = "<|user|>\nWhat is 3 + {4}?\nPut the final answer in \\boxed{}.\n<|assistant|>\n"
    assert format_prompt(QUESTION, chat_tokenizer, "chat") == expected
    assert format_prompt(QUESTION, chat_tokenizer) == expected  # "auto" picks the chat template
    assert format_prompt(QUESTION, chat_tokenizer, "plain") == PLAIN_TEMPLATE.replace(
        "{question}", QUESTION).replace("{instruction}", INSTRUCTION)
    assert format_prompt(QUESTION, chat_tokenizer, instruction="Think step by step.") == \
        "<|user|>\nWhat is 3 + {4}?\nThink step by step.\n<|assistant|>\n"
    assert format_prompt(QUESTION, chat_tokenizer, instruction="") == "<|user|>\nWhat is 3 + {4}?\n<|assistant|>\n"
    # every character of the rendered prompt is a token of the char tokenizer: it round-trips
    ids = chat_tokenizer(expected, add_special_tokens=False).input_ids
    assert chat_tokenizer.decode(ids) == expected and chat_tokenizer.pad_token_id not in ids


def test_custom_template_strings(chat_tokenizer):
    template = "### Problem\n{question}\n### Rules\n{instruction} Keep {braces} and \\boxed{} as written.\n### Answer\n"
    assert format_prompt(QUESTION, chat_tokenizer, template, instruction="Box it.") == (
        "### Problem\nWhat is 3 + {4}?\n### Rules\nBox it. Keep {braces} and \\boxed{} as written.\n### Answer\n")
    # one pass: a question that contains "{instruction}" is not filled in again
    assert render("{question}|{instruction}", "{instruction}", "I") == "{instruction}|I"
    assert check_template("auto") == "auto" and check_template("Q: {question}") == "Q: {question}"
    for bad in ("", "Question: {q}", "chat-ml"):
        with pytest.raises(ValueError, match="placeholder"):
            format_prompt(QUESTION, chat_tokenizer, bad)


def test_evaluation_prompts_use_the_chat_template_and_survive_save_and_load(chat_tokenizer, tiny_models, tmp_path):
    # The template is stored with the tokenizer; evaluation (and training, through the same format_prompt)
    # renders prompts with it after loading the checkpoint.
    import shutil

    from nested_reft_ds.data import synthetic_problems
    from nested_reft_ds.config import GenerationSettings
    from nested_reft_ds.recipes.evaluate import EvalSettings, evaluate_problems
    from nested_reft_ds.model import load_model_and_tokenizer

    checkpoint = tmp_path / "chat_model"
    shutil.copytree(tiny_models["qwen2"], checkpoint)
    chat_tokenizer.save_pretrained(checkpoint)
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    problems = synthetic_problems(2, seed=0)
    _, records = evaluate_problems(model, tokenizer, problems, EvalSettings(
        samples=1, generation=GenerationSettings(greedy=True, max_new_tokens=2)))
    assert [r["prompt"] for r in records] == [f"<|user|>\n{p.question}\n{INSTRUCTION}\n<|assistant|>\n"
                                              for p in problems]
    _, plain = evaluate_problems(model, tokenizer, problems, EvalSettings(
        samples=1, prompt_template="plain", generation=GenerationSettings(greedy=True, max_new_tokens=2)))
    assert plain[0]["prompt"] == format_prompt(problems[0].question)


def test_config_accepts_custom_template_strings_and_names_a_bad_one():
    from nested_reft_ds.config import ConfigError, load_config

    cfg = load_config(None, ["data.prompt_template=Q: {question} ({instruction}) A:"])
    assert format_prompt("1+1", None, cfg.data.prompt_template) == f"Q: 1+1 ({INSTRUCTION}) A:"
    # Text that YAML would read as a mapping stays the string the user wrote.
    question_only = load_config(None, ["data.prompt_template=Question: {question}"])
    assert question_only.data.prompt_template == "Question: {question}"
    with pytest.raises(ConfigError, match=r"data\.prompt_template.*'no placeholder'"):
        load_config(None, ["data.prompt_template=no placeholder"])
