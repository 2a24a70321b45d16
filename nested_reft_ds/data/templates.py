"""Prompt templates: how a MathProblem's question becomes model input text."""
from __future__ import annotations

import re
from typing import Any
from ..errors import ConfigError

INSTRUCTION = "Put the final answer in \\boxed{}."
PLAIN_TEMPLATE = "Question: {question}\n{instruction}\nAnswer:"
NAMED_TEMPLATES = ("auto", "plain", "chat")
_PLACEHOLDER = re.compile(r"\{(question|instruction)\}")


def is_template(template: str) -> bool:
    """A named template, or a custom template string with a `{question}` placeholder."""
    return template in NAMED_TEMPLATES or "{question}" in template


def check_template(template: str) -> str:
    """`template` if `is_template(template)`, else ConfigError."""
    if not is_template(template):
        raise ConfigError(f"prompt template {template!r} is neither one of {', '.join(NAMED_TEMPLATES)} nor a "
                         "template string with a {question} placeholder")
    return template


def render(template: str, question: str, instruction: str = INSTRUCTION) -> str:
    """Fill `{question}` and `{instruction}` in one pass; every other brace is literal (`\\boxed{}` stays)."""
    values = {"question": question, "instruction": instruction}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def format_prompt(question: str, tokenizer: Any = None, template: str = "auto", *,
                  instruction: str = INSTRUCTION) -> str:
    """Render `question` as prompt text.

    "chat" puts "{question}\\n{instruction}" in a user turn of the tokenizer's chat template and adds the
    generation prompt; "plain" fills PLAIN_TEMPLATE; "auto" picks chat when the tokenizer has a chat
    template. Any other `template` is a custom plain template string: `{question}` (required) and
    `{instruction}` are filled, other braces are kept as written. An empty `instruction` drops the
    instruction line from the chat turn.
    """
    check_template(template)
    has_chat = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    if template == "chat" and not has_chat:
        raise ConfigError("data.prompt_template='chat' but the tokenizer has no chat template; use 'plain' or 'auto'")
    if template == "chat" or (template == "auto" and has_chat):
        content = f"{question}\n{instruction}" if instruction else question
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return render(PLAIN_TEMPLATE if template in NAMED_TEMPLATES else template, question, instruction)
