import pytest
from conversations import trained_text

from lorakit.data.encode import IGNORE_INDEX, encode_conversation, encode_dataset
from lorakit.errors import LorakitError
from lorakit.templates import Message, get_template

TWO_TURNS = [
    Message("user", "Hello there"),
    Message("assistant", "Hi! How can I help?"),
    Message("user", "Tell me a joke"),
    Message("assistant", "Why did the chicken cross the road?"),
]


def test_only_assistant_replies_and_their_end_of_turn_are_trained(qwen_tokenizer):
    example = encode_conversation(TWO_TURNS, get_template("qwen", qwen_tokenizer), qwen_tokenizer, cutoff_len=1024)
    assert trained_text(qwen_tokenizer, example) == [
        "Hi! How can I help?<|im_end|>",
        "Why did the chicken cross the road?<|im_end|>",
    ]
    assert example.labels[-1] == IGNORE_INDEX  # the newline after the last <|im_end|> is format, not reply
    assert not example.truncated


def test_truncation_keeps_a_prefix_and_is_counted(qwen_tokenizer):
    template = get_template("qwen", qwen_tokenizer)
    full = encode_conversation(TWO_TURNS, template, qwen_tokenizer, cutoff_len=1024)
    cut = encode_conversation(TWO_TURNS, template, qwen_tokenizer, cutoff_len=len(full.input_ids) - 5)
    assert cut.truncated and cut.input_ids == full.input_ids[:-5] and cut.labels == full.labels[:-5]


def test_dataset_counts_truncated_and_drops_only_examples_with_nothing_left_to_learn(qwen_tokenizer):
    template = get_template("qwen", qwen_tokenizer)
    long_prompt = [Message("user", "word " * 200), Message("assistant", "ok")]
    data = encode_dataset([TWO_TURNS, long_prompt], template, qwen_tokenizer, cutoff_len=60)
    assert (len(data), data.num_truncated, data.num_dropped) == (1, 2, 1)
    assert int(data.target_counts[0]) == sum(label != IGNORE_INDEX for label in data.example(0)[1])
    with pytest.raises(LorakitError, match="no examples left: all 1 lost every trained token to --cutoff_len 60"):
        encode_dataset([long_prompt], template, qwen_tokenizer, cutoff_len=60)
