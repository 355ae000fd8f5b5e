"""`lorakit_config.json`, the record of a run: every flag and the resolved DeepSpeed config.

Training writes it into output_dir (with the tokenizer, so the folder is self-contained) and copies it into
every checkpoint; resuming reads its flags to list changed settings, and `merge` and `chat` read the template
the adapter was trained with from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.config import Config
from lorakit.data.system_prompt import served_template
from lorakit.templates import Template, get_template

CONFIG_FILE = "lorakit_config.json"


def resolved_config(config: Config, ds_config: dict[str, Any]) -> dict[str, Any]:
    """What lorakit_config.json holds (and the experiment trackers get as hyper-parameters)."""
    return {"lorakit": config.to_flat(), "deepspeed": ds_config}


def save_run_files(directory: Path, tokenizer: Any, config: Config, ds_config: dict[str, Any]) -> None:
    """The tokenizer (so the output folder is self-contained) and the resolved configuration."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    resolved = resolved_config(config, ds_config)
    (directory / CONFIG_FILE).write_text(json.dumps(resolved, indent=2, default=str) + "\n")


def has_run_record(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def read_run_flags(folder: Path) -> dict[str, Any]:
    """The flags of the run that wrote `folder` (an output_dir, checkpoint or merged model)."""
    return json.loads((folder / CONFIG_FILE).read_text())["lorakit"]


def training_template(folder: Path, tokenizer: Any) -> Template | None:
    """The template the run that wrote `folder` trained with (None for a folder lorakit did not write)."""
    if not has_run_record(folder):
        return None
    flags = read_run_flags(folder)
    template = get_template(flags["template"], tokenizer)
    return served_template(template, flags.get("system"), flags.get("default_system"))
