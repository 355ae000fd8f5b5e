"""Tool-calling records: LLaMA-Factory's sharegpt layout with `function_call` and `observation` turns and a `tools`
column (its glaive_toolcall demo).

A record's `tools` holds the functions the assistant may call, as a JSON string (glaive) or a list: each an object
with a string `name` (`{"name", "description", "parameters"}`, or already wrapped as `{"type": "function",
"function": {...}}`). A `function_call` turn takes the assistant's place and holds `{"name": ..., "arguments": {...}}`
(or a list of them, calls made at once) as JSON; an `observation` turn takes the user's place and holds the tool's
result as text. In lorakit's conversations they are the messages `tools` (after any system message),
`function_call` (the calls as a normalised JSON list) and `observation`; the templates that can render them
(lorakit.templates.tools) train the calls and not the results.
"""

from __future__ import annotations

import json
from typing import Any

from lorakit.errors import LorakitError
from lorakit.templates import Message

TOOLS_SHAPE = 'give a list of functions, each {"name": ..., "description": ..., "parameters": {...}}'


def tools_message(value: Any, where: str) -> Message | None:
    """The record's tools as a `tools` message (None when it has none: a missing column, "", "[]")."""
    if value is None or value == "" or value == []:
        return None
    tools = value
    if isinstance(value, str):
        try:
            tools = json.loads(value)
        except json.JSONDecodeError as err:
            raise LorakitError(f"{where}: the tools column is not valid JSON ({err.msg}); {TOOLS_SHAPE}") from None
    if not isinstance(tools, list):
        raise LorakitError(f"{where}: the tools column must be a list; {TOOLS_SHAPE}")
    if not tools:
        return None
    functions = [t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t for t in tools]
    if not all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in functions):
        raise LorakitError(f"{where}: the tools column holds an entry without a 'name'; {TOOLS_SHAPE}")
    return Message("tools", json.dumps(tools, ensure_ascii=False))


def function_call_text(text: str, where: str, position: int) -> str:
    """A function_call turn's calls as a JSON list of {"name", "arguments"}; one-line errors name the message."""
    shape = 'JSON {"name": ..., "arguments": {...}} (or a list of them)'
    try:
        calls = json.loads(text)
    except json.JSONDecodeError as err:
        raise LorakitError(
            f"{where}: message {position} (a function call) is not valid JSON ({err.msg}); give {shape}"
        ) from None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c for c in calls):
        raise LorakitError(f"{where}: message {position} (a function call) must be {shape}")
    return json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls], ensure_ascii=False)
