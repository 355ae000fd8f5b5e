"""A LoRA adapter folder read as weight deltas, and checked against a base model (merge and chat).

The settings (rank, alpha, rsLoRA) come from the adapter's own adapter_config.json; the fit to the base is checked
on the base's safetensors headers only, so an adapter for another model is one line before any model is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.checks import adapter_tensors
from lorakit.config import ModelConfig
from lorakit.engine.model import weight_index
from lorakit.engine.quantization import describe
from lorakit.errors import LorakitError
from lorakit.pissa import INITIAL_FOLDER, converted_state, is_lora_matrix, is_pissa
from lorakit.run_record import has_run_record, read_run_flags

QUANTIZATION_FLAGS = ("quantization_bit", "quantization_method", "quantization_type", "double_quantization")

ADAPTER_PREFIX = "base_model.model."


def lora_deltas(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """{base weight name: (A, B)} and the scale alpha / r (or alpha / sqrt(r) with rsLoRA)."""
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise LorakitError(f"--adapter {adapter_dir} has no adapter_config.json + adapter_model.safetensors")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LorakitError(f"{config_file} is not valid JSON; save the adapter again") from None
    if not isinstance(config, dict):
        raise LorakitError(f"{config_file} must hold a JSON object (PEFT's adapter config); save the adapter again")
    if config.get("peft_type") != "LORA" or config.get("fan_in_fan_out"):
        raise LorakitError(f"--adapter {adapter_dir} is not a plain LoRA adapter (peft_type {config.get('peft_type')})")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise LorakitError(f"{config_file} needs r >= 1 and lora_alpha > 0 (has r={rank}, lora_alpha={alpha})")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    adapter_tensors(adapter_dir)  # whole, with LoRA weights: an empty adapter would "merge" into the unchanged base
    tensors = load_file(weights_file)
    if is_pissa(config):  # trained on a residual base: converted against its starting point (lorakit.pissa)
        tensors = converted_state(tensors, pissa_start(adapter_dir, tensors))
    pairs = {}
    for key, tensor in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix(ADAPTER_PREFIX).split(".lora_A.")[0]
            partner = key.replace(".lora_A.", ".lora_B.")
            if partner not in tensors:
                raise LorakitError(f"{weights_file} has {key} but not {partner}; save the adapter again")
            pairs[f"{module}.weight"] = (tensor, tensors[partner])
    return pairs, scale


def pissa_start(adapter_dir: Path, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The starting point of the unconverted PiSSA adapter `trained`, from the pissa_init/ folder saved beside it:
    its A0 and B0 by the same names and shapes (another run's, of another rank, would convert without an error)."""
    initial = adapter_dir / INITIAL_FOLDER / "adapter_model.safetensors"
    if not initial.is_file():
        raise LorakitError(
            f"--adapter {adapter_dir} is an unconverted PiSSA adapter (init_lora_weights "
            "pissa in adapter_config.json): it is valid only on the residual base its training made, and "
            f"{initial} (its starting point, to convert it) is missing; train with --pissa_convert (the default), "
            "or copy the adapter folder whole"
        )
    start = load_file(initial)
    shapes = [{k: list(v.shape) for k, v in tensors.items() if is_lora_matrix(k)} for tensors in (trained, start)]
    if shapes[0] != shapes[1]:
        first = next(k for k in sorted(shapes[0].keys() | shapes[1].keys()) if shapes[0].get(k) != shapes[1].get(k))
        name, there, here = first.removeprefix(ADAPTER_PREFIX), shapes[1].get(first), shapes[0].get(first)
        raise LorakitError(f"{initial} is not the starting point of --adapter {adapter_dir} ({name} is "
                           f"{there or 'missing'} there, {here or 'missing'} in the adapter); copy the adapter folder "
                           "whole, as its run saved it")  # fmt: skip
    return start


