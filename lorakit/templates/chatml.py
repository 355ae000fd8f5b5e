"""ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), the format of Qwen2/2.5 and SmolLM2."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorakit.templates.base import Message, Segment, check_alternation

QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclass(frozen=True)
class ChatMLTemplate:
    """ChatML with an optional default system prompt, used when a conversation brings none.

    The trained part of an assistant turn is its content plus `<|im_end|>`; the newline after `<|im_end|>`
    belongs to the format, not the reply, so it is not trained (it is what the Qwen2.5 template writes, and the
    model never has to produce it: generation stops at `<|im_end|>`).
    """

    name: str
    default_system: str | None

    def _system(self, messages: Sequence[Message]) -> tuple[str | None, Sequence[Message]]:
        if messages and messages[0].role == "system":
            return messages[0].content, messages[1:]
        return self.default_system, messages

    def render(self, messages: Sequence[Message]) -> list[Segment]:
        check_alternation(messages)
        system, turns = self._system(messages)
        segments = []
        prompt = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        for message in turns:
            if message.role == "user":
                prompt += f"<|im_start|>user\n{message.content}<|im_end|>\n<|im_start|>assistant\n"
            else:
                segments += [Segment(prompt, False), Segment(f"{message.content}<|im_end|>", True)]
                prompt = "\n"
        segments.append(Segment(prompt, False))
        return segments

    def generation_prompt(self, messages: Sequence[Message]) -> str:
        system, turns = self._system(messages)
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        for message in turns:
            text += f"<|im_start|>{message.role}\n{message.content}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ("<|im_end|>",)


QWEN = ChatMLTemplate(name="qwen", default_system=QWEN25_DEFAULT_SYSTEM)
CHATML = ChatMLTemplate(name="chatml", default_system=None)
