"""Conversations to token ids and labels.

The template renders text segments; the joined text is tokenised once (no special tokens added: the template
writes them), and a token is a target when its first character lies inside a trained segment. Labels are the
ids for targets and -100 elsewhere, aligned with `input_ids` (the loss shifts them).

Truncation keeps the first `cutoff_len` tokens, so the model sees exactly a prefix of the real conversation
(with --mask_history the latest turns instead: see encode_conversation); an example whose every target lies
beyond the cut teaches nothing and is left out, and the log counts both.

`encode_conversation` encodes one conversation; `encode_rendered` many at once, in one tokenizer call, as the Arrow
path's workers do (lorakit.data.arrow); `encode_dataset` a whole list in this process (the reference path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorakit.data.tokens import IGNORE_INDEX, TokenizedData
from lorakit.errors import LorakitError
from lorakit.templates import Message, Segment, Template

__all__ = ["IGNORE_INDEX", "EncodedExample", "TokenizedData", "encode_conversation", "encode_dataset",
           "encode_rendered", "example_record", "render_for_encoding", "token_labels"]  # fmt: skip


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

    train_on_prompt: every token is a target, prompts included. mask_history: only the last reply is a target (with
    train_on_prompt: every token but the earlier replies, as in LLaMA-Factory), and a conversation too long for
    cutoff_len first loses its earliest turns (the system prompt stays), so what is trained keeps its context; only
    a last turn still too long is cut at its end.
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
    rendered = render_for_encoding(messages, template, mask_history, train_on_prompt)
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    every = train_on_prompt and not mask_history
    ids, labels = token_labels(encoding["input_ids"], encoding["offset_mapping"], rendered, every)
    return ids.tolist(), labels.tolist()


@dataclass(frozen=True)
class Rendered:
    """A conversation's text and the character spans [starts[i], ends[i]) of its trained segments."""

    text: str
    starts: np.ndarray
    ends: np.ndarray


def render_for_encoding(messages: Sequence[Message], template: Template, mask_history: bool,
                        train_on_prompt: bool = False) -> Rendered:  # fmt: skip
    segments = template.render(messages)
    if mask_history:  # only the last reply stays trained (with train_on_prompt, the prompts too: LLaMA-Factory's)
        last = max(i for i, segment in enumerate(segments) if segment.trained)
        segments = [Segment(s.text, i == last if s.trained else train_on_prompt) for i, s in enumerate(segments)]
    text, starts, ends = "", [], []
    for segment in segments:
        if segment.trained:
            starts.append(len(text))
            ends.append(len(text) + len(segment.text))
        text += segment.text
    return Rendered(text, np.asarray(starts, np.int64), np.asarray(ends, np.int64))


def token_labels(ids: Sequence[int], offsets: Sequence[tuple[int, int]], rendered: Rendered,
                 train_on_prompt: bool) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """int32 ids and labels: a token is a target when its first character lies inside a trained segment, except
    the example's first token: nothing of the example predicts it, and in a packed row the previous example's last
    token would (with --train_on_prompt, whose first token is in a trained segment)."""
    ids = np.asarray(ids, np.int32)
    if train_on_prompt:
        labels = ids.copy()
    elif not len(ids) or not len(rendered.starts):
        labels = np.full(len(ids), IGNORE_INDEX, np.int32)
    else:
        token_starts = np.fromiter((start for start, _ in offsets), np.int64, len(ids))  # 4x np.asarray's speed
        segment = np.searchsorted(rendered.starts, token_starts, side="right") - 1  # last span starting at or before
        inside = (segment >= 0) & (token_starts < rendered.ends[np.maximum(segment, 0)])
        labels = np.where(inside, ids, IGNORE_INDEX).astype(np.int32)
    labels[:1] = IGNORE_INDEX
    return ids, labels


def encode_rendered(
    conversations: Sequence[Sequence[Message]],
    rendered: Sequence[Rendered],
    template: Template,
    tokenizer: Any,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """(ids, labels, truncated) of many conversations, rendered already, tokenised in one call: what
    `encode_conversation` gives each of them (lorakit.data.arrow's workers call this on each batch)."""
    if not rendered:
        return []
    encodings = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for index, (ids, offsets) in enumerate(zip(encodings["input_ids"], encodings["offset_mapping"])):
        if mask_history and len(ids) > cutoff_len:  # drops turns and tokenises again: the rare long conversation
            example = encode_conversation(conversations[index], template, tokenizer, cutoff_len, train_on_prompt,
                                          mask_history)  # fmt: skip
            examples.append((np.asarray(example.input_ids, np.int32), np.asarray(example.labels, np.int32),
                             example.truncated))  # fmt: skip
            continue
        token_ids, labels = token_labels(ids, offsets, rendered[index], train_on_prompt and not mask_history)
        examples.append((token_ids[:cutoff_len], labels[:cutoff_len], len(token_ids) > cutoff_len))
    return examples


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