def full_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """{base weight name: trained tensor} of the modules trained in full (PEFT's modules_to_save)."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    lora = (".lora_A.", ".lora_B.", ".lora_magnitude_vector")
    return {key.removeprefix(ADAPTER_PREFIX): v for key, v in tensors.items() if not any(m in key for m in lora)}


def check_full_weights(full: dict[str, torch.Tensor], index: dict[str, Path], tied: bool, which: str) -> list[str]:
    """The names of `full` the merged model keeps: each is a base weight of the same shape, except a tied output
    head, which the base stores as its embedding (PEFT saves the one trained matrix under both names)."""
    kept = []
    for name, tensor in full.items():
        if name not in index:
            if tied and any(torch.equal(tensor, other) for key, other in full.items() if key in index):
                continue
            raise LorakitError(f"{which} trains {name} in full, which the base model does not have (or stores tied "
                               "to another weight); use the base model it was trained on")  # fmt: skip
        with safe_open(index[name], framework="pt") as handle:
            shape = list(handle.get_slice(name).get_shape())
        if shape != list(tensor.shape):
            raise LorakitError(
                f"{which} does not fit the base model: {name} is {shape} there but "
                f"{list(tensor.shape)} in the adapter; use the base model it was trained on"
            )
        kept.append(name)
    return kept


def check_belongs(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], base: str,
                  adapter: Path | str = "") -> dict[str, Path]:  # fmt: skip
    """The base's weight index, once every adapted weight is found in it with the shapes the adapter needs."""
    which = f"the adapter {adapter}" if adapter else "the adapter"
    index = weight_index(base)
    missing = sorted(name for name in pairs if name not in index)
    if missing:
        raise LorakitError(
            f"{which} adapts modules the base model {base} does not have (e.g. {missing[:3]}); it was trained on "
            "another architecture"
        )
    for name, (a, b) in pairs.items():
        with safe_open(index[name], framework="pt") as handle:
            shape = tuple(handle.get_slice(name).get_shape())
        if shape != (b.shape[0], a.shape[1]):
            raise LorakitError(
                f"{which} does not fit the base model {base}: {name} is {list(shape)} there but the adapter "
                f"expects {[b.shape[0], a.shape[1]]} (made for another model size or architecture); use the base "
                "model it was trained on"
            )
    return index


def dora_magnitudes(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """{base weight name: DoRA magnitude (one per output feature)}; empty for an adapter without DoRA."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    suffix = ".lora_magnitude_vector"
    return {
        key.removeprefix(ADAPTER_PREFIX).removesuffix(suffix) + ".weight": value
        for key, value in tensors.items()
        if key.endswith(suffix)
    }


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                  magnitude: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """W + scale * B @ A in fp32, stored back in W's dtype; with DoRA, each output row then rescaled to its trained
    magnitude: m / ||W + scale * B @ A||_row, as PEFT merges it (the norm is of the merged row, not of W)."""
    merged = weight.float() + scale * (b.float() @ a.float())
    if magnitude is not None:
        merged = (magnitude.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged
    return merged.to(weight.dtype)


def check_unquantized_base(base_config: Any, base: str) -> None:
    """merge and chat read the base's safetensors as they are: a folder saved already quantised (bitsandbytes'
    packed weights, `quantization_config` in its config.json) is not a base an adapter can be merged onto."""
    quantized = getattr(base_config, "quantization_config", None)
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else type(quantized).__name__
        raise LorakitError(
            f"{base} holds an already-quantised model (quantization_config in its config.json: {method}); use the "
            "unquantised base model folder (bf16/fp16 safetensors), the one a QLoRA run quantises while loading"
        )


def qlora_base_line(adapter_dir: Path, base: str, base_config: Any) -> str | None:
    """For an adapter trained by lorakit with --quantization_bit (its lorakit_config.json says so): the line that
    says it is used on the unquantised `base`, in the base's own precision; None for any other adapter."""
    flags = read_run_flags(adapter_dir) if has_run_record(adapter_dir) else {}
    if flags.get("quantization_bit") is None:
        return None
    settings = ModelConfig(**{k: v for k, v in flags.items() if k in QUANTIZATION_FLAGS})
    dtype = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None) or "its stored dtype"
    trained_on = flags.get("model_name_or_path") or "?"
    return (f"QLoRA adapter (trained on {trained_on} quantised to {describe(settings)}): using the unquantised base "
            f"{base} ({str(dtype).removeprefix('torch.')} weights as stored), not a quantised one")  # fmt: skip
