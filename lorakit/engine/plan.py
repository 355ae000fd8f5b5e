"""What the engine is built from, worked out once, before any process group: the model's config and shape, the
modules LoRA adapts, and the final DeepSpeed config.

`lorakit.validate` makes it (its errors are bad input); set-up plans memory from it and `build_engine` builds
from it, so the model's config.json is read once and the DeepSpeed config resolved once per run, and the memory
plan sees the same DeepSpeed config as the engine.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from lorakit.config import Config
from lorakit.engine.deepspeed_config import (
    leave_overflow_check_to_lorakit,
    reduce_adapter_gradients_in_place,
    resolve_deepspeed_config,
)
from lorakit.engine.memory import ModelShape
from lorakit.engine.model import decoder_layers, lora_targets
from lorakit.engine.quantization import quantized_bytes_per_weight
from lorakit.engine.variants import additional_targets, check_pissa_rank, full_parameters
from lorakit.errors import LorakitError


@dataclass(frozen=True)
class EnginePlan:
    hf_config: Any  # the model's config.json as transformers reads it
    shape: ModelShape  # layers, widths, vocabulary, parameter count (of the meta-device model), bytes per weight
    lora_targets: tuple[str, ...]  # the module names LoRA adapts, `all` resolved against the model
    ds_config: dict[str, Any]  # the resolved DeepSpeed config, final (the persistence threshold covers the LoRA)
    ds_notes: tuple[str, ...]  # what lorakit changed in the DeepSpeed config, for the log
    automatic_persistence: bool = False  # the threshold is lorakit's "auto" (the memory plan may raise it)
    automatic_prefetch: bool = False  # stage3_prefetch_bucket_size is lorakit's "auto" (one decoder layer)
    checkpointed_layers: int | None = None  # the memory plan's: checkpointing on the first this many layers only
    resident_layers: int = 0  # the memory plan's: ZeRO-3 keeps the first this many layers' frozen weights whole
    peak_share: float = 0.0  # the memory plan's estimated peak over the free memory (0.0: nothing planned)
    mean_step_share: int = 0  # a rank's mean tokens in a step, packed (lorakit.data.batching; 0: unknown)
    fp32_modules: bool = False  # the model keeps some weights in fp32 (transformers' `_keep_in_fp32_modules`)

    @property
    def zero3(self) -> bool:
        """Only stage 3 partitions the frozen weights."""
        return self.ds_config["zero_optimization"].get("stage", 0) == 3


def compute_dtype(config: Config) -> torch.dtype:
    return torch.bfloat16 if config.model.bf16 else torch.float16 if config.model.fp16 else torch.float32


def largest_lora_matrix(config: Config, hf_config: Any) -> int:
    """Elements of the largest LoRA matrix: rank x the widest side an adapted linear layer can have."""
    return config.lora.lora_rank * max(hf_config.hidden_size, getattr(hf_config, "intermediate_size", 0))


def quantized_share(config: Config, skeleton: Any) -> tuple[int, float]:
    """(parameters stored quantised, bytes each) under --quantization_bit: the weights of every linear layer but
    the output head, the ones transformers replaces with bitsandbytes layers; (0, 0.0) without it."""
    if config.model.quantization_bit is None:
        return 0, 0.0
    linears = quantized_linears(skeleton).values()
    return sum(m.weight.numel() for m in linears), quantized_bytes_per_weight(config.model)


def quantized_linears(skeleton: Any) -> dict[str, torch.nn.Linear]:
    """The linear layers --quantization_bit stores packed, by name: every one but the output head."""
    head = skeleton.get_output_embeddings()
    return {name: m for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def check_full_modules_unpacked(config: Config, skeleton: Any, full: list[str]) -> None:
    """A module trained in full under --quantization_bit must not be (or hold) a packed linear layer: its weight
    is bitsandbytes' uint8 storage, which cannot require a gradient (PEFT's copy of the module would meet that on
    the GPU, after loading; not run there)."""
    bits = config.model.quantization_bit
    if bits is None:
        return
    packed = quantized_linears(skeleton)
    for name in full:
        inside = next((n for n in packed if n == name or n.startswith(f"{name}.")), None)
        if inside is not None:
            raise LorakitError(f"--additional_target trains {name} in full, and it is (or holds) the linear layer "
                               f"{inside}, which --quantization_bit {bits} stores packed: a packed weight cannot "
                               "train; adapt it with LoRA (--lora_target), or drop --quantization_bit")  # fmt: skip


def plan_engine(config: Config, hf_config: Any, world_size: int, on_gpu: bool) -> EnginePlan:
    """Resolve the DeepSpeed config and look at the model's module tree (on the meta device: nothing allocated);
    a contradiction in the DeepSpeed file, an unknown LoRA or additional target or a PiSSA rank above a
    weight's is a LorakitError."""
    largest_lora = largest_lora_matrix(config, hf_config)
    ds_config, notes, filled = resolve_deepspeed_config(config, world_size, hf_config.hidden_size, on_gpu, largest_lora)
    with torch.device("meta"):  # a copy: transformers writes its dtype and attention choice into the config
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config),
                                                    trust_remote_code=config.model.trust_remote_code)  # fmt: skip
    targets = lora_targets(skeleton, config.lora)
    if config.lora.pissa_init:
        check_pissa_rank(skeleton, config.lora.lora_rank, targets)
    full = additional_targets(skeleton, config.lora, targets)
    check_full_modules_unpacked(config, skeleton, full)
    trained_full = full_parameters(skeleton, full)
    ds_config, in_place = reduce_adapter_gradients_in_place(ds_config, trained_full,
                                                            config.model.quantization_bit is not None)  # fmt: skip
    ds_config, unchecked = leave_overflow_check_to_lorakit(ds_config)
    notes += in_place + unchecked
    parameters = sum(p.numel() for p in skeleton.parameters())
    largest_layer = max((sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(skeleton)), default=0)
    largest_weight = max((p.numel() for p in skeleton.parameters()), default=0)
    shape = ModelShape.of(hf_config, parameters, compute_dtype(config).itemsize, trained_full,
                          *quantized_share(config, skeleton), largest_layer, largest_weight)  # fmt: skip
    automatic = "stage3_param_persistence_threshold" in filled  # the file left it to lorakit: the plan may raise it
    return EnginePlan(hf_config, shape, tuple(targets), ds_config, tuple(notes), automatic,
                      automatic_prefetch="stage3_prefetch_bucket_size" in filled,
                      fp32_modules=bool(getattr(skeleton, "_keep_in_fp32_modules", None)))  # fmt: skip
