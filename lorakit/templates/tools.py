"""Tool calls as Qwen2.5's and Qwen3's own chat_templates write them (`apply_chat_template(messages, tools=...)`).

The `tools` message (lorakit.data.tool_records) becomes the system block's "# Tools" section, one function per line
as `{"type": "function", "function": {...}}` JSON (bare functions are wrapped, as LLaMA-Factory wraps them for
Qwen); a `function_call` turn is the assistant's reply `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`
(one per call, newline-separated; trained); an `observation` turn is a user turn
`<tool_response>\\n...\\n</tool_response>` (not trained). JSON is written as the templates' `tojson` writes it:
`json.dumps(value, ensure_ascii=False)`.

Llama 3.1's tool format is lorakit.templates.llama3_1 (it shares `wrapped_tools`). Templates without a tool format
(chatml, llama3, default, auto) refuse tool data in one line, before training (`refuse_tools`, from the data's
checks), and llama3_1 refuses calls made at once as it renders them, as Meta's template does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lorakit.errors import LorakitError
from lorakit.templates.base import Message

TOOL_ROLES = ("tools", "function_call", "observation")
TOOL_TEMPLATES = "qwen, qwen3 or llama3_1"  # the named templates that render tool-calling data
_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def wrapped_tools(tools_json: str) -> list[dict[str, Any]]:
    """A tools message's functions as chat templates take `tools=`: bare functions wrapped as `{"type": "function",
    "function": {...}}`, as LLaMA-Factory wraps them for Qwen and Llama 3 and as OpenAI-style clients send them."""
    return [t if t.get("type") == "function" else {"type": "function", "function": t} for t in json.loads(tools_json)]


def tools_section(tools_json: str) -> str:
    """The system block's tools section (without <|im_start|>system or <|im_end|>)."""
    tools = wrapped_tools(tools_json)
    return _TOOLS_HEAD + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools) + _TOOLS_TAIL


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


def refuse_tools(template: Any, index: int, what: str) -> None:
    """The error for tool data (first at example `index` of `what`) with a template that cannot write tools."""
    raise LorakitError(
        f"--template {template.name} cannot render tool calls, and {what} example {index} has tools, a "
        f"function_call or an observation; use --template {TOOL_TEMPLATES}, or data without tool turns"
    )
