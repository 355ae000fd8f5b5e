"""Data handed over from Python: `lorakit.train(config, train_data=..., eval_data=...)`.

A list (or any iterable, e.g. a `datasets.Dataset`) whose items are each one of:

- a conversation: a list of `lorakit.Message` (or of `{"role", "content"}` dicts), [system,] user, assistant, ...
  ending with the assistant, as an OpenAI-style record's `messages`;
- a record as a data file holds it, with the default columns of its format: alpaca (`instruction`, `input`,
  `output`, `system`, `history`), sharegpt (`conversations` of `{"from", "value"}`) or OpenAI-style (`messages`
  of `{"role", "content"}`), told apart as a sharegpt entry without tags tells them apart.

Each item goes through the same reader as a file's record, so the checks and the one-line errors are the same,
with `train_data record 3` where a file's error says `data.json record 3`; a `datasets.Dataset`'s records lose the
null keys Arrow adds, as a Parquet file's do. The tokenised-data cache is keyed by the conversations read
(lorakit.data.cache), so the same content in any of these forms shares one cache file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from lorakit.config import DataConfig
from lorakit.data.readers import without_nulls
from lorakit.data.records import (
    ALPACA_COLUMNS,
    OPENAI_COLUMNS,
    OPENAI_TAGS,
    alpaca_messages,
    sharegpt_layout,
    sharegpt_messages,
)
from lorakit.errors import LorakitError
from lorakit.templates import Message


def check_sources(config: DataConfig, train_data: Any, eval_data: Any) -> None:
    """Data from Python replaces the files of --dataset (or --eval_dataset / --val_size): not both."""
    if train_data is not None and config.dataset:
        raise LorakitError(f"train_data and --dataset {','.join(config.dataset)} both give the training data; give one")
    if eval_data is not None and (config.eval_dataset or config.val_size):
        raise LorakitError("eval_data and --eval_dataset / --val_size both choose the evaluation data; give one")


def conversations_from(data: Any, name: str, max_samples: int | None) -> list[list[Message]]:
    """Every item of `data` (at most max_samples) as a conversation; `name` ("train_data") goes into errors."""
    if data is None or isinstance(data, (str, bytes, Mapping)):
        raise LorakitError(
            f"{name} must be a list of conversations or records (or a datasets.Dataset), got {type(data).__name__}"
        )
    conversations = []
    arrow = _arrow_backed(data)
    for index, item in enumerate(data):
        if max_samples is not None and index >= max_samples:
            break
        item = without_nulls(item) if arrow and isinstance(item, Mapping) else item
        conversations.append(item_messages(item, f"{name} record {index}"))
    if not conversations:
        raise LorakitError(f"no examples left: {name} holds no records")
    return conversations


def _arrow_backed(data: Any) -> bool:
    """Whether `data` is a datasets.Dataset (or IterableDataset), whose rows hold a null for every key of their
    column's type that the record lacked, as a Parquet file's do (lorakit.data.readers.without_nulls). A Python
    list's records are read as given."""
    datasets = sys.modules.get("datasets")  # not imported: `data` cannot be one of its datasets
    return datasets is not None and isinstance(data, (datasets.Dataset, datasets.IterableDataset))


def item_messages(item: Any, where: str) -> list[Message]:
    if isinstance(item, Mapping):
        record = dict(item)
        if "conversations" in record or "messages" in record:
            return sharegpt_messages(record, *sharegpt_layout(record), where)
        return alpaca_messages(record, ALPACA_COLUMNS, where)
    if isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
        turns = [{"role": m.role, "content": m.content} if isinstance(m, Message) else m for m in item]
        return sharegpt_messages({"messages": turns}, OPENAI_COLUMNS, OPENAI_TAGS, where)
    raise LorakitError(
        f"{where} is a {type(item).__name__}; give a conversation (a list of lorakit.Message) or a record (a dict in "
        "alpaca, sharegpt or OpenAI form)"
    )


def content_digest(conversations: Sequence[Sequence[Message]]) -> str:
    """sha256 of the conversations' roles and texts, in order: what a data file's bytes are to file data."""
    text = json.dumps([[[m.role, m.content] for m in c] for c in conversations], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
