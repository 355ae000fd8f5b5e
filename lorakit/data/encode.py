"""Conversations to token ids and labels.

The template renders text segments; the joined text is tokenised once (no special tokens added: the template
writes them), and a token is a target when its first character lies inside a trained segment. Labels are the
ids for targets and -100 elsewhere, aligned with `input_ids` (the loss shifts them).

Truncation keeps the first `cutoff_len` tokens, so the model sees exactly a prefix of the real conversation
(with --mask_history the latest turns instead: see encode_conversation); an example whose every target lies
beyond the cut teaches nothing and is left out, and the log counts both.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorakit.errors import LorakitError
from lorakit.templates import Message, Segment, Template

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_conversation(
    messages: Sequence[Message],
    template: Template,
    tokenizer: Any,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> EncodedExample:
    """One conversation as ids + labels, truncated to cutoff_len tokens.

    train_on_prompt: every token is a target, prompts included. mask_history: only the last reply is a target,
    and a conversation too long for cutoff_len first loses its earliest turns (the system prompt stays), so what
    is trained keeps its context; only a last turn still too long is cut at its end.
    """
    ids, labels = _ids_and_labels(messages, template, tokenizer, train_on_prompt, mask_history)
    dropped_turns = False
    if mask_history and len(ids) > cutoff_len:
        # the system prompt and the tools lead the conversation and stay
        head = list(messages[: next(i for i, m in enumerate(messages) if m.role not in ("system", "tools"))])
        turns = list(messages[len(head) :])
        while len(ids) > cutoff_len and len(turns) > 2:
            turns, dropped_turns = turns[2:], True
            ids, labels = _ids_and_labels(head + turns, template, tokenizer, train_on_prompt, mask_history)
    return EncodedExample(ids[:cutoff_len], labels[:cutoff_len], truncated=dropped_turns or len(ids) > cutoff_len)


def _ids_and_labels(
    messages: Sequence[Message], template: Template, tokenizer: Any, train_on_prompt: bool, mask_history: bool
) -> tuple[list[int], list[int]]:
    segments = template.render(messages)
    if mask_history:  # only the last reply stays trained
        last = max(i for i, segment in enumerate(segments) if segment.trained)
        segments = [Segment(s.text, s.trained and i == last) for i, s in enumerate(segments)]
    text, starts, ends = "", [], []
    for segment in segments:
        if segment.trained:
            starts.append(len(text))
            ends.append(len(text) + len(segment.text))
        text += segment.text
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    if train_on_prompt:
        return ids, list(ids)
    labels = []
    for token_id, (start, _) in zip(ids, encoding["offset_mapping"]):
        i = bisect.bisect_right(starts, start) - 1
        labels.append(token_id if i >= 0 and start < ends[i] else IGNORE_INDEX)
    return ids, labels


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

    def subset(self, indices: np.ndarray) -> TokenizedData:
        """The examples at `indices`, in that order (a copy, in the same flat layout)."""
        parts = [self.example(int(i)) for i in indices]
        offsets = np.concatenate([[0], np.cumsum([len(ids) for ids, _ in parts])]).astype(np.int64)
        ids = np.concatenate([ids for ids, _ in parts]) if parts else self.ids[:0]
        labels = np.concatenate([labels for _, labels in parts]) if parts else self.labels[:0]
        return TokenizedData(ids, labels, offsets, self.num_truncated, self.num_dropped)

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
    conversations: list[list[Message]],
    template: Template,
    tokenizer: Any,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> TokenizedData:
    ids, labels, offsets = [], [], [0]
    num_truncated = num_dropped = 0
    for messages in conversations:
        example = encode_conversation(messages, template, tokenizer, cutoff_len, train_on_prompt, mask_history)
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


def example_record(input_ids: Any, labels: Any, tokenizer: Any, index: int) -> dict[str, Any]:
    """One example as a person checks it: ids, labels, the decoded text and the decoded trained part (the
    training log's first example and `lorakit preview`)."""
    input_ids, labels = np.asarray(input_ids), np.asarray(labels)
    return {
        "index": index,
        "input_ids": input_ids.tolist(),
        "labels": labels.tolist(),
        "text": tokenizer.decode(input_ids),
        "trained_text": tokenizer.decode(input_ids[labels != IGNORE_INDEX]),
    }
