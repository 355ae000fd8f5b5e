"""Chat formats: one small class per format, looked up by the `--template` name."""

from __future__ import annotations

from typing import Any

from lorakit.errors import LorakitError
from lorakit.templates.base import Message, Segment, Template
from lorakit.templates.chatml import QWEN, ChatMLTemplate
from lorakit.templates.tokenizer_template import TokenizerTemplate

NAMED_TEMPLATES: dict[str, Template] = {"qwen": QWEN}
TEMPLATE_NAMES = (*NAMED_TEMPLATES, "auto")


def get_template(name: str, tokenizer: Any) -> Template:
    """The template called `name`; `auto` wraps the tokenizer's own chat_template."""
    if name == "auto":
        return TokenizerTemplate(tokenizer)
    if name not in NAMED_TEMPLATES:
        raise LorakitError(f"--template {name} is unknown; choose one of {', '.join(TEMPLATE_NAMES)}")
    return NAMED_TEMPLATES[name]


__all__ = ["ChatMLTemplate", "Message", "Segment", "Template", "TokenizerTemplate", "get_template", "TEMPLATE_NAMES"]
