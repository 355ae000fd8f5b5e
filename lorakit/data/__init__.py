"""Data: records on disk → conversations → ids + labels (cached) → micro-batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.config import DataConfig
from lorakit.data import cache
from lorakit.data.batching import StepPlan, collate, largest_rank_share, pack, plan_epoch
from lorakit.data.encode import (
    IGNORE_INDEX,
    EncodedExample,
    TokenizedData,
    encode_conversation,
    encode_dataset,
    example_record,
)
from lorakit.data.mixing import MixedData, load_mixed, mixture_order
from lorakit.data.records import DatasetSpec, alpaca_messages, load_conversations, read_records, resolve_datasets
from lorakit.data.system_prompt import system_template, with_system
from lorakit.distributed import notice_after
from lorakit.errors import LorakitError
from lorakit.templates import Message, Template

WAIT_S = 60.0  # a rank waiting this long for the cache says so


@dataclass(frozen=True)
class DataSource:
    """Datasets as lorakit.validate read them; tokenising starts from these records, never from the files again."""

    specs: tuple[DatasetSpec, ...]  # the dataset_info.json entries, resolved against --dataset_dir
    conversations: tuple[list[Message], ...]  # every record (at most --max_samples of each dataset), in order
    key: str  # the tokenised-data cache key (lorakit.data.cache: it hashes every data file)


def read_source(config: DataConfig, template: Template, tokenizer: Any, seed: int) -> DataSource:
    """config.dataset read from disk and mixed (--mix_strategy, drawing with `seed`), for tokenising."""
    specs = resolve_datasets(config.dataset_dir, config.dataset)
    mixed = load_mixed(specs, config, seed)
    key = cache.cache_key(specs, config, template, tokenizer, mixture=mixed.digest)
    return DataSource(tuple(specs), tuple(mixed.conversations), key)


def prepare_data(
    config: DataConfig,
    tokenizer: Any,
    template: Template,
    builds: bool,
    all_ok: Callable[[bool], bool],
    source: DataSource | None = None,
    seed: int = 42,
) -> tuple[TokenizedData, Path, bool]:
    """Tokenised data from the cache, building it first if needed from `source` (by default: --dataset read now,
    mixed with `seed`, --seed's default).

    One process per node (`builds`) tokenises while the others wait in `all_ok` (a collective that is True when
    every rank passes True), then everyone loads the same file. A bad record raises on the builder and a short
    pointer to it on the others, instead of leaving them waiting. Returns the data, the cache file and whether
    it was already cached.
    """
    source = source or read_source(config, template, tokenizer, seed)
    path = Path(config.data_cache_dir or cache.default_cache_dir()) / f"{source.key}.npz"
    was_cached = path.is_file() and not config.overwrite_cache
    error = None
    if builds and not was_cached:
        try:
            conversations = [with_system(c, config.system, config.default_system) for c in source.conversations]
            data = encode_dataset(conversations, template, tokenizer, config.cutoff_len, config.train_on_prompt,
                                  config.mask_history)  # fmt: skip
            cache.save(data, path)
        except LorakitError as err:
            error = err
    waiting = (f"lorakit: waiting {WAIT_S:.0f} s for local rank 0 to write the tokenised cache {path}; if its log "
               "shows an error or it has stopped, stop this job")  # fmt: skip
    with notice_after(WAIT_S, waiting) if not builds and not was_cached else contextlib.nullcontext():
        everyone_ok = all_ok(error is None)
    if not everyone_ok:
        raise error or LorakitError("the data could not be prepared; the error is in the log of local rank 0")
    return cache.load(path), path, was_cached


__all__ = [
    "IGNORE_INDEX",
    "DataSource",
    "MixedData",
    "DatasetSpec",
    "EncodedExample",
    "StepPlan",
    "TokenizedData",
    "alpaca_messages",
    "collate",
    "pack",
    "encode_conversation",
    "encode_dataset",
    "example_record",
    "load_conversations",
    "load_mixed",
    "mixture_order",
    "largest_rank_share",
    "plan_epoch",
    "prepare_data",
    "read_source",
    "read_records",
    "resolve_datasets",
    "system_template",
    "with_system",
]
