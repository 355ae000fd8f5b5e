"""Checks on the files a command will read or write, made before anything is loaded (lorakit.validate, merge, chat).

They read only what is cheap: a safetensors file's 8-byte length and JSON header (never its tensors), the names
of the tokenizer's files, the permissions of the output folder. Each failure is one LorakitError naming the path
and the fix.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

# A tokenizer needs one of these: a fast tokenizer's definition, a SentencePiece model, or a BPE/WordPiece vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")


def safetensors_header(path: Path, what: str) -> dict[str, Any]:
    """The JSON header of a safetensors file ({tensor name: {dtype, shape, data_offsets}}), after checking that the
    file is as long as the header says: a truncated copy (an interrupted download) is caught without reading it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            text = handle.read(length) if 0 < length <= size - 8 else b""
    except OSError as err:
        raise LorakitError(f"{what} {path} cannot be read ({err.strerror}); check its permissions") from None
    try:
        header = json.loads(text) if text else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise LorakitError(f"{what} {path} is not a safetensors file ({size} bytes, no readable header); copy it again")
    header.pop("__metadata__", None)
    end = max((int(t.get("data_offsets", [0, 0])[1]) for t in header.values() if isinstance(t, dict)), default=0)
    if 8 + length + end > size:
        raise LorakitError(
            f"{what} {path} is truncated ({size} bytes, its header describes {8 + length + end}); copy it again"
        )
    return header


def check_model_weights(path: str) -> None:
    """Every safetensors file the model folder's index names (or every *.safetensors file) exists and has a whole
    header. A folder with none is left to the later, specific error."""
    folder = Path(path)
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            names = sorted(set(json.loads(index_file.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise LorakitError(f"{index_file} is not a safetensors index (no weight_map); copy it again") from None
        files = [folder / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LorakitError(f"{path} lacks weight files its index names: {missing[:3]}; copy the model again")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LorakitError(f"{path} has no *.safetensors weights; save the model with save_pretrained() first")
    for file in files:
        safetensors_header(file, "weight file")


def check_tokenizer_files(path: str) -> None:
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise LorakitError(
            f"the model folder {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); copy them from "
            "the model's original folder (save_pretrained of its tokenizer)"
        )


def check_tokenizer_not_empty(tokenizer: Any, path: str) -> None:
    if len(tokenizer) == 0:
        raise LorakitError(f"the tokenizer in {path} has an empty vocabulary; copy its tokenizer files again")


def check_output_dir_writable(output_dir: str, flag: str = "--output_dir") -> None:
    """--output_dir (or merge's --out: `flag`) is a folder, or can be made as one, and this process may write in
    it. `os.access` is the test (so a read-only mount counts even for root, whose permission bits are otherwise
    always granted); nothing is created here: the folder is made when training starts."""
    path = Path(output_dir).absolute()
    if path.exists() and not path.is_dir():
        raise LorakitError(f"{flag} {output_dir} is a file, not a folder; remove it or choose another path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LorakitError(
            f"{flag} {output_dir} cannot be created: {existing} is a file, not a folder; choose another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LorakitError(
            f"{flag} {output_dir} is not writable ({existing} is read-only for this user or mounted read-only); "
            "choose a folder you can write to"
        )


def adapter_tensors(adapter_dir: Path) -> dict[str, Any]:
    """The header of the adapter's weights: present, whole and holding at least one non-empty LoRA pair."""
    weights = adapter_dir / "adapter_model.safetensors"
    header = safetensors_header(weights, "adapter file")
    lora = {name: t for name, t in header.items() if ".lora_A." in name or ".lora_B." in name}
    if not lora or any(0 in t.get("shape", [0]) for t in lora.values()):
        raise LorakitError(
            f"the adapter file {weights} holds no LoRA weights (no non-empty lora_A/lora_B tensors); it is not a "
            "trained adapter: save it again from the training run"
        )
    return header


SPECIAL = re.compile(r"<\|[^\s|<>]+\|>|</?s>")  # <|im_start|>, <|eot_id|>, <s>


def check_special_tokens(template: Any, tokenizer: Any, name: str) -> None:
    """Every special token a named template writes (<|...|> markers in its rendering, and its stop strings) is one
    token of this tokenizer; otherwise the model would learn the marker as a run of ordinary pieces. The
    tokenizer's own template (`auto`) is the tokenizer's by definition, whatever text it writes."""
    from lorakit.data.cache import PROBES  # here: merge and chat import this module without the data stack

    if name == "auto":
        return
    text = "".join(segment.text for probe in PROBES for segment in template.render(probe))
    written = set(SPECIAL.findall(text)) | {s for s in template.stop_strings if SPECIAL.fullmatch(s)}
    vocabulary = tokenizer.get_vocab()
    missing = sorted(token for token in written if token not in vocabulary)
    if missing:
        raise LorakitError(
            f"--template {template.name}: this template's special tokens do not exist in this tokenizer "
            f"({', '.join(missing)}); use the model's own template (--template auto) or the one made for its family"
        )
