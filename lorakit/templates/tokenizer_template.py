"""`--template auto`: the tokenizer's own Jinja `chat_template`, split into prompt and reply text.

The split renders prefixes: for the assistant message i, the rendering of messages[:i] with the generation
prompt must be a prefix of the whole conversation's rendering; what follows it up to the end of the reply's
end-of-turn marker is trained. A template that rewrites earlier turns (so prefixes do not line up) cannot be
trained this way and is reported as such rather than guessed at.

Its Jinja is the tokenizer's own; for ollama it writes the named template that renders exactly as the tokenizer's
chat_template does (checked on the start-of-run probe conversations), and none is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lorakit.errors import LorakitError
from lorakit.templates.base import Message, OllamaFormat, Segment, Template, as_chat, check_alternation
from lorakit.templates.chatml import CHATML, QWEN3, ChatMLTemplate
from lorakit.templates.llama3 import LLAMA3
from lorakit.templates.llama3_1 import LLAMA3_1
from lorakit.templates.plain import PlainTemplate

NAMED = "qwen, qwen3, chatml, llama3, llama3_1, default"


class TokenizerTemplate:
    name = "auto"

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise LorakitError(
                f"--template auto needs a tokenizer with a chat_template, and {tokenizer.name_or_path} has none; "
                "pass a named template such as --template qwen"
            )
        self.tokenizer = tokenizer
        self._special = sorted(
            {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
            | set(tokenizer.all_special_tokens),
            key=len,
            reverse=True,
        )

    def _text(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            as_chat(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _end_of_turn(self, text: str, reply_end: int) -> int:
        """Where the reply's end-of-turn marker ends: the first special token right after the content."""
        rest = text[reply_end:]
        for token in self._special:
            if rest.startswith(token):
                return reply_end + len(token)
        return reply_end

    def _reply_end(self, text: str, start: int, content: str) -> int:
        """Where the reply's content ends in `text` (-1: not found), as given or trimmed (Llama 3's templates trim
        every message): preferably where a special token follows, not at an earlier occurrence inside the reply's
        opening (Qwen3's think block holds a reply "in"); else at the first occurrence from `start`."""
        ends = []
        for wanted in dict.fromkeys((content, content.strip())):
            at = text.find(wanted, start)
            while at >= 0:
                end = at + len(wanted)
                if self._end_of_turn(text, end) > end:
                    return end
                ends.append(end)
                at = text.find(wanted, at + 1)
        return ends[0] if ends else -1

    def render(self, messages: Sequence[Message]) -> list[Segment]:
        check_alternation(messages)
        full = self._text(messages, add_generation_prompt=False)
        segments, position = [], 0
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prompt = self._text(messages[:index], add_generation_prompt=True)
            content_end = self._reply_end(full, len(prompt), message.content)
            if not full.startswith(prompt) or len(prompt) < position or content_end < 0:
                raise LorakitError(
                    f"the chat_template of {self.tokenizer.name_or_path} cannot be split into prompt and reply "
                    "(rendering a prefix of the conversation does not give a prefix of the whole); "
                    "pass a named template such as --template qwen"
                )
            reply_end = self._end_of_turn(full, content_end)
            segments += [Segment(full[position : len(prompt)], False), Segment(full[len(prompt) : reply_end], True)]
            position = reply_end
        segments.append(Segment(full[position:], False))
        return segments

    def generation_prompt(self, messages: Sequence[Message]) -> str:
        return self._text(messages, add_generation_prompt=True)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        probe = [Message("user", "Hi"), Message("assistant", "Hello")]
        reply = self.render(probe)[-2].text
        marker = next((t for t in self._special if reply.endswith(t)), None)
        eos = self.tokenizer.eos_token
        return tuple(dict.fromkeys(s for s in (marker, eos) if s))

    def chat_template_jinja(self) -> str:
        return self.tokenizer.chat_template

    def ollama_format(self) -> OllamaFormat:
        return self.named_equivalent().ollama_format()

    def named_equivalent(self) -> Template:
        """The named template that writes exactly what the tokenizer's chat_template writes (checked on the
        start-of-run probe conversations), chosen among those sharing its end-of-turn marker."""
        from lorakit.templates.probe import check_against_tokenizer  # the probe imports this module

        tokenizer, stops = self.tokenizer, self.stop_strings
        candidates: list[Template] = []
        if "<|im_end|>" in stops:
            prompt = self.generation_prompt([Message("user", "Hi")])
            header = "<|im_start|>system\n"
            default = prompt[len(header) : prompt.find("<|im_end|>")] if prompt.startswith(header) else None
            candidates += [ChatMLTemplate(name=CHATML.name, default_system=default), QWEN3]
        if "<|eot_id|>" in stops:
            candidates += [LLAMA3, LLAMA3_1]
        if getattr(tokenizer, "eos_token", None):
            candidates.append(PlainTemplate(name="default", eos_token=tokenizer.eos_token))
        for candidate in candidates:
            if check_against_tokenizer(candidate, tokenizer) is None:
                return candidate
        raise LorakitError(
            f"ollama export needs a named template ({NAMED}): the chat_template of "
            f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')} is none of them; "
            "train with --template NAME to export for ollama"
        )
