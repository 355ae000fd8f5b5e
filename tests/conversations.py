"""Conversations every template test renders (each test file adds its own edge cases: whitespace, markup), and
what an encoded conversation trains on."""

from typing import Any

from lorakit.data.encode import IGNORE_INDEX
from lorakit.templates import Message

COMMON_CONVERSATIONS = {
    "single turn": [Message("user", "Who are you?"), Message("assistant", "I am a model.")],
    "single turn, system": [
        Message("system", "You are 甄嬛."),
        Message("user", "娘娘。"),
        Message("assistant", "你放心，本宫到任何时候都不会自轻自贱委屈了这孩子。"),
    ],
    "multi-turn": [
        Message("user", "Hi"),
        Message("assistant", "Hello!"),
        Message("user", "2+2?\nBe brief."),
        Message("assistant", "4"),
    ],
}


def trained_text(tokenizer: Any, example: Any) -> list[str]:
    """The decoded runs of consecutive trained tokens of an encoded example (one run per reply, normally); every
    trained label must be its own input token."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            runs += [tokenizer.decode(current)] if current else []
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([tokenizer.decode(current)] if current else [])


def _tool(name: str, parameter: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "parameters": {"type": "object", "properties": {parameter: schema}, "required": [parameter]}}


# Records whose objects have different keys (messages, tools, a tool's parameters; the record's own columns): Arrow
# gives each column one type holding every key of every row, so they test that a row reads back as written.
MIXED_KEY_RECORDS = [
    {
        "conversations": [
            {"from": "human", "value": "Area of a circle of radius 4?"},
            {"from": "function_call", "value": '{"name": "area", "arguments": {"radius": 4}}'},
            {"from": "observation", "value": '{"area": 50.24}'},
            {"from": "gpt", "value": "About 50.24.", "weight": 1.0},
        ],
        "tools": [{**_tool("area", "radius", {"type": "number"}), "description": "A circle's area"}],
        "system": "Be brief.",  # in the first record: pyarrow's from_pylist takes the columns from the first
    },
    {
        "conversations": [{"from": "human", "value": "Find owls", "lang": "en"}, {"from": "gpt", "value": "Owls."}],
        "tools": [_tool("search", "query", {"type": "string", "enum": ["owls", "foxes"]})],
    },
]
