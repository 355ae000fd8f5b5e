"""--system and --default_system: which system prompt each conversation is trained with.

- `--default_system TEXT`: the system prompt of records that have none, instead of the template's default
  (`qwen`: "You are Qwen, ..."); `--default_system ""`: records without one get no system prompt at all.
- `--system TEXT`: every record's system prompt, replacing the record's own; `--system ""`: no system prompt
  anywhere, the template's default included.

A template's own default can only be switched off where lorakit writes the format: the tokenizer's own
chat_template (`--template auto`) writes its default itself, so "" with `auto` is an error, not a silent no-op.
"""

from __future__ import annotations

import dataclasses

from lorakit.errors import LorakitError
from lorakit.templates import Message, Template, TokenizerTemplate


def system_template(template: Template, system: str | None, default_system: str | None) -> Template:
    """The template, with its default system prompt switched off when a flag asks for none."""
    if "" not in (system, default_system):
        return template
    if isinstance(template, TokenizerTemplate):
        raise LorakitError(
            '--system "" / --default_system "" cannot switch off the default system prompt of the tokenizer\'s own '
            "chat_template (--template auto); choose a named template such as --template qwen"
        )
    if getattr(template, "default_system", None):
        return dataclasses.replace(template, default_system=None)  # type: ignore[type-var]
    return template


def served_template(template: Template, system: str | None, default_system: str | None) -> Template:
    """The trained template as a chat that brings no system prompt meets it (lorakit chat, the merged model's
    chat_template, the ollama SYSTEM line): with the system prompt the records without one were trained with
    (--system, else --default_system) as its default, where the format writes one (the ChatML family)."""
    template = system_template(template, system, default_system)
    trained = system if system is not None else default_system
    if trained and hasattr(template, "default_system"):
        return dataclasses.replace(template, default_system=trained)  # type: ignore[type-var]
    return template


def with_system(messages: list[Message], system: str | None, default_system: str | None) -> list[Message]:
    has_own = bool(messages) and messages[0].role == "system"
    body = messages[1:] if has_own else messages
    if system is not None:
        return [Message("system", system), *body] if system else list(body)
    if not has_own and default_system:
        return [Message("system", default_system), *body]
    return list(messages)
