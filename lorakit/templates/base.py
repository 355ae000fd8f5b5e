"""What a chat template is to lorakit: a conversation in, text segments out, each marked trained or not; and the
same format for other runtimes (a Jinja chat_template, an ollama TEMPLATE), so a merged model is prompted as it
was trained.

Templates render text, never ids. `lorakit.data.encode` tokenises the joined text in one call and labels
tokens by character offsets, so the ids are exactly what the tokenizer makes of the rendered conversation
(the same as `apply_chat_template`), with no seams where separately tokenised pieces would merge differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


def as_chat(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Messages as the role/content dicts a tokenizer's `apply_chat_template` takes."""
    return [{"role": m.role, "content": m.content} for m in messages]


def jinja_literal(text: str) -> str:
    """`text` as a Jinja string literal: Jinja unescapes literals like Python's unicode-escape codec, so any text
    (quotes, backslashes, newlines, non-ASCII) round-trips exactly."""
    return "'" + text.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class OllamaFormat:
    """A template as ollama writes it (lorakit.export puts it into a Modelfile)."""

    template: str  # the Go TEMPLATE: the prompt for the next reply, from .System and .Messages
    stops: tuple[str, ...]  # `PARAMETER stop` lines: end-of-turn markers, then what must never follow a reply
    system: str | None  # the default system prompt (`SYSTEM`), used when a chat brings none


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool  # True for assistant replies and their end-of-turn marker


class Template(Protocol):
    name: str

    def render(self, messages: Sequence[Message]) -> list[Segment]:
        """The whole conversation; it ends with an assistant message."""
        ...

    def generation_prompt(self, messages: Sequence[Message]) -> str:
        """The text that asks the model for the next assistant reply (for chat and previews)."""
        ...

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends an assistant turn; generation stops there."""
        ...

    def chat_template_jinja(self) -> str:
        """Hugging Face Jinja that renders a conversation exactly as `render` (segments joined) and, with
        `add_generation_prompt=True`, as `generation_prompt`: the merged tokenizer's `chat_template`."""
        ...

    def ollama_format(self) -> OllamaFormat:
        """The same prompt in ollama's Go template syntax, its stop lines and default system prompt."""
        ...


SIDES = {"user": "user", "observation": "user", "assistant": "assistant", "function_call": "assistant"}


def check_alternation(messages: Sequence[Message], tools: bool = False) -> None:
    """An optional system message, then user/assistant turns in strict alternation, ending with the assistant.
    With `tools`: a tools message may follow the system message, and an observation stands where a user turn does,
    a function call where an assistant turn does (lorakit.templates.tools)."""
    body = list(messages[1:] if messages and messages[0].role == "system" else messages)
    body = body[1:] if tools and body and body[0].role == "tools" else body
    expected = ["user", "assistant"] * (len(body) // 2)
    sides = [SIDES.get(m.role, m.role) if tools else m.role for m in body]
    if sides != expected or not body:
        roles = ",".join(m.role for m in messages)
        raise ValueError(
            f"roles must be [system,] user, assistant, user, assistant, ... ending with assistant; got {roles}"
        )
