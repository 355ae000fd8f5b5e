"""Does a named template write conversations the way the model's own chat_template does?

A start-of-run check: a template that differs from the one the model was tuned with still trains, but on a
format the model has to learn anew, which is rarely what the user meant. The check renders a fixed probe
conversation (with and without a system prompt, whole and as a generation prompt) both ways and compares the
text, so it needs no model and costs milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lorakit.templates.base import Message, Template, as_chat
from lorakit.templates.tokenizer_template import TokenizerTemplate

_TURNS = [
    Message("user", "Hi! Who are you?"),
    Message("assistant", "I am a helpful assistant."),
    Message("user", "What is 2 + 2?"),
    Message("assistant", "4."),
]
PROBES: dict[str, list[Message]] = {
    "system + 2 turns": [Message("system", "You are a helpful assistant."), *_TURNS],
    "2 turns, no system": _TURNS,
}


def check_against_tokenizer(template: Template, tokenizer: Any) -> str | None:
    """None when `template` renders the probes exactly as the tokenizer's chat_template (or there is nothing to
    compare: no chat_template, or `template` is that chat_template); otherwise a multi-line report of the
    difference in each probe, with both renderings and the first position where they part."""
    if isinstance(template, TokenizerTemplate) or not getattr(tokenizer, "chat_template", None):
        return None
    differences = []
    for probe_name, messages in PROBES.items():
        # One difference per probe: a generation prompt is only compared when the whole conversation matches.
        for what, ours, prompt_only in (
            ("conversation", "".join(s.text for s in template.render(messages)), False),
            ("generation prompt", template.generation_prompt(messages[:-1]), True),
        ):
            theirs = _tokenizer_text(tokenizer, messages[:-1] if prompt_only else messages, prompt_only)
            if ours != theirs:
                differences.append(_difference(f"{probe_name}, {what}", template.name, ours, theirs))
                break
    if not differences:
        return None
    header = (
        f"--template {template.name} does not write conversations as the chat_template of "
        f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')} does:"
    )
    return "\n".join([header, *differences])


def _tokenizer_text(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            as_chat(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # some templates refuse a role (e.g. no system); that is a difference to report
        return f"<the chat_template failed: {type(err).__name__}: {err}>"


def _difference(label: str, name: str, ours: str, theirs: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return "\n".join(
        [
            f"  {label}: first difference at character {at} ({ours[at : at + 20]!r} vs {theirs[at : at + 20]!r})",
            f"    --template {name}: {ours!r}",
            f"    the chat_template: {theirs!r}",
        ]
    )
