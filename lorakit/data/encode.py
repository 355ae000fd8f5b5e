"""Conversations to token ids and labels.

The template renders text segments; the joined text is tokenised once (no special tokens added: the template
writes them), and a token is a target when its first character lies inside a trained segment. Labels are the
ids for targets and -100 elsewhere, aligned with `input_ids` (the loss shifts them).

Truncation keeps the first `cutoff_len` tokens. The model then sees exactly a prefix of the real conversation;
an example whose every target lies beyond the cut teaches nothing and is left out, and the log counts both.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorakit.errors import LorakitError
from lorakit.templates import Message, Template

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_conversation(
    messages: Sequence[Message], template: Template, tokenizer: Any, cutoff_len: int
) -> EncodedExample:
    """One conversation as ids + labels, truncated to cutoff_len tokens."""
    segments = template.render(messages)
    text, starts, ends = "", [], []
    for segment in segments:
        if segment.trained:
            starts.append(len(text))
            ends.append(len(text) + len(segment.text))
        text += segment.text
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (start, _) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        i = bisect.bisect_right(starts, start) - 1
        labels.append(token_id if i >= 0 and start < ends[i] else IGNORE_INDEX)
    ids = list(encoding["input_ids"])
    return EncodedExample(ids[:cutoff_len], labels[:cutoff_len], truncated=len(ids) > cutoff_len)


@dataclass(frozen=True)
class TokenizedData:
    """Every example, flat: example i is ids[offsets[i]:offsets[i+1]] (the layout of the on-disk cache)."""

    ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not trained
    offsets: np.ndarray  # int64, len = examples + 1
    num_truncated: int
    num_dropped: int  # examples left out because truncation removed every target

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.ids[start:end], self.labels[start:end]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def target_counts(self) -> np.ndarray:
        """Tokens each example is trained on (the first token is never a target: nothing predicts it)."""
        trained = (self.labels != IGNORE_INDEX).astype(np.int64)
        trained[self.offsets[:-1]] = 0
        return np.add.reduceat(trained, self.offsets[:-1]) if len(self) else np.zeros(0, np.int64)


def encode_dataset(
    conversations: list[list[Message]], template: Template, tokenizer: Any, cutoff_len: int
) -> TokenizedData:
    ids, labels, offsets = [], [], [0]
    num_truncated = num_dropped = 0
    for messages in conversations:
        example = encode_conversation(messages, template, tokenizer, cutoff_len)
        num_truncated += example.truncated
        if sum(label != IGNORE_INDEX for label in example.labels[1:]) == 0:
            num_dropped += 1
            continue
        ids += example.input_ids
        labels += example.labels
        offsets.append(len(ids))
    if len(offsets) == 1:
        raise LorakitError(
            f"no examples left: all {len(conversations)} lost every trained token to --cutoff_len {cutoff_len}; "
            "raise --cutoff_len"
        )
    return TokenizedData(
        np.asarray(ids, np.int32),
        np.asarray(labels, np.int32),
        np.asarray(offsets, np.int64),
        num_truncated,
        num_dropped,
    )
