"""Files lorakit writes are readable by whoever the user's umask lets read them, and can be checked later.

safetensors' `save_file` (0.8) writes through a private temporary file and renames it, so its files come out
mode 0600 whatever the umask: an adapter a teammate or a serving process under another user cannot read, beside
0644 JSON files written by plain `open`. Every safetensors file lorakit writes goes through `save_safetensors`,
which sets the mode a plain `open` would have given (0666 less the umask).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (setting it is process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(*paths: Path) -> None:
    """Give each file the mode `open()` would have given it under the current umask."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        os.chmod(path, mode)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(tensors, path, metadata=metadata)
    follow_umask(path)


def file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, as a checkpoint's file list holds them."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}
