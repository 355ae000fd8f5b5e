"""Qwen3's chat format for replies without reasoning, as Qwen3's own chat_template writes them.

Qwen3 is ChatML with one twist: the assistant reply after the last user message (in lorakit's conversations,
always the final reply) is written with an empty reasoning block, `<think>\\n\\n</think>\\n\\n`, and its content
loses leading newlines; earlier replies are written bare. The empty block is part of the trained segment:
it is what the model has to produce when it answers without thinking.

The generation prompt is Qwen3's default (`add_generation_prompt=True`, thinking enabled): it ends with
`<|im_start|>assistant\\n`, so the model itself writes the think block, exactly as it learned to in training.
(`enable_thinking=False` would put the empty block into the prompt instead; lorakit does not do that.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorakit.errors import LorakitError
from lorakit.templates.base import Message, Segment, check_alternation

EMPTY_THINK = "<think>\n\n</think>\n\n"


@dataclass(frozen=True)
class Qwen3Template:
    """Qwen3 (no default system prompt). Trained: content + `<|im_end|>`, the last reply with its empty think block.

    Replies that carry reasoning (`</think>` in the content) are refused: Qwen3's template moves or drops that
    reasoning depending on the turn, which this template does not imitate (`--template auto` does).
    """

    name: str = "qwen3"

    def render(self, messages: Sequence[Message]) -> list[Segment]:
        check_alternation(messages)
        segments = []
        prompt = _system(messages)
        for index, message in enumerate(messages):
            if message.role == "user":
                prompt += f"<|im_start|>user\n{message.content}<|im_end|>\n<|im_start|>assistant\n"
            elif message.role == "assistant":
                if "</think>" in message.content:
                    raise LorakitError(
                        f"--template qwen3 renders replies without reasoning, and this one contains </think>: "
                        f"{message.content[:60]!r}...; use --template auto for reasoning data"
                    )
                last = index == len(messages) - 1
                reply = EMPTY_THINK + message.content.lstrip("\n") if last else message.content
                segments += [Segment(prompt, False), Segment(f"{reply}<|im_end|>", True)]
                prompt = "\n"
        segments.append(Segment(prompt, False))
        return segments

    def generation_prompt(self, messages: Sequence[Message]) -> str:
        # Earlier replies come before the last user message, so Qwen3 writes them bare, as render() does.
        text = _system(messages)
        for message in messages:
            if message.role != "system":
                text += f"<|im_start|>{message.role}\n{message.content}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ("<|im_end|>",)


def _system(messages: Sequence[Message]) -> str:
    if messages and messages[0].role == "system":
        return f"<|im_start|>system\n{messages[0].content}<|im_end|>\n"
    return ""


QWEN3 = Qwen3Template()
