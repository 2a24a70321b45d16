"""Prompt templates: how a MathProblem's question becomes model input text."""
from __future__ import annotations

from typing import Any

INSTRUCTION = "Put the final answer in \\boxed{}."
PLAIN_TEMPLATE = "Question: {question}\n" + INSTRUCTION.replace("{", "{{").replace("}", "}}") + "\nAnswer:"


def format_prompt(question: str, tokenizer: Any = None, template: str = "auto") -> str:
    """Render `question` as prompt text.

    "chat" uses the tokenizer's chat template (user turn, generation prompt); "plain" the plain template;
    "auto" picks chat when the tokenizer has a chat template.
    """
    has_chat = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    if template == "chat" and not has_chat:
        raise ValueError("data.prompt_template='chat' but the tokenizer has no chat template; use 'plain' or 'auto'")
    if template == "chat" or (template == "auto" and has_chat):
        messages = [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(question=question)
