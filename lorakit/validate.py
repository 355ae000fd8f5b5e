"""Every check that can fail on bad input, run before a process group, a model or an output file exists.

Each failure is a one-line `LorakitError` saying what is wrong and how to fix it (README, "When something is
wrong"); the files a run reads are checked by lorakit.checks without loading them. What the checks read and work
out (the model's config and shape, the records, the DeepSpeed config, tokenizer, template, resume decision) is
handed on to training as one `RunPlan` (lorakit.plan), so nothing is read twice.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from lorakit.checks import (
    check_model_weights,
    check_output_dir_writable,
    check_special_tokens,
    check_tokenizer_files,
    check_tokenizer_not_empty,
)
from lorakit.config import Config, DataConfig
from lorakit.data import EVALUATION, TRAINING, DataSource, ready
from lorakit.data.cache import cache_key
from lorakit.data.checks import split_key
from lorakit.data.info import DatasetSpec, resolve_datasets
from lorakit.data.inmemory import check_sources, conversations_from
from lorakit.data.system_prompt import system_template
from lorakit.distributed import launch_local_rank, launch_rank, launch_world_size
from lorakit.engine.kernels import check_liger_kernel
from lorakit.engine.model import load_tokenizer, model_config, remote_code_note
from lorakit.engine.plan import plan_engine
from lorakit.engine.quantization import check_quantization
from lorakit.errors import LorakitError
from lorakit.plan import RunPlan
from lorakit.reporting import say
from lorakit.resume import check_output_dir, plan_resume, run_fingerprint
from lorakit.templates import TEMPLATE_NAMES, Message, Template, check_against_tokenizer, get_template
from lorakit.tracking import check_trackers

Records = tuple[list[DatasetSpec], list[list[Message]]]  # the entries of --dataset, or the data from Python


def validate(config: Config, train_data: Any = None, eval_data: Any = None) -> RunPlan:
    """`train_data` / `eval_data`: data from Python instead of --dataset / --eval_dataset (lorakit.data.inmemory)."""
    if not config.train.output_dir:
        raise LorakitError("--output_dir is required: the adapter, logs and checkpoints go there")
    check_output_dir_writable(config.train.output_dir)
    check_output_dir(config)
    check_trackers(config.train.trackers)
    model_path, trust = config.model.model_name_or_path, config.model.trust_remote_code
    if trust:  # said before the first load, which may run the folder's code
        say(remote_code_note(model_path), launch_rank() == 0)
    hf_config = model_config(model_path, trust)
    check_model_weights(model_path)
    check_tokenizer_files(model_path)
    if config.model.template not in TEMPLATE_NAMES:
        raise LorakitError(f"--template {config.model.template} is unknown; choose one of {', '.join(TEMPLATE_NAMES)}")
    train_records, eval_records = read_records(config, train_data, eval_data)
    validate_precision(config)
    if config.model.enable_liger_kernel:  # explicitly asked for: must be able to run
        check_liger_kernel(hf_config.model_type)
    if not config.train.packing and config.train.pack_tokens:  # (the memory plan sets it later, packing or not)
        raise LorakitError(
            f"--pack_tokens {config.train.pack_tokens} sets the length of packed rows, and --packing false packs "
            "none; drop one of the two"
        )
    if config.train.packing and 0 < config.train.pack_tokens < config.data.cutoff_len:
        raise LorakitError(
            f"--pack_tokens {config.train.pack_tokens} is below --cutoff_len {config.data.cutoff_len}: the longest "
            "example would not fit in a row; raise --pack_tokens or lower --cutoff_len"
        )
    engine = plan_engine(config, hf_config, launch_world_size(), torch.cuda.is_available())
    check_quantization(config.model, engine.zero3, torch.cuda.is_available(), config.lora.pissa_init)
    if config.train.plot_loss and importlib.util.find_spec("matplotlib") is None:
        raise LorakitError("--plot_loss needs matplotlib: pip install 'lorakit[plot]' (or drop --plot_loss)")
    tokenizer = load_tokenizer(model_path, hf_config, trust_remote_code=trust)
    check_tokenizer_not_empty(tokenizer, model_path)
    template = system_template(get_template(config.model.template, tokenizer), config.data.system,
                               config.data.default_system)  # fmt: skip
    check_special_tokens(template, tokenizer, config.model.template)
    mismatch = check_against_tokenizer(template, tokenizer)
    if mismatch and config.model.strict_template:
        raise LorakitError(
            f"--template {template.name} renders conversations differently from the tokenizer's own chat_template "
            "(--strict_template); drop --strict_template to see both renderings, or use --template auto"
        )
    seed = config.train.seed
    train_data = data_source(train_records, config.data, template, tokenizer, seed)
    eval_data = data_source(eval_records, config.data.for_eval(), template, tokenizer, seed) if eval_records else None
    targets = list(engine.lora_targets)
    fingerprint = run_fingerprint(config, split_key(config.data, train_data.key), targets)
    resume, notes = plan_resume(config, fingerprint, launch_world_size())
    train_data, eval_data = ready_data(config, tokenizer, template, train_data, eval_data)
    warning = [f"WARNING: {mismatch}\nWARNING: training continues with --template {template.name}; the model "
               "will learn this format (--strict_template makes this an error)"] if mismatch else []  # fmt: skip
    mix = [train_data.meta["line"]] if train_data.meta and train_data.meta["line"] else []  # the drawn proportions
    return RunPlan(config, engine, tokenizer, template, train_data, eval_data, fingerprint, resume,
                   warning + mix + notes)  # fmt: skip


def read_records(config: Config, train_data: Any = None, eval_data: Any = None) -> tuple[Records, Records | None]:
    """The entries of --dataset and --eval_dataset, resolved (their files exist and have a type lorakit reads), or
    the data given from Python, read and checked here. The files' records are read and checked where they are
    tokenised (lorakit.data.build, called from `validate`), still before any process group."""
    data = config.data
    check_sources(data, train_data, eval_data)
    if train_data is not None:
        train: Records = ([], conversations_from(train_data, "train_data", data.max_samples))
    else:
        train = (resolve_datasets(data.dataset_dir, data.dataset), [])
    if eval_data is not None:
        return train, ([], conversations_from(eval_data, "eval_data", data.max_samples))
    if not data.eval_dataset:
        return train, None
    return train, (resolve_datasets(data.dataset_dir, data.eval_dataset), [])


def ready_data(config: Config, tokenizer: Any, template: Template, train: DataSource,
               held: DataSource | None) -> tuple[DataSource, DataSource | None]:  # fmt: skip
    """The data's caches, built by local rank 0 (the others wait): the last check, as the only one that writes (the
    cache, which a later run with other flags reuses)."""
    seed, builds = config.train.seed, launch_local_rank() == 0
    train = ready(train, config.data, tokenizer, template, builds, seed, TRAINING)
    eval_config = config.data.for_eval()
    return train, ready(held, eval_config, tokenizer, template, builds, seed, EVALUATION) if held else None


def data_source(records: Records, config: DataConfig, template: Template, tokenizer: Any, seed: int) -> DataSource:
    """The records with their tokenised-data cache key (computed once here: it hashes every data file)."""
    specs, conversations = records
    key = cache_key(specs, config, template, tokenizer, conversations, seed)
    return DataSource(tuple(specs), key, tuple(conversations))


def validate_precision(config: Config) -> None:
    if config.model.bf16 and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        where = "this GPU" if torch.cuda.is_available() else "the CPU (lorakit trains in fp32 there)"
        raise LorakitError(f"--bf16 is not supported on {where}; drop --bf16 or use a GPU with bf16 (Ampere or newer)")
    if config.model.fp16 and not torch.cuda.is_available():
        raise LorakitError("--fp16 needs a GPU; drop --fp16 to train in fp32 on the CPU")
