"""Conversations every template test renders; each test file adds its own edge cases (whitespace, markup)."""

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
