"""The engine: base model (partitioned under ZeRO-3) + PEFT LoRA, wrapped by DeepSpeed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig

from lorakit.config import Config
from lorakit.distributed import DistInfo
from lorakit.engine.deepspeed_config import (
    default_deepspeed_config,
    lorakit_chooses_units,
    resolve_deepspeed_config,
)
from lorakit.engine.kernels import apply_liger_kernel, use_liger_kernel
from lorakit.engine.memory import ModelShape, plan_memory
from lorakit.engine.model import (
    add_neftune_noise,
    attach_lora,
    linear_module_names,
    load_base_model,
    load_tokenizer,
    parameter_counts,
)
from lorakit.engine.zero3 import gather_updated_adapter_at_once, gather_whole_layers


@dataclass
class BuiltEngine:
    engine: Any  # deepspeed.DeepSpeedEngine; engine.module is the PeftModel
    ds_config: dict[str, Any]
    notes: list[str]  # what lorakit changed in the DeepSpeed config, for the log
    trainable_parameters: int
    total_parameters: int


def meta_parameter_count(hf_config: Any, trust_remote_code: bool = False) -> int:
    """The model's parameters, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in model.parameters())


def plan_run_memory(config: Config, dist: DistInfo) -> tuple[Config, list[str]]:
    """The config with --pack_tokens 0 and --gradient_checkpointing unset settled from the smallest free GPU
    memory of any rank (lorakit.engine.memory), and the plan's log lines."""
    trust = config.model.trust_remote_code
    hf_config = AutoConfig.from_pretrained(config.model.model_name_or_path, trust_remote_code=trust)
    free = None
    if dist.device.type == "cuda":  # every rank is on a GPU, so every rank joins this collective
        free = int(-dist.max([-float(torch.cuda.mem_get_info(dist.device)[0])])[0])
    ds_config, _ = resolve_deepspeed_config(config, dist.world_size, hf_config.hidden_size, free is not None)
    zero3 = ds_config["zero_optimization"].get("stage", 0) == 3
    shape = ModelShape.of(hf_config, meta_parameter_count(hf_config, trust), compute_dtype(config).itemsize)
    train = config.train
    batch_tokens = 0 if train.packing else train.per_device_train_batch_size * config.data.cutoff_len
    plan = plan_memory(shape, free, zero3, dist.world_size, config.data.cutoff_len, train.pack_tokens,
                       train.gradient_checkpointing, batch_tokens)  # fmt: skip
    train = dataclasses.replace(train, pack_tokens=plan.pack_tokens, gradient_checkpointing=plan.gradient_checkpointing)
    return dataclasses.replace(config, train=train), plan.lines


def stage2_hint(frozen_parameters: int, device: torch.device) -> list[str]:
    """One line when the frozen model would fit whole on each GPU: stage 3 stays (the user asked for it), but
    stage 2 would skip ZeRO-3's gathers and hooks (see benchmarks/RESULTS.md for what it gains)."""
    model_gib, free_gib = frozen_parameters * 2 / 2**30, torch.cuda.mem_get_info(device)[0] / 2**30
    if model_gib > 0.5 * free_gib:
        return []
    return [f"ZeRO-3 as asked; the frozen model ({model_gib:.1f} GiB in 16 bits) fits on each GPU ({free_gib:.0f} GiB "
            "free): --zero_stage 2 would keep it whole on every GPU and skip ZeRO-3's gathers and hooks "
            "(2.1x the tokens/s at the reference's batch on 2 H200s: benchmarks/RESULTS.md)"]  # fmt: skip


def largest_lora_matrix(config: Config, hf_config: Any) -> int:
    """Elements of the largest LoRA matrix: rank x the widest side an adapted linear layer can have."""
    return config.lora.lora_rank * max(hf_config.hidden_size, getattr(hf_config, "intermediate_size", 0))


def compute_dtype(config: Config) -> torch.dtype:
    return torch.bfloat16 if config.model.bf16 else torch.float16 if config.model.fp16 else torch.float32


def build_engine(config: Config, dist: DistInfo) -> BuiltEngine:
    """Resolve the DeepSpeed config, load the model, attach LoRA and hand both to DeepSpeed."""
    import deepspeed

    trust = config.model.trust_remote_code
    hf_config = AutoConfig.from_pretrained(config.model.model_name_or_path, trust_remote_code=trust)
    on_gpu = dist.device.type == "cuda"
    ds_config, notes = resolve_deepspeed_config(config, dist.world_size, hf_config.hidden_size, on_gpu,
                                                largest_lora_matrix(config, hf_config))  # fmt: skip
    zero3 = ds_config["zero_optimization"].get("stage", 0) == 3  # only stage 3 partitions the frozen weights
    model = load_base_model(config.model.model_name_or_path, compute_dtype(config), ds_config, zero3, dist.rank, trust)
    if config.train.gradient_checkpointing:  # settled by plan_run_memory, or asked for
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    liger, lines = use_liger_kernel(config.model.enable_liger_kernel, hf_config.model_type)
    notes += apply_liger_kernel(model) if liger else lines
    model = attach_lora(model, config.lora, config.train.seed)
    if config.train.neftune_noise_alpha > 0:
        add_neftune_noise(model, config.train.neftune_noise_alpha)
    if zero3 and lorakit_chooses_units(ds_config):
        notes += gather_whole_layers(model)
    trainable, total = parameter_counts(model)
    if zero3 and on_gpu:  # counted from the loaded model: no second skeleton
        notes += stage2_hint(total - trainable, dist.device)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable_params, config=ds_config)
    if zero3:
        gather_updated_adapter_at_once(engine)
    return BuiltEngine(engine, ds_config, notes, trainable, total)


__all__ = [
    "BuiltEngine",
    "add_neftune_noise",
    "attach_lora",
    "build_engine",
    "compute_dtype",
    "default_deepspeed_config",
    "linear_module_names",
    "load_base_model",
    "load_tokenizer",
    "parameter_counts",
    "plan_run_memory",
    "resolve_deepspeed_config",
]
