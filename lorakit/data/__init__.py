"""Data: records on disk → conversations → ids + labels (cached, memory-mapped) → micro-batches.

lorakit.validate resolves the datasets and readies their cache (`ready`: local rank 0 of each node reads and
tokenises them on every core, lorakit.data.build; the other ranks wait for it); `prepare_data` loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.config import DataConfig
from lorakit.data import cache
from lorakit.data.batching import StepPlan, collate, pack, plan_epoch, step_tokens_bound
from lorakit.data.cache import DataSource, ready
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
from lorakit.templates import Template

TRAINING, EVALUATION = "the training data's", "the evaluation data's"  # how errors name the data


def read_source(config: DataConfig, template: Template, tokenizer: Any, seed: int) -> DataSource:
    """config.dataset resolved and keyed for its cache (mixed with `seed` where --interleave_probs draws)."""
    specs = resolve_datasets(config.dataset_dir, config.dataset)
    return DataSource(tuple(specs), cache.cache_key(specs, config, template, tokenizer, seed=seed))


def prepare_data(
    config: DataConfig,
    tokenizer: Any,
    template: Template,
    builds: bool = True,
    source: DataSource | None = None,
    seed: int = 42,
    what: str = TRAINING,
) -> tuple[TokenizedData, Path, bool]:
    """Tokenised data from the cache (by default of --dataset, mixed with `seed`, --seed's default), readied first
    unless `source` is (lorakit.validate readies it): `builds` (local rank 0) tokenises, the others wait. Returns the
    data (tokens memory-mapped), the cache folder and whether it was there before this run."""
    source = source or read_source(config, template, tokenizer, seed)
    if source.meta is None:
        source = ready(source, config, tokenizer, template, builds, seed, what)
    folder = cache.cache_folder(config, source.key)
    data, _ = cache.load(folder)
    return data, folder, source.cached


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
    "step_tokens_bound",
    "plan_epoch",
    "prepare_data",
    "read_source",
    "ready",
    "read_records",
    "resolve_datasets",
    "system_template",
    "with_system",
]
