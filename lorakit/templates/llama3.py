"""Llama 3 Instruct, as the chat_template of meta-llama/Meta-Llama-3-8B-Instruct writes it.

`<|begin_of_text|>`, then per message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` with
the content trimmed (the official template applies Jinja's `trim`, i.e. Python's `str.strip()`), no default
system prompt and nothing between messages. No tool format: tool-calling data is refused (lorakit.templates.tools).
Llama 3.1 and later add a dated system block and tool calls: `llama3_1` (lorakit.templates.llama3_1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorakit.templates.base import Message, OllamaFormat, Segment, check_alternation

BEGIN = "<|begin_of_text|>"
EOT = "<|eot_id|>"


def header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


@dataclass(frozen=True)
class Llama3Template:
    """Trained: the trimmed reply + `<|eot_id|>`; the assistant header before it is prompt."""

    name: str = "llama3"

    def render(self, messages: Sequence[Message]) -> list[Segment]:
        check_alternation(messages)
        segments, prompt = [], BEGIN
        for message in messages:
            prompt += header(message.role)
            if message.role == "assistant":
                segments += [Segment(prompt, False), Segment(message.content.strip() + EOT, True)]
                prompt = ""
            else:
                prompt += message.content.strip() + EOT
        return segments

    def generation_prompt(self, messages: Sequence[Message]) -> str:
        turns = "".join(header(m.role) + m.content.strip() + EOT for m in messages)
        return BEGIN + turns + header("assistant")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (EOT,)

    def chat_template_jinja(self) -> str:
        return _LLAMA3

    def ollama_format(self) -> OllamaFormat:
        # the headers are stops too: a reply must never run into the next turn
        return OllamaFormat(_OLLAMA_LLAMA3, (EOT, "<|start_header_id|>", "<|end_header_id|>"), None)


LLAMA3 = Llama3Template()

# Meta's Llama 3 template, with <|begin_of_text|> written literally (lorakit's text includes it; tokenizing it
# again must not add another: apply_chat_template(tokenize=True) adds no special tokens).
_LLAMA3 = r"""{{- '<|begin_of_text|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
# No <|begin_of_text|>: llama.cpp adds the bos token itself for Llama 3 GGUF files. Go templates cannot trim, so
# messages are written as sent (Meta's template trims them).
_OLLAMA_LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
