"""ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), the format of Qwen2/2.5, Qwen3 and SmolLM2, in one class.

- `qwen`: Qwen2.5's ChatML with its default system prompt; its exported Jinja is Qwen2.5's own (tools included).
- `chatml`: generic ChatML, no default system prompt (SmolLM2's format, its default system prompt aside).
- `qwen3`: ChatML with one twist, the `empty_think` option: the assistant reply after the last user message (in
  lorakit's conversations, always the final reply) is written with an empty reasoning block,
  `<think>\\n\\n</think>\\n\\n`, and its content loses leading newlines; earlier replies are written bare, as
  Qwen3's own chat_template writes replies without reasoning. The empty block is part of the trained segment: it is
  what the model has to produce when it answers without thinking. The generation prompt is Qwen3's default
  (thinking enabled): it ends with `<|im_start|>assistant\\n`, so the model itself writes the think block, exactly
  as it learned to in training. Its exported chat_template is Qwen3's own (lorakit.templates.qwen3_jinja): tools,
  tool calls, reasoning history and `enable_thinking` included.

The trained part of an assistant turn is its content plus `<|im_end|>`; the newline after `<|im_end|>` belongs to
the format, not the reply, so it is not trained (it is what the Qwen2.5 template writes, and the model never has
to produce it: generation stops at `<|im_end|>`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorakit.errors import LorakitError
from lorakit.templates.base import Message, OllamaFormat, Segment, check_alternation, jinja_literal
from lorakit.templates.qwen3_jinja import qwen3_jinja
from lorakit.templates.tools import has_tools, tool_calls_text, tool_response, tools_section

QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
EMPTY_THINK = "<think>\n\n</think>\n\n"
NL = "\n"


@dataclass(frozen=True)
class ChatMLTemplate:
    """ChatML with an optional default system prompt, used when a conversation brings none."""

    name: str
    default_system: str | None
    empty_think: bool = False  # Qwen3: the final reply carries the empty think block (replies with reasoning refused)
    qwen25_jinja: bool = False  # the exported chat_template is Qwen2.5's own, function calling included
    renders_tools: bool = False  # Qwen's tools, tool calls and results (lorakit.templates.tools)

    def _system(self, messages: Sequence[Message]) -> tuple[str | None, Sequence[Message]]:
        if messages and messages[0].role == "system":
            return messages[0].content, messages[1:]
        return self.default_system, messages

    def _reply(self, content: str, last: bool) -> str:
        if not self.empty_think:
            return content
        if "</think>" in content:  # Qwen3's template moves or drops reasoning by turn; this one does not imitate it
            raise LorakitError(
                f"--template {self.name} renders replies without reasoning, and this one contains </think>: "
                f"{content[:60]!r}...; use --template auto for reasoning data"
            )
        return EMPTY_THINK + content.lstrip("\n") if last else content

    def render(self, messages: Sequence[Message]) -> list[Segment]:
        check_alternation(messages, tools=self.renders_tools)
        system, turns = self._system(messages)
        tools = turns[0].content if turns and turns[0].role == "tools" else None
        turns = turns[1:] if tools is not None else turns
        segments = []
        prompt = _system_block(system, tools)
        for index, message in enumerate(turns):
            if message.role in ("user", "observation"):
                text = message.content if message.role == "user" else tool_response(message.content)
                prompt += f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
            else:
                last = index == len(turns) - 1
                if message.role == "function_call":  # as a text reply: Qwen3's empty think block only if final
                    reply = self._reply("", last) + tool_calls_text(message.content, self.empty_think)
                else:
                    reply = self._reply(message.content, last)
                segments += [Segment(prompt, False), Segment(f"{reply}<|im_end|>", True)]
                prompt = "\n"
        segments.append(Segment(prompt, False))
        return segments

    def generation_prompt(self, messages: Sequence[Message]) -> str:
        if self.renders_tools and has_tools(messages):  # the text before a reply, as render() writes it
            return "".join(s.text for s in self.render([*messages, Message("assistant", "")])[:-2])
        # Earlier replies come before the last user message, so Qwen3 writes them bare, as render() does, and
        # without the reasoning a chat's history keeps from the model's own replies (its template drops it).
        system, turns = self._system(messages)
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        for message in turns:
            content = message.content
            if self.empty_think and message.role == "assistant" and "</think>" in content:
                content = content.split("</think>")[-1].lstrip("\n")
            text += f"<|im_start|>{message.role}\n{content}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ("<|im_end|>",)

    def chat_template_jinja(self) -> str:
        if self.qwen25_jinja:
            return _qwen25_jinja(self.default_system)
        if self.empty_think:
            return qwen3_jinja(self.default_system)
        default = ""
        if self.default_system is not None:
            block = jinja_literal(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
            default = f"{{%- else %}}\n    {{{{- {block} }}}}\n"
        return _CHATML.replace("@DEFAULT_SYSTEM@", default)

    def ollama_format(self) -> OllamaFormat:
        # the next turn's opening is a stop too: a reply must never run into it
        return OllamaFormat(_OLLAMA_CHATML, (*self.stop_strings, "<|im_start|>"), self.default_system)


def _system_block(system: str | None, tools: str | None) -> str:
    """The system prompt; with tools, Qwen's block: the system prompt (if any), a blank line, the tools section."""
    if tools is not None:
        return f"<|im_start|>system\n{'' if system is None else system + NL * 2}{tools_section(tools)}<|im_end|>\n"
    return f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""


QWEN = ChatMLTemplate(name="qwen", default_system=QWEN25_DEFAULT_SYSTEM, qwen25_jinja=True, renders_tools=True)
CHATML = ChatMLTemplate(name="chatml", default_system=None)
QWEN3 = ChatMLTemplate(name="qwen3", default_system=None, empty_think=True, renders_tools=True)


# Qwen2.5's own chat_template (tools included, so a merged Qwen keeps its function calling); only the default
# system prompt is filled in, and for QWEN this gives the official text character for character.
_QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
@TOOLS_SYSTEM@# Tools\n\nYou may call one or more functions to assist with the user query.\
\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments \
within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \
\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
@DEFAULT_SYSTEM@    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) \
or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""".replace("\\\n", "")  # the backslash-newlines above only keep lines short

# ChatML with the first system message (or the default) on top (chatml; qwen3 exports Qwen3's own template).
_CHATML = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
@DEFAULT_SYSTEM@{%- endif %}
{%- for message in messages %}
    {%- if not (loop.first and message['role'] == 'system') %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def _qwen25_jinja(default_system: str | None) -> str:
    """Qwen2.5's template; without a default system prompt a system block appears only when a conversation has
    one (with tools: Qwen3's wording, so no empty line opens the tools block)."""
    if default_system is None:
        tools = "    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] + '\\n\\n' }}\n"
        tools += '    {%- endif %}\n    {{- "'
        default = ""
    else:
        tools = "    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n"
        tools += f"    {{%- else %}}\n        {{{{- {jinja_literal(default_system)} }}}}\n"
        tools += '    {%- endif %}\n    {{- "\\n\\n'
        block = jinja_literal(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        default = f"    {{%- else %}}\n        {{{{- {block} }}}}\n"
    return _QWEN25.replace("@TOOLS_SYSTEM@", tools).replace("@DEFAULT_SYSTEM@", default)


# Ollama Go templates. Ollama passes the system prompt as .System (the request's system messages, or the
# Modelfile's SYSTEM when there are none) and, in recent versions, the system messages in .Messages too: they are
# skipped there. The prompt always ends asking for the assistant's reply, as generation_prompt does.
_OLLAMA_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""
