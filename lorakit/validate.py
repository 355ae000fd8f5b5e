"""Every check that can fail on bad input, run before a process group, a model or an output file exists.

Each failure is a one-line `LorakitError` saying what is wrong and how to fix it (see README, "Bad input").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lorakit.config import Config
from lorakit.data.records import load_conversations, resolve_datasets
from lorakit.distributed import launch_world_size
from lorakit.engine.deepspeed_config import resolve_deepspeed_config
from lorakit.engine.model import lora_targets
from lorakit.errors import LorakitError
from lorakit.templates import TEMPLATE_NAMES


def validate(config: Config) -> None:
    if not config.train.output_dir:
        raise LorakitError("--output_dir is required: the adapter, logs and checkpoints go there")
    hf_config = validate_model_path(config.model.model_name_or_path)
    if config.model.template not in TEMPLATE_NAMES:
        raise LorakitError(f"--template {config.model.template} is unknown; choose one of {', '.join(TEMPLATE_NAMES)}")
    # Reading every record here (cheap next to tokenising) puts a bad record's error before any process group.
    load_conversations(resolve_datasets(config.data.dataset_dir, config.data.dataset), config.data.max_samples)
    validate_precision(config)
    on_gpu = torch.cuda.is_available()
    resolve_deepspeed_config(config, launch_world_size(), hf_config.hidden_size, on_gpu)
    with torch.device("meta"):  # the module tree without allocating a single weight
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    lora_targets(skeleton, config.lora)
    if config.train.plot_loss and importlib.util.find_spec("matplotlib") is None:
        raise LorakitError("--plot_loss needs matplotlib: pip install 'lorakit[plot]' (or drop --plot_loss)")


def validate_model_path(path: str) -> AutoConfig:
    if not path:
        raise LorakitError("--model_name_or_path is required: a local folder with config.json and safetensors weights")
    if not (Path(path) / "config.json").is_file():
        raise LorakitError(
            f"--model_name_or_path {path}: no such model folder (config.json not found); lorakit loads local "
            "folders only and never downloads"
        )
    return AutoConfig.from_pretrained(path)


def validate_precision(config: Config) -> None:
    if config.model.bf16 and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        where = "this GPU" if torch.cuda.is_available() else "the CPU (lorakit trains in fp32 there)"
        raise LorakitError(
            f"--bf16 is not supported on {where}; drop --bf16 or run on a GPU with bf16 (Ampere or newer)"
        )
    if config.model.fp16 and not torch.cuda.is_available():
        raise LorakitError("--fp16 needs a GPU; drop --fp16 to train in fp32 on the CPU")
