"""`--template default`: plain text turns for base models, which know no chat markers.

    System: {system}                      (only when the conversation has one)
    Human: {user}
    Assistant: {reply}{eos}
    Human: {user}
    Assistant: {reply}{eos}

Lines end with "\\n"; nothing follows the last reply. `{eos}` is the tokenizer's eos_token, the one special
token: it is how a base model learns to stop. The trained part of a turn is " {reply}{eos}": the space after
"Assistant:" belongs to the reply because BPE tokenizers fold a leading space into the first word's token, so
the prompt ends at the colon and the model produces the first word as it normally would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.errors import LorakitError
from lorakit.templates.base import Message, OllamaFormat, Segment, check_alternation, jinja_literal

LABELS = {"system": "System", "user": "Human", "assistant": "Assistant"}


@dataclass(frozen=True)
class PlainTemplate:
    """Human/Assistant turns with an optional `System:` first line; trained = " " + reply + eos_token."""

    name: str
    eos_token: str

    def render(self, messages: Sequence[Message]) -> list[Segment]:
        check_alternation(messages)
        segments, prompt = [], ""
        for message in messages:
            if message.role == "assistant":
                reply = f" {message.content}{self.eos_token}"
                segments += [Segment(prompt + "Assistant:", False), Segment(reply, True)]
                prompt = "\n"
            else:
                prompt += f"{LABELS[message.role]}: {message.content}\n"
        return segments

    def generation_prompt(self, messages: Sequence[Message]) -> str:
        eos = {"assistant": self.eos_token}
        turns = "".join(f"{LABELS[m.role]}: {m.content}{eos.get(m.role, '')}\n" for m in messages)
        return turns + "Assistant:"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.eos_token,)

    def chat_template_jinja(self) -> str:
        return _PLAIN.replace("@EOS@", jinja_literal(self.eos_token))

    def ollama_format(self) -> OllamaFormat:
        # a base model that misses its eos token goes on to write the next turn: "Human:" stops it
        return OllamaFormat(_OLLAMA_PLAIN.replace("@EOS@", self.eos_token), (self.eos_token, "Human:"), None)


def plain_template(tokenizer: Any) -> PlainTemplate:
    """The default template for this tokenizer: it needs its eos_token."""
    if not getattr(tokenizer, "eos_token", None):
        raise LorakitError(
            f"--template default ends each reply with the tokenizer's eos_token, and {tokenizer.name_or_path} "
            "has none; set one on the tokenizer or pick another --template"
        )
    return PlainTemplate(name="default", eos_token=tokenizer.eos_token)


_PLAIN = r"""{%- set labels = {'system': 'System', 'user': 'Human', 'assistant': 'Assistant'} %}
{%- for message in messages %}
    {{- labels[message['role']] + ': ' + message['content'] }}
    {%- if message['role'] == 'assistant' %}
        {{- @EOS@ }}
    {%- endif %}
    {%- if not loop.last or add_generation_prompt %}
        {{- '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'Assistant:' }}
{%- endif %}
"""
_OLLAMA_PLAIN = """{{- if .System }}System: {{ .System }}
{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}Human: {{ .Content }}
{{ else if eq .Role "assistant" }}Assistant: {{ .Content }}@EOS@
{{ end }}
{{- end }}Assistant:"""
