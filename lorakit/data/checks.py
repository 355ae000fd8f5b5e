"""The checks on the data as a whole, made where it is tokenised and again whenever its cache is reused: enough
records left after --val_size, and a template that can write the tool calls the data holds; and the training data's
part of the checkpoint fingerprint, which --val_size's split is part of."""

from __future__ import annotations

import math
from typing import Any

from lorakit.config import DataConfig
from lorakit.errors import LorakitError
from lorakit.templates.tools import refuse_tools


def held_out_count(val_size: float, num_records: int) -> int:
    """How many of the training set's distinct records --val_size holds out (lorakit.evaluate.split_train_eval)."""
    count = int(val_size) if val_size >= 1 else math.ceil(val_size * num_records)
    if val_size and not 0 < count < num_records:
        raise LorakitError(f"--val_size {val_size:g} leaves no training examples of {num_records} records; lower it")
    return count


def split_key(config: DataConfig, key: str) -> str:
    """The training data's part of the checkpoint fingerprint: its cache key and --val_size. The split holds out
    records, not examples, since session 8; where interleave_over repeats records that changed what trains, so a
    checkpoint of the former split is other data (the tag). Elsewhere the split and the fingerprint are as before."""
    repeats = config.val_size and config.mix_strategy == "interleave_over" and len(config.dataset) > 1
    return f"{key}:val_size={config.val_size}" + (":split=records" if repeats else "")


def check_data(meta: dict[str, Any], config: DataConfig, template: Any, what: str) -> None:
    """`meta`: the cache's description of the data (lorakit.data.build); `what`: "the training data's"."""
    # the records left to split, as the split counts them (lorakit.data.cache counts them for a cache written before
    # session 8, which lacks them)
    held_out_count(config.val_size, meta["distinct_records"])
    if meta["tools_example"] is not None and not getattr(template, "renders_tools", False):
        refuse_tools(template, meta["tools_example"], what)
