"""Llama 3 Instruct, as the chat_template of meta-llama/Meta-Llama-3-8B-Instruct writes it.

`<|begin_of_text|>`, then per message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` with
the content trimmed (the official template applies Jinja's `trim`, i.e. Python's `str.strip()`), no default
system prompt and nothing between messages. Llama 3.1 and later add a dated system block: not this format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorakit.templates.base import Message, Segment, check_alternation

BEGIN = "<|begin_of_text|>"
EOT = "<|eot_id|>"


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


@dataclass(frozen=True)
class Llama3Template:
    """Trained: the trimmed reply + `<|eot_id|>`; the assistant header before it is prompt."""

    name: str = "llama3"

    def render(self, messages: Sequence[Message]) -> list[Segment]:
        check_alternation(messages)
        segments, prompt = [], BEGIN
        for message in messages:
            prompt += _header(message.role)
            if message.role == "assistant":
                segments += [Segment(prompt, False), Segment(message.content.strip() + EOT, True)]
                prompt = ""
            else:
                prompt += message.content.strip() + EOT
        return segments

    def generation_prompt(self, messages: Sequence[Message]) -> str:
        turns = "".join(_header(m.role) + m.content.strip() + EOT for m in messages)
        return BEGIN + turns + _header("assistant")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (EOT,)


LLAMA3 = Llama3Template()
