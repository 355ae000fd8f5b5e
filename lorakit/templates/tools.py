"""Tool calls as Qwen2.5's and Qwen3's own chat_templates write them (`apply_chat_template(messages, tools=...)`).

The `tools` message (lorakit.data.tool_records) becomes the system block's "# Tools" section, one function per line
as `{"type": "function", "function": {...}}` JSON (bare functions are wrapped, as LLaMA-Factory wraps them for
Qwen); a `function_call` turn is the assistant's reply `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`
(one per call, newline-separated; trained); an `observation` turn is a user turn
`<tool_response>\\n...\\n</tool_response>` (not trained). JSON is written as the templates' `tojson` writes it:
`json.dumps(value, ensure_ascii=False)`.

Templates without a tool format (chatml, llama3, default, auto) refuse tool data in one line, before training
(`check_tool_support`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lorakit.errors import LorakitError
from lorakit.templates.base import Message

TOOL_ROLES = ("tools", "function_call", "observation")
_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def tools_section(tools_json: str) -> str:
    """The system block's tools section (without <|im_start|>system or <|im_end|>)."""
    tools = json.loads(tools_json)
    wrapped = [t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools]
    return _TOOLS_HEAD + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in wrapped) + _TOOLS_TAIL


def tool_calls_text(calls_json: str, raw_string_arguments: bool) -> str:
    """The calls of a function_call turn. Qwen3 writes string arguments as they are, Qwen2.5 as JSON strings."""

    def arguments(value: Any) -> str:
        return value if raw_string_arguments and isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return "\n".join(
        f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {arguments(call["arguments"])}}}\n</tool_call>'
        for call in json.loads(calls_json)
    )


def tool_response(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def has_tools(messages: Sequence[Message]) -> bool:
    return any(m.role in TOOL_ROLES for m in messages)


def check_tool_support(template: Any, conversations: Sequence[Sequence[Message]], what: str) -> None:
    """Tool data needs a template that writes tools (qwen, qwen3): otherwise one line naming the first such record."""
    if getattr(template, "renders_tools", False):
        return
    index = next((i for i, c in enumerate(conversations) if has_tools(c)), None)
    if index is not None:
        refuse_tools(template, index, what)


def refuse_tools(template: Any, index: int, what: str) -> None:
    """The error for tool data (first at example `index` of `what`) with a template that cannot write tools."""
    raise LorakitError(
        f"--template {template.name} cannot render tool calls, and {what} example {index} has tools, a "
        "function_call or an observation; use --template qwen or qwen3, or data without tool turns"
    )
