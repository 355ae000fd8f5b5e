"""Writing what a run produces: the adapter in PEFT format, the tokenizer and the resolved config.

Under ZeRO-3 each rank holds a slice of every LoRA matrix, and `save_pretrained` on the wrapped model would
write those slices: the classic empty or 40-byte adapter. The adapter is gathered first (it is small), then
rank 0 writes it, so `PeftModel.from_pretrained(base, output_dir)` works in a plain process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lorakit.config import Config

CONFIG_FILE = "lorakit_config.json"


def gather_adapter_state(model: Any, is_main: bool) -> dict[str, torch.Tensor]:
    """Full LoRA tensors (on the CPU) on the main rank; every rank must call this."""
    import deepspeed

    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
        return {name: p.detach().to("cpu", copy=True) for name, p in trainable} if is_main else {}


def save_adapter(model: Any, directory: Path, is_main: bool) -> None:
    """`adapter_model.safetensors` + `adapter_config.json`, written whole or not at all."""
    state = gather_adapter_state(model, is_main)
    if not is_main:
        return
    temporary = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, state_dict=state, safe_serialization=True)
    directory.mkdir(parents=True, exist_ok=True)
    for file in temporary.iterdir():
        os.replace(file, directory / file.name)
    temporary.rmdir()


def save_run_files(directory: Path, tokenizer: Any, config: Config, ds_config: dict[str, Any]) -> None:
    """The tokenizer (so the output folder is self-contained) and the resolved configuration."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    resolved = {"lorakit": config.to_flat(), "deepspeed": ds_config}
    (directory / CONFIG_FILE).write_text(json.dumps(resolved, indent=2, default=str) + "\n")
