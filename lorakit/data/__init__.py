"""Data: records on disk → conversations → ids + labels (cached) → micro-batches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.config import DataConfig
from lorakit.data import cache
from lorakit.data.batching import StepPlan, collate, pack, plan_epoch
from lorakit.data.encode import IGNORE_INDEX, EncodedExample, TokenizedData, encode_conversation, encode_dataset
from lorakit.data.records import DatasetSpec, alpaca_messages, load_conversations, read_records, resolve_datasets
from lorakit.data.system_prompt import system_template, with_system
from lorakit.errors import LorakitError
from lorakit.templates import Template


def prepare_data(
    config: DataConfig,
    tokenizer: Any,
    template: Template,
    builds: bool,
    all_ok: Callable[[bool], bool],
    key: str | None = None,
) -> tuple[TokenizedData, Path, bool]:
    """Tokenised data from the cache, building it first if needed.

    One process per node (`builds`) tokenises while the others wait in `all_ok` (a collective that is True when
    every rank passes True), then everyone loads the same file. A bad record raises on the builder and a short
    pointer to it on the others, instead of leaving them waiting. Returns the data, the cache file and whether
    it was already cached.
    """
    specs = resolve_datasets(config.dataset_dir, config.dataset)
    key = key or cache.cache_key(specs, config, template, tokenizer)  # validate() may have computed it
    path = Path(config.data_cache_dir or cache.default_cache_dir()) / f"{key}.npz"
    was_cached = path.is_file() and not config.overwrite_cache
    error = None
    if builds and not was_cached:
        try:
            conversations = [with_system(c, config.system, config.default_system)
                             for c in load_conversations(specs, config.max_samples)]  # fmt: skip
            data = encode_dataset(conversations, template, tokenizer, config.cutoff_len, config.train_on_prompt,
                                  config.mask_history)  # fmt: skip
            cache.save(data, path)
        except LorakitError as err:
            error = err
    if not all_ok(error is None):
        raise error or LorakitError("the data could not be prepared; the error is in the log of local rank 0")
    return cache.load(path), path, was_cached


__all__ = [
    "IGNORE_INDEX",
    "DatasetSpec",
    "EncodedExample",
    "StepPlan",
    "TokenizedData",
    "alpaca_messages",
    "collate",
    "pack",
    "encode_conversation",
    "encode_dataset",
    "load_conversations",
    "plan_epoch",
    "prepare_data",
    "read_records",
    "resolve_datasets",
    "system_template",
    "with_system",
]
