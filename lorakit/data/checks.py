"""The checks on the data as a whole, made where it is tokenised and again whenever its cache is reused: enough
examples left after --val_size, and a template that can write the tool calls the data holds."""

from __future__ import annotations

import math
from typing import Any

from lorakit.config import DataConfig
from lorakit.errors import LorakitError
from lorakit.templates.tools import refuse_tools


def held_out_count(val_size: float, num_examples: int) -> int:
    count = int(val_size) if val_size >= 1 else math.ceil(val_size * num_examples)
    if val_size and not 0 < count < num_examples:
        raise LorakitError(f"--val_size {val_size} leaves no training examples of {num_examples}; lower it")
    return count


def check_data(meta: dict[str, Any], config: DataConfig, template: Any, what: str) -> None:
    """`meta`: the cache's description of the data (lorakit.data.build); `what`: "the training data's"."""
    held_out_count(config.val_size, meta["examples"] - meta["dropped"])  # those left to split, as the split counts
    if meta["tools_example"] is not None and not getattr(template, "renders_tools", False):
        refuse_tools(template, meta["tools_example"], what)
