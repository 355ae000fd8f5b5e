"""The run plan: everything a training run works out before its process group exists, each fact once.

`lorakit.validate.validate(config)` makes it (every bad-input error happens on the way); `lorakit.train.set_up`
adds only what needs the ranks (the smallest free GPU memory, hence the memory plan) and builds from it. Nothing
downstream reads the model's config, the DeepSpeed file or the data files again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.config import Config
from lorakit.data import DataSource
from lorakit.engine.plan import EnginePlan
from lorakit.resume import ResumePlan
from lorakit.templates import Template


@dataclass(frozen=True)
class RunPlan:
    config: Config  # the flags as given (--pack_tokens 0 and --gradient_checkpointing are settled in set-up)
    engine: EnginePlan  # the model's config, shape, parameter count and LoRA targets; the final DeepSpeed config
    tokenizer: Any
    template: Template  # the chat format, with --system / --default_system applied
    train_data: DataSource  # --dataset: its entries, records and cache key
    eval_data: DataSource | None  # --eval_dataset likewise (None: --val_size holds out, or no evaluation)
    fingerprint: dict[str, Any]  # data + model + LoRA + seed, stored in every checkpoint
    resume: ResumePlan | None  # the checkpoint to continue from (None: start afresh)
    notes: list[str]  # the template warning and the resume decisions, for the log
