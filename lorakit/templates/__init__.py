"""Chat formats, looked up by the `--template` name. Each class renders its format for training and writes the
same format for other runtimes (a Jinja chat_template, an ollama TEMPLATE); the ChatML family (qwen, qwen3,
chatml) is one class with options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorakit.errors import LorakitError
from lorakit.templates.base import Message, OllamaFormat, Segment, Template
from lorakit.templates.chatml import CHATML, QWEN, QWEN3, ChatMLTemplate
from lorakit.templates.llama3 import LLAMA3, Llama3Template
from lorakit.templates.llama3_1 import LLAMA3_1, Llama31Template
from lorakit.templates.plain import PlainTemplate, plain_template
from lorakit.templates.probe import check_against_tokenizer
from lorakit.templates.tokenizer_template import TokenizerTemplate

# Each name maps to a factory given the tokenizer: most formats are fixed, `default` needs its eos_token.
NAMED_TEMPLATES: dict[str, Callable[[Any], Template]] = {
    "qwen": lambda _tokenizer: QWEN,
    "qwen3": lambda _tokenizer: QWEN3,
    "chatml": lambda _tokenizer: CHATML,
    "llama3": lambda _tokenizer: LLAMA3,
    "llama3_1": lambda _tokenizer: LLAMA3_1,
    "default": plain_template,
}
TEMPLATE_NAMES = (*NAMED_TEMPLATES, "auto")


def get_template(name: str, tokenizer: Any) -> Template:
    """The template called `name`; `auto` wraps the tokenizer's own chat_template."""
    if name == "auto":
        return TokenizerTemplate(tokenizer)
    if name not in NAMED_TEMPLATES:
        raise LorakitError(f"--template {name} is unknown; choose one of {', '.join(TEMPLATE_NAMES)}")
    return NAMED_TEMPLATES[name](tokenizer)


__all__ = [
    "ChatMLTemplate",
    "Llama3Template",
    "Llama31Template",
    "Message",
    "OllamaFormat",
    "PlainTemplate",
    "Segment",
    "Template",
    "TokenizerTemplate",
    "check_against_tokenizer",
    "get_template",
    "NAMED_TEMPLATES",
    "TEMPLATE_NAMES",
]
