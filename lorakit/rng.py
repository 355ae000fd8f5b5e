"""Every random-number state a resumed run needs (dropout, NEFTune), as tensors and JSON, never pickled.

A checkpoint may come from anyone, and unpickling a file runs whatever code it names; safetensors and JSON
hold only numbers. The states: torch's CPU generator and each CUDA device's (byte tensors), numpy's legacy global
MT19937 (624 key words and three scalars) and Python's `random` (625 words, a version and a cached gaussian).
Words are stored as int64 (every one fits) and floats as JSON, whose repr round-trips a float exactly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from lorakit.files import save_safetensors

META_KEY = "lorakit_rng"


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.safetensors"


def legacy_rng_file(rank: int) -> str:
    """The pickled file of checkpoints written before lorakit stopped pickling."""
    return f"rng_state_rank{rank}.pt"


def save_rng_state(path: Path) -> None:
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "python_words": torch.tensor(words, dtype=torch.int64),
    }
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors.update({f"cuda_{index}": state for index, state in enumerate(cuda)})
    scalars = {
        "numpy": [kind, int(position), int(has_gauss), float(cached_gauss)],
        "python": [version, gauss_next],
        "cuda_devices": len(cuda),
    }
    save_safetensors(tensors, path, metadata={META_KEY: json.dumps(scalars)})


def load_rng_state(path: Path) -> None:
    """Restore the states `save_rng_state` wrote (CUDA's only where this process has CUDA)."""
    with safe_open(path, framework="pt") as handle:
        scalars = json.loads(handle.metadata()[META_KEY])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    set_rng_state(tensors, scalars)


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    kind, position, has_gauss, cached_gauss = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    version, gauss_next = scalars["python"]
    random.setstate((version, tuple(int(word) for word in tensors["python_words"].tolist()), gauss_next))
    if scalars["cuda_devices"] and torch.cuda.is_available():  # the devices both runs see (a rank sees its own)
        for index in range(min(scalars["cuda_devices"], torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"cuda_{index}"], index)


def load_legacy_rng_state(path: Path) -> None:
    """A pickled file of the previous layout, read only on --unpickle_legacy_checkpoint. torch's restricted
    unpickler (weights_only) admits tensors and numpy arrays and refuses any other class or function the file
    names; that is the narrowest unpickling there is, but still unpickling, hence the flag."""
    numpy_globals = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _numpy_reconstruct()]
    with torch.serialization.safe_globals(numpy_globals):
        state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_reconstruct() -> object:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct
