"""A PiSSA adapter as saved: converted to plain LoRA for the unmodified base, or kept for the residual base.

PiSSA trains A and B on the residual base W_res = W - s * B0 @ A0, so the trained adapter alone is only valid on
that residual. PEFT's documented conversion (save_pretrained's path_initial_model_for_weight_conversion,
LoraModel.subtract_mutated_init) turns it into a plain LoRA adapter for W itself:
    W_res + s * B @ A = W + s * (B @ A - B0 @ A0) = W + s * [B | -B0] @ [A ; A0]
of twice the rank, its alpha doubled (x sqrt(2) with rsLoRA) so the scale s stays. lorakit does the same
arithmetic on the gathered state (PEFT's route loads the initial adapter into the live, partitioned model) and
keeps what PEFT's conversion drops: DoRA's magnitudes (valid as they are: the converted adapter gives every row
the same W_res + s * B @ A) and the modules trained in full (--additional_target).

--pissa_convert false saves the trained adapter as PEFT does without conversion, with its starting point
(A0, B0, init_lora_weights true; the modules trained in full as trained) in `pissa_init/` beside it: PEFT's
path_initial_model_for_weight_conversion folder, from which `lorakit merge` (or PEFT) converts it later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INITIAL_FOLDER = "pissa_init"


@dataclass(frozen=True)
class PissaStart:
    initial: dict[str, torch.Tensor]  # the LoRA matrices as PiSSA initialised them, by parameter name, on the CPU
    convert: bool  # --pissa_convert


def converted_state(state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (trained tensors by parameter name) with every A stacked over A0 and every B beside -B0."""
    out = dict(state)
    for name, start in initial.items():
        if not is_lora_matrix(name):  # a starting point's modules trained in full: no part of the conversion
            continue
        trained = state[name]
        start = start.to(trained.dtype)
        out[name] = torch.cat([trained, start], 0) if ".lora_A." in name else torch.cat([trained, -start], 1)
    return out


def is_lora_matrix(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def converted_config(config: dict[str, Any]) -> dict[str, Any]:
    """An adapter_config.json's settings for the converted adapter: twice the rank, the same scale, no PiSSA."""
    alpha = config["lora_alpha"] * (math.sqrt(2) if config.get("use_rslora") else 2)
    return {**config, "r": 2 * config["r"], "lora_alpha": alpha, "init_lora_weights": True}


def rewrite_config(folder: Path, change: Any) -> None:
    file = folder / "adapter_config.json"
    file.write_text(json.dumps(change(json.loads(file.read_text())), indent=2, sort_keys=True) + "\n")


def write_adapter(model: Any, folder: Path, state: dict[str, torch.Tensor], pissa: PissaStart | None) -> None:
    """PEFT's adapter files for `state` in `folder`; a PiSSA adapter converted, or with its `pissa_init/`."""
    if pissa is not None and pissa.convert:
        state = converted_state(state, pissa.initial)
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    if pissa is None:
        return
    if pissa.convert:
        rewrite_config(folder, converted_config)
        return
    # PEFT saves a tensor for every module trained in full (modules_to_save); no conversion reads them (PEFT's
    # and lorakit's take A0 and B0 only), so they go as trained, not kept from the start in memory for this
    full = {name: tensor for name, tensor in state.items() if "lora_" not in name}
    initial = {**full, **pissa.initial}
    model.save_pretrained(folder / INITIAL_FOLDER, state_dict=initial, safe_serialization=True)
    rewrite_config(folder / INITIAL_FOLDER, lambda config: {**config, "init_lora_weights": True})


def is_pissa(config: dict[str, Any]) -> bool:
    """Whether an adapter_config.json describes an unconverted PiSSA adapter (valid on its residual base only)."""
    return str(config.get("init_lora_weights", "")).lower().startswith("pissa")


def is_unconverted_pissa(adapter_dir: Path) -> bool:
    """Whether the adapter folder holds an unconverted PiSSA adapter (an unreadable config is not one: the
    adapter's own checks name what is wrong with it)."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and is_pissa(config)
