"""The tokenised-data cache: a second run with the same inputs does not tokenise again, and every rank of a node
reads one copy.

The key covers everything the ids depend on: the data files' bytes (for data given from Python, the conversations
themselves: lorakit.data.inmemory), the dataset_info entries, the mixing flags (--mix_strategy, --interleave_probs,
and --seed where the draws are random: the mixture is a function of these and the record counts), --max_samples,
--cutoff_len, the template's rendering of a probe conversation and the tokenizer's full definition. A key names a
folder (lorakit.data.build writes it, lorakit.data.tokens reads it). Local rank 0 of each node builds it while the
node's other ranks wait for it to appear; with a folder shared by several nodes the first build to finish is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.checks import check_output_dir_writable
from lorakit.config import DataConfig
from lorakit.data.build import META, build
from lorakit.data.checks import check_data
from lorakit.data.info import DatasetSpec
from lorakit.data.inmemory import content_digest
from lorakit.data.tokens import TokenizedData, load_tokens
from lorakit.distributed import notice_after
from lorakit.templates import Message, Template

CACHE_FORMAT = 5  # 4: labels of --train_on_prompt with --mask_history, and --template auto splits (session 5);
# 5: an example's first token is never a label (--train_on_prompt trained it across packed examples), and the key
# holds the template's jinja (session 7)
# A reader that changed what the same bytes of its file type read as, and since when: in the key of that type's data
# only (a new CACHE_FORMAT would set every cache and every checkpoint's fingerprint aside). Parquet 2: the null keys
# Arrow adds are dropped (lorakit.data.readers.without_nulls; a tool's definition read with every other tool's
# parameters as nulls before, which the tools text trained on; session 8).
READERS = {".parquet": 2}
WAIT_S = 60.0  # a rank waiting this long for the cache says so
POLL_S = 0.2
_TURNS = [Message("user", "U1"), Message("assistant", "A1"), Message("user", "U2"), Message("assistant", "A2")]
PROBES = [[Message("system", "S"), *_TURNS], _TURNS]  # with and without a system prompt, so defaults count too


@dataclass(frozen=True)
class DataSource:
    """A training or evaluation set as lorakit.validate resolves it: where its records come from and its cache key;
    `meta` once its cache is ready (lorakit.data.build: counts, the mixture's log line), with `cached` whether it
    was there before this run."""

    specs: tuple[DatasetSpec, ...]  # the dataset_info.json entries, resolved against --dataset_dir
    key: str  # the cache key (it hashes every data file)
    conversations: tuple[list[Message], ...] = ()  # data given from Python (files are read by the build)
    meta: dict[str, Any] | None = field(default=None, compare=False)
    cached: bool = False


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit")) / "data"


def cache_folder(config: DataConfig, key: str) -> Path:
    return Path(config.data_cache_dir or default_cache_dir()) / key


def _file_digest(path: Path) -> str:
    """sha256 of a data file's bytes; of a folder's files (names and bytes) in name order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _reader_versions(spec: DatasetSpec) -> list[str]:
    """The versions of READERS that read `spec`'s files (none for the others: their keys are as they were)."""
    return sorted({f"{p.suffix} reader {READERS[p.suffix]}" for p in spec.files if p.suffix in READERS})


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(definition.encode()).hexdigest()


def cache_key(specs: list[DatasetSpec], config: DataConfig, template: Template, tokenizer: Any,
              conversations: list[list[Message]] | None = None, seed: int = 42) -> str:  # fmt: skip
    """Everything the ids depend on: data bytes and entries (with no entries, data from Python: the
    `conversations` themselves), the mixing flags and the seed where they draw at random, the data flags, the
    template, the tokenizer."""
    # the entry without its folder: the same data copied elsewhere (another machine's mount) is the same data, and a
    # checkpoint's fingerprint holds this key (lorakit.resume)
    datasets = [[s.name, repr(dataclasses.replace(s, path=Path(s.path.name))), _file_digest(s.path)]
                + _reader_versions(s) for s in specs]  # fmt: skip
    draws = len(specs) > 1 and config.mix_strategy != "concat" and bool(config.interleave_probs)
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
        "mixture": seed if draws else None,
        # the name, what it writes on the probes, and its jinja (--template auto's is the tokenizer's chat_template,
        # which an edit can change beyond what the probes show)
        "template": [
            template.name,
            [[[s.text, s.trained] for s in template.render(p)] for p in PROBES],
            template.chat_template_jinja(),
        ],  # fmt: skip
        "tokenizer": _tokenizer_digest(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / META).read_text())
    except (FileNotFoundError, NotADirectoryError):  # not built yet; a cache root that is a file: `ready` says so
        return None


def ready(source: DataSource, config: DataConfig, tokenizer: Any, template: Template, builds: bool, seed: int,
          what: str) -> DataSource:  # fmt: skip
    """The source with its cache built (by this process when `builds`, local rank 0) or waited for, and checked
    (lorakit.data.checks) whether it was built now or before."""
    folder = cache_folder(config, source.key)
    cached = read_meta(folder) is not None and not config.overwrite_cache
    if not cached and builds:
        check_output_dir_writable(str(folder.parent), "--data_cache_dir")  # a cache built before may be read-only
        build(source.specs, source.conversations, config, tokenizer, template, seed, what, folder)
    meta = read_meta(folder) if cached or builds else _wait_for(folder)
    assert meta is not None  # built above, or waited for
    meta = _with_distinct_records(folder, meta)
    check_data(meta, config, template, what)
    return dataclasses.replace(source, meta=meta, cached=cached)


def _with_distinct_records(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with the count of distinct records that --val_size splits. A cache written before session 8 lacks it,
    and its example count includes interleave_over's repeats, so the check before training would pass a --val_size
    that the split refuses once the process group is up: count it as the build does, from examples.npy (the record
    of each example that trains). Nothing is written: the cache may be read-only or shared."""
    while "distinct_records" not in meta:
        try:
            return {**meta, "distinct_records": len(np.unique(np.load(folder / "examples.npy")))}
        except FileNotFoundError:  # replaced under this rank (--overwrite_cache on local rank 0): read the new one
            time.sleep(POLL_S)
            meta = read_meta(folder) or _wait_for(folder)
    return meta


def _wait_for(folder: Path) -> dict[str, Any]:
    """The cache's meta once local rank 0 has written it (it renames the whole folder into place at once)."""
    waiting = (f"lorakit: waiting {WAIT_S:.0f} s for local rank 0 to write the tokenised cache {folder}; if its log "
               "shows an error or it has stopped, stop this job")  # fmt: skip
    with notice_after(WAIT_S, waiting):
        while (meta := read_meta(folder)) is None:
            time.sleep(POLL_S)
    return meta


def load(folder: Path) -> tuple[TokenizedData, dict[str, Any]]:
    """The cache folder's data (tokens memory-mapped) and meta. A rank that finds the folder replaced under it
    (--overwrite_cache on local rank 0) waits for the new one."""
    while True:
        meta = read_meta(folder) or _wait_for(folder)
        try:
            return load_tokens(folder, meta["truncated"], meta["dropped"]), meta
        except FileNotFoundError:
            time.sleep(POLL_S)
