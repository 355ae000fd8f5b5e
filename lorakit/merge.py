"""Merge a LoRA adapter into its base model: a standalone model folder that needs neither PEFT nor lorakit.

`python -m lorakit merge --base MODEL --adapter DIR --out DIR [--export ollama]`

- The LoRA settings (rank, alpha, rsLoRA, DoRA, target modules) come from the adapter's own adapter_config.json;
  nothing is copied by hand. Modules trained in full (--additional_target, PEFT's modules_to_save) replace the
  base's weights; a tied output head follows its embedding. A PiSSA adapter saved unconverted (--pissa_convert
  false) is converted first, from the pissa_init/ folder beside it (lorakit.pissa): the merged model is then the
  trained one, residual base and adapter, on the original base's files.
- Merging streams the base model one safetensors shard at a time (W += scale * B @ A in fp32, stored back in
  the shard's dtype; with DoRA each row then rescaled to its trained magnitude), so a 7B model merges in a few
  GiB of memory.
- The output gets the tokenizer with the chat template the adapter was trained with (from the adapter's
  lorakit_config.json) as its `chat_template`, and a generation_config.json whose end-of-turn token stops
  generation after the reply (the classic "answers, then rambles on" failure of hand-built prompts).
- Checks come first, before anything is written: adapter and base must belong together (every adapted module
  exists in the base with matching shapes), and an existing --out is not replaced without --overwrite.
- A QLoRA adapter (--quantization_bit, recorded in its lorakit_config.json) merges onto the unquantised base
  given as --base, in that base's precision, and a line says so; a base folder saved already quantised is
  refused (its packed weights are not the weights the adapter's deltas apply to).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from transformers import GenerationConfig

from lorakit.adapter import (
    check_belongs,
    check_full_weights,
    check_unquantized_base,
    dora_magnitudes,
    full_weights,
    lora_deltas,
    merged_weight,
    qlora_base_line,
)
from lorakit.checks import check_model_weights, check_output_dir_writable, check_tokenizer_files
from lorakit.engine.model import load_tokenizer, model_config
from lorakit.errors import LorakitError
from lorakit.files import save_safetensors
from lorakit.generation import stop_token_ids
from lorakit.reporting import say
from lorakit.run_record import CONFIG_FILE, training_template
from lorakit.templates import Template


def merge(base: str, adapter: str, out: str, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Write the merged model to `out` (atomically: a temporary folder renamed when complete)."""
    destination, adapter_dir = Path(out), Path(adapter)
    if destination.exists() and not overwrite:
        raise LorakitError(f"--out {out} already exists; pass --overwrite to replace it, or choose another folder")
    for flag, source in (("--adapter", adapter_dir), ("--base", Path(base))):  # read first, then deleted
        if destination.exists() and destination.resolve() in (source.resolve(), *source.resolve().parents):
            raise LorakitError(f"--out {out} is (or holds) {source}: --overwrite would delete the {flag} folder "
                               "being merged; choose another --out")  # fmt: skip
    check_output_dir_writable(out, "--out")
    base_config = model_config(base, trust_remote_code)
    check_unquantized_base(base_config, base)
    check_model_weights(base)
    check_tokenizer_files(base)
    pairs, scale = lora_deltas(adapter_dir)
    index = check_belongs(pairs, base, adapter)
    magnitudes = dora_magnitudes(adapter_dir)
    full = full_weights(adapter_dir)
    tied = bool(getattr(base_config, "tie_word_embeddings", False))
    kept = check_full_weights(full, index, tied, f"the adapter {adapter}")
    qlora_line = qlora_base_line(adapter_dir, base, base_config)
    if qlora_line:
        say(f"merge: {qlora_line}")
    tokenizer_dir = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    template = training_template(adapter_dir, tokenizer)
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.incomplete")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for shard in sorted(set(index.values())):
        tensors = load_file(shard)
        for name, tensor in tensors.items():
            if name in pairs:
                tensors[name] = merged_weight(tensor, *pairs[name], scale, magnitudes.get(name))
            elif name in kept:  # trained in full (--additional_target): the trained copy replaces the weight
                tensors[name] = full[name].to(tensor.dtype)
        save_safetensors(tensors, temporary / shard.name, metadata={"format": "pt"})
    if (Path(base) / "model.safetensors.index.json").is_file():
        shutil.copyfile(Path(base) / "model.safetensors.index.json", temporary / "model.safetensors.index.json")
    base_config.save_pretrained(temporary)
    if template is not None:
        tokenizer.chat_template = template.chat_template_jinja()
        shutil.copyfile(adapter_dir / CONFIG_FILE, temporary / CONFIG_FILE)  # copy() would keep its mode
    tokenizer.save_pretrained(temporary)
    write_generation_config(base, temporary, tokenizer, template)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(temporary, destination)
    return destination


def write_generation_config(base: str, folder: Path, tokenizer: Any, template: Template | None) -> None:
    """The base's generation settings, with every end-of-turn token of the chat template as an eos token."""
    try:
        generation = GenerationConfig.from_pretrained(base)
    except OSError:
        generation = GenerationConfig()
    stops = stop_token_ids(tokenizer, template) if template is not None else []
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    generation.eos_token_id = list(dict.fromkeys(stops + [e for e in eos if e is not None]))
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(folder)
