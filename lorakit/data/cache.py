"""The tokenised-data cache: a second run with the same inputs does not tokenise again.

The key covers everything the ids depend on: the data files' bytes (for data given from Python, the conversations
themselves: lorakit.data.inmemory), the dataset_info entries, the mixture of several datasets (--mix_strategy,
--interleave_probs and the order they drew with --seed), --max_samples,
--cutoff_len, the template's rendering of a probe conversation and the tokenizer's full definition. Files are
written under a temporary name and renamed, so a killed run never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.config import DataConfig
from lorakit.data.encode import TokenizedData
from lorakit.data.inmemory import content_digest
from lorakit.data.records import DatasetSpec
from lorakit.templates import Message, Template

CACHE_FORMAT = 2
_TURNS = [Message("user", "U1"), Message("assistant", "A1"), Message("user", "U2"), Message("assistant", "A2")]
PROBES = [[Message("system", "S"), *_TURNS], _TURNS]  # with and without a system prompt, so defaults count too


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit")) / "data"


def _file_digest(path: Path) -> str:
    """sha256 of a data file's bytes; of a folder's files (names and bytes) in name order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(definition.encode()).hexdigest()


def cache_key(specs: list[DatasetSpec], config: DataConfig, template: Template, tokenizer: Any,
              conversations: list[list[Message]] | None = None, mixture: str = "") -> str:  # fmt: skip
    """Everything the ids depend on: data bytes and entries (with no entries, data from Python: the
    `conversations` themselves), the mixture's order (lorakit.data.mixing: it follows --seed), the data flags, the
    template, the tokenizer."""
    datasets = [[s.name, repr(s), _file_digest(s.path)] for s in specs]
    parts = {
        "format": CACHE_FORMAT,
        "datasets": datasets if specs else [["from Python", content_digest(conversations or [])]],
        "options": [
            config.max_samples,
            config.cutoff_len,
            config.train_on_prompt,
            config.mask_history,
            config.system,
            config.default_system,
            config.mix_strategy,
            list(config.interleave_probs),
        ],  # fmt: skip
        "mixture": mixture,
        "template": [template.name, [[[s.text, s.trained] for s in template.render(p)] for p in PROBES]],
        "tokenizer": _tokenizer_digest(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def save(data: TokenizedData, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        np.savez(
            handle,
            ids=data.ids,
            labels=data.labels,
            offsets=data.offsets,
            stats=np.asarray([data.num_truncated, data.num_dropped]),
        )
    os.replace(temporary, path)


def load(path: Path) -> TokenizedData:
    with np.load(path) as arrays:
        truncated, dropped = (int(v) for v in arrays["stats"])
        return TokenizedData(arrays["ids"], arrays["labels"], arrays["offsets"], truncated, dropped)
