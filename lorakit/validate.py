"""Every check that can fail on bad input, run before a process group, a model or an output file exists.

Each failure is a one-line `LorakitError` saying what is wrong and how to fix it (see README, "Bad input").
What the checks had to work out (tokenizer, template, LoRA targets, the resume plan) is handed on to training.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lorakit.config import Config
from lorakit.data.cache import cache_key
from lorakit.data.records import load_conversations, resolve_datasets
from lorakit.data.system_prompt import system_template
from lorakit.distributed import launch_rank, launch_world_size
from lorakit.engine.deepspeed_config import resolve_deepspeed_config
from lorakit.engine.kernels import check_liger_kernel
from lorakit.engine.model import load_tokenizer, lora_targets, refusing_remote_code, remote_code_note
from lorakit.errors import LorakitError
from lorakit.evaluate import held_out_count
from lorakit.reporting import say
from lorakit.resume import ResumePlan, check_output_dir, plan_resume, run_fingerprint
from lorakit.templates import TEMPLATE_NAMES, Template, check_against_tokenizer, get_template


@dataclass(frozen=True)
class Checked:
    tokenizer: Any
    data_key: str  # the tokenised-data cache key, computed once here (it hashes every data file)
    template: Template
    fingerprint: dict[str, Any]  # data + model + LoRA + seed, stored in every checkpoint
    resume: ResumePlan | None
    notes: list[str]  # resume decisions, for the log


def validate(config: Config) -> Checked:
    if not config.train.output_dir:
        raise LorakitError("--output_dir is required: the adapter, logs and checkpoints go there")
    check_output_dir(config)
    model_path, trust = config.model.model_name_or_path, config.model.trust_remote_code
    if trust:  # said before the first load, which may run the folder's code
        say(remote_code_note(model_path), launch_rank() == 0)
    hf_config = validate_model_path(model_path, trust)
    if config.model.template not in TEMPLATE_NAMES:
        raise LorakitError(f"--template {config.model.template} is unknown; choose one of {', '.join(TEMPLATE_NAMES)}")
    specs = resolve_datasets(config.data.dataset_dir, config.data.dataset)
    # Reading every record here (cheap next to tokenising) puts a bad record's error before any process group.
    conversations = load_conversations(specs, config.data.max_samples)
    held_out_count(config.data.val_size, len(conversations))
    if config.data.eval_dataset:
        load_conversations(resolve_datasets(config.data.dataset_dir, config.data.eval_dataset), config.data.max_samples)
    validate_precision(config)
    if config.model.enable_liger_kernel:  # explicitly asked for: must be able to run
        check_liger_kernel(hf_config.model_type)
    if config.train.packing and 0 < config.train.pack_tokens < config.data.cutoff_len:
        raise LorakitError(
            f"--pack_tokens {config.train.pack_tokens} is below --cutoff_len {config.data.cutoff_len}: the longest "
            "example would not fit in a row; raise --pack_tokens or lower --cutoff_len"
        )
    resolve_deepspeed_config(config, launch_world_size(), hf_config.hidden_size, torch.cuda.is_available())  # checks
    with torch.device("meta"):  # the module tree without allocating a single weight
        targets = lora_targets(AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust), config.lora)
    if config.train.plot_loss and importlib.util.find_spec("matplotlib") is None:
        raise LorakitError("--plot_loss needs matplotlib: pip install 'lorakit[plot]' (or drop --plot_loss)")
    tokenizer = load_tokenizer(model_path, trust)
    template = system_template(get_template(config.model.template, tokenizer), config.data.system,
                               config.data.default_system)  # fmt: skip
    mismatch = check_against_tokenizer(template, tokenizer)
    if mismatch and config.model.strict_template:
        raise LorakitError(
            f"--template {template.name} renders conversations differently from the tokenizer's own chat_template "
            "(--strict_template); drop --strict_template to see both renderings, or use --template auto"
        )
    data_key = cache_key(specs, config.data, template, tokenizer)
    fingerprint = run_fingerprint(config, f"{data_key}:val_size={config.data.val_size}", targets)
    resume, notes = plan_resume(config, fingerprint, launch_world_size())
    warning = [f"WARNING: {mismatch}\nWARNING: training continues with --template {template.name}; the model "
               "will learn this format (--strict_template makes this an error)"] if mismatch else []  # fmt: skip
    return Checked(tokenizer, data_key, template, fingerprint, resume, warning + notes)


def validate_model_path(path: str, trust_remote_code: bool = False) -> AutoConfig:
    if not path:
        raise LorakitError("--model_name_or_path is required: a local folder with config.json and safetensors weights")
    if not (Path(path) / "config.json").is_file():
        raise LorakitError(
            f"--model_name_or_path {path}: no such model folder (config.json not found); lorakit loads local "
            "folders only and never downloads"
        )
    with refusing_remote_code(path):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def validate_precision(config: Config) -> None:
    if config.model.bf16 and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        where = "this GPU" if torch.cuda.is_available() else "the CPU (lorakit trains in fp32 there)"
        raise LorakitError(f"--bf16 is not supported on {where}; drop --bf16 or use a GPU with bf16 (Ampere or newer)")
    if config.model.fp16 and not torch.cuda.is_available():
        raise LorakitError("--fp16 needs a GPU; drop --fp16 to train in fp32 on the CPU")
