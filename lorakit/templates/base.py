"""What a chat template is to lorakit: a conversation in, text segments out, each marked trained or not.

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


def check_alternation(messages: Sequence[Message]) -> None:
    """An optional system message, then user/assistant turns in strict alternation, ending with the assistant."""
    body = list(messages[1:] if messages and messages[0].role == "system" else messages)
    expected = ["user", "assistant"] * (len(body) // 2)
    if [m.role for m in body] != expected or not body:
        roles = ",".join(m.role for m in messages)
        raise ValueError(
            f"roles must be [system,] user, assistant, user, assistant, ... ending with assistant; got {roles}"
        )
