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
