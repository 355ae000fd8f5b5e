"""QLoRA: the frozen base model quantised by bitsandbytes while it loads (--quantization_bit 4|8).

The route is the one transformers and PEFT document for QLoRA under ZeRO-3 and FSDP: 4-bit weights packed into
a tensor of the training dtype (`bnb_4bit_quant_storage`), so to DeepSpeed they are ordinary bf16 parameters of
a quarter of the elements, which it partitions, gathers and broadcasts like any other (its gathers coalesce a
whole decoder layer's tensors into one buffer of one dtype: packed uint8 among bf16 norms would not do). Each
weight's quantisation constants (`quant_state`: absmax, code) are an attribute of the parameter, not a tensor
DeepSpeed sees: every rank keeps its own whole copy (a few per cent of the packed bytes).

Loading: transformers quantises on the GPU as it reads each shard (`from_pretrained` with a
BitsAndBytesConfig), on every rank, so under ZeRO-3 each rank briefly holds the whole quantised model (7B: about
5 GiB, 32B: about 19 GiB) before `deepspeed.initialize` partitions it. transformers does the same under ZeRO-3
(a quantised model is never built inside `zero.Init`: bitsandbytes quantises a weight when it is moved to the
GPU, which zero.Init's partitioned-at-birth tensors never are).

8 bits stay off ZeRO-3: bitsandbytes' Linear8bitLt writes its whole int8 weight back into the parameter after
every forward (`self.weight.data = self.state.CB`) and keeps a reference to it, which undoes ZeRO-3's
partitioning and breaks its bookkeeping; its int8 tensors would also share a layer's gather with bf16 ones.
LLaMA-Factory refuses the same ("Only 4-bit quantized model can use fsdp+qlora").

What PEFT's `prepare_model_for_kbit_training` does and why lorakit does less: it upcasts every non-quantised
parameter (embeddings, norms, the output head) to fp32, which doubles their memory and makes every norm's output
fp32 (each quantised linear then casts it back); lorakit keeps them in the training dtype, as in its LoRA
training without quantisation (Qwen2's RMSNorm already computes in fp32 inside). It makes the embedding output
require a gradient, which only reentrant checkpointing needs (lorakit's is not reentrant). It turns gradient
checkpointing on, which lorakit's memory plan decides as for any run (lorakit.engine.memory counts the packed
bytes, and the gathered 4-bit weights bitsandbytes keeps for backward under ZeRO-3).
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

import torch

from lorakit.config import ModelConfig
from lorakit.errors import LorakitError

INSTALL = "pip install 'lorakit[qlora]' (bitsandbytes)"
BLOCKSIZE = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
NESTED_BLOCKSIZE = 256  # double quantisation: the absmax values themselves in 8-bit blocks of 256


def quantized_bytes_per_weight(settings: ModelConfig) -> float:
    """Bytes a quantised weight takes on the GPU, its share of the quantisation constants included: 4 bits plus
    an fp32 absmax per block of 64 (0.5625), or with double quantisation an 8-bit absmax per block and an fp32
    one per 256 blocks (about 0.516); 8 bits: one byte (plus one fp32 scale per row, left out)."""
    if settings.quantization_bit == 8:
        return 1.0
    constants = 1 / BLOCKSIZE + 4 / (BLOCKSIZE * NESTED_BLOCKSIZE) if settings.double_quantization else 4 / BLOCKSIZE
    return 0.5 + constants


def bnb_config(settings: ModelConfig, dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for the flags, computing in `dtype` (the training dtype) and, for 4 bits,
    packing into tensors of `dtype` (see the module docstring)."""
    from transformers import BitsAndBytesConfig

    if settings.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quantization_type,
        bnb_4bit_use_double_quant=settings.double_quantization,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def check_quantization(settings: ModelConfig, zero3: bool, on_gpu: bool, pissa: bool = False) -> None:
    """Before anything loads: QLoRA's needs that the flags alone do not show (the ZeRO stage is the resolved
    DeepSpeed config's). The ZeRO-3 and PiSSA lines come first, so that they show on any machine."""
    bits = settings.quantization_bit
    if bits is None:
        return
    if pissa:  # PiSSA writes a bf16 residual into each adapted base weight: packed 4/8-bit weights cannot hold it
        raise LorakitError(f"--pissa_init rewrites the adapted base weights, which --quantization_bit {bits} stores "
                           "packed; drop one of them (PiSSA on a quantised base needs the residual model saved "
                           "and quantised first)")  # fmt: skip
    if bits == 8 and zero3:
        raise LorakitError("--quantization_bit 8 does not work under ZeRO-3 (bitsandbytes' 8-bit layers keep "
                           "their whole weight on every rank); use --quantization_bit 4, or 8 bits with "
                           "--zero_stage 2 (or 0 on one GPU)")  # fmt: skip
    if not on_gpu:
        raise LorakitError(f"--quantization_bit {bits} needs a CUDA GPU (bitsandbytes' training kernels); drop "
                           "--quantization_bit to train on the CPU")  # fmt: skip
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LorakitError(f"--quantization_bit {bits} needs bitsandbytes: {INSTALL}")


def load_quantized_model(path: str, hf_config: Any, dtype: torch.dtype, settings: ModelConfig,
                         device: torch.device, trust_remote_code: bool = False) -> Any:  # fmt: skip
    """The causal LM from `path`, its linear layers (the output head excepted) quantised on `device` as the
    shards are read; everything else in `dtype`."""
    from transformers import AutoModelForCausalLM

    # a copy: transformers writes the quantisation settings into the config it is given
    quantization = bnb_config(settings, dtype)
    return AutoModelForCausalLM.from_pretrained(path, config=copy.deepcopy(hf_config), dtype=dtype,
                                                quantization_config=quantization, device_map={"": device},
                                                trust_remote_code=trust_remote_code)  # fmt: skip


def describe(settings: ModelConfig) -> str:
    """e.g. "4-bit NF4, double quantisation" (for the log and for merge's line)."""
    if settings.quantization_bit == 8:
        return "8-bit (LLM.int8)"
    double = ", double quantisation" if settings.double_quantization else ""
    return f"4-bit {settings.quantization_type.upper()}{double}"


def true_numel(param: torch.nn.Parameter) -> int:
    """The parameter's element count as the model defines it: a packed 4-bit weight holds 2 (uint8) or 4
    (bf16) weights an element, and its quant_state knows the unpacked shape; a ZeRO-3 partition its ds_numel."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    if shape is not None:
        return int(torch.Size(shape).numel())
    return getattr(param, "ds_numel", param.numel())
