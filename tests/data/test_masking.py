"""Masking choices and system-prompt flags, on Qwen's real tokenizer and the `qwen` template."""

import json

import pytest

from lorakit.data.encode import IGNORE_INDEX, encode_conversation
from lorakit.data.system_prompt import system_template, with_system
from lorakit.errors import LorakitError
from lorakit.run_record import CONFIG_FILE, training_template
from lorakit.templates import Message, get_template
from lorakit.templates.base import as_chat

TURNS = [Message("user", "first question"), Message("assistant", "first answer"),
         Message("user", "second question"), Message("assistant", "second answer")]  # fmt: skip


def _trained(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


@pytest.mark.parametrize(
    "train_on_prompt, mask_history, expected",
    [
        (False, False, "first answer<|im_end|>second answer<|im_end|>"),
        (False, True, "second answer<|im_end|>"),
        (True, False, None),  # every token but the first (nothing of the example predicts it)
        # LLaMA-Factory's meaning of both: the prompts, and of the replies only the last
        (
            True,
            True,
            "system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
            "<|im_end|>\n<|im_start|>user\nfirst question<|im_end|>\n<|im_start|>assistant\n\n<|im_start|>user\n"
            "second question<|im_end|>\n<|im_start|>assistant\nsecond answer<|im_end|>\n",
        ),
    ],
)
def test_masking_choices(qwen_tokenizer, train_on_prompt, mask_history, expected):
    template = get_template("qwen", qwen_tokenizer)
    example = encode_conversation(TURNS, template, qwen_tokenizer, 4096, train_on_prompt, mask_history)
    # what packing relies on: no example's first token is a target, or the example before it in a row would be
    # trained to predict it
    assert example.labels[0] == IGNORE_INDEX
    if expected is None:
        assert example.labels == [-100, *example.input_ids[1:]]
    else:
        assert _trained(qwen_tokenizer, example) == expected


def test_mask_history_truncation_drops_the_earliest_turns_and_keeps_the_system(qwen_tokenizer):
    template = get_template("qwen", qwen_tokenizer)
    messages = [Message("system", "Be brief."), Message("user", "old " * 100), Message("assistant", "old answer"),
                *TURNS[2:]]  # fmt: skip
    full = encode_conversation(messages, template, qwen_tokenizer, 4096, mask_history=True)
    cut = encode_conversation(messages, template, qwen_tokenizer, len(full.input_ids) - 10, mask_history=True)
    text = qwen_tokenizer.decode(cut.input_ids)
    assert cut.truncated and "old" not in text and "Be brief." in text
    assert _trained(qwen_tokenizer, cut) == "second answer<|im_end|>"


@pytest.mark.parametrize(
    "system, default_system, expected_system",
    [
        (None, None, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
        (None, "You are Zhen Huan.", "You are Zhen Huan."),
        (None, "", None),
        ("Always rhyme.", None, "Always rhyme."),
        ("", "ignored", None),
    ],
)
def test_system_flags(qwen_tokenizer, system, default_system, expected_system):
    template = system_template(get_template("qwen", qwen_tokenizer), system, default_system)
    text = "".join(s.text for s in template.render(with_system(TURNS[:2], system, default_system)))
    if expected_system is None:
        assert "<|im_start|>system" not in text
    else:
        assert text.startswith(f"<|im_start|>system\n{expected_system}<|im_end|>\n")


def test_system_replaces_a_records_own_and_default_keeps_it(qwen_tokenizer):
    own = [Message("system", "Own."), *TURNS[:2]]
    assert with_system(own, "New.", None)[0] == Message("system", "New.")
    assert with_system(own, None, "Default.")[0] == Message("system", "Own.")
    assert with_system(own, "", None) == TURNS[:2]


def test_no_system_cannot_silence_a_tokenizers_own_template(qwen_tokenizer):
    with pytest.raises(LorakitError, match="cannot switch off the default system prompt"):
        system_template(get_template("auto", qwen_tokenizer), "", None)


@pytest.mark.parametrize(
    "flags, expected",
    [({"default_system": "You are Zhen Huan."}, "You are Zhen Huan."), ({"system": "Always rhyme."}, "Always rhyme.")],
)
def test_the_trained_system_prompt_is_the_default_of_chat_merge_and_export(qwen_tokenizer, tmp_path, flags, expected):
    """Records without a system prompt were trained with the flag's; a chat that brings none (lorakit chat, the merged
    model's chat_template, the ollama Modelfile's SYSTEM) is prompted with it too, not with the template's own."""
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"lorakit": {"template": "qwen", **flags}}))
    template = training_template(tmp_path, qwen_tokenizer)
    trained = "".join(s.text for s in template.render(with_system(TURNS[:2], flags.get("system"),
                                                                   flags.get("default_system"))))  # fmt: skip
    prompt = template.generation_prompt(TURNS[:1])
    assert trained.startswith(prompt) and prompt.startswith(f"<|im_start|>system\n{expected}<|im_end|>\n")
    merged = qwen_tokenizer.apply_chat_template(as_chat(TURNS[:1]), chat_template=template.chat_template_jinja(),
                                                tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert merged == prompt and template.ollama_format().system == expected
