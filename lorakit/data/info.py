"""`dataset_info.json`: dataset names to data files, formats, columns and tags, resolved against --dataset_dir.

`dataset_info.json` maps a dataset name to `{"file_name": ..., "formatting": ..., "columns": {...}, "tags": {...}}`,
the layout LLaMA-Factory users already have. `file_name` is a `.json`, `.jsonl`, `.csv` or `.parquet` file
(lorakit.data.readers), or a folder of such files, read in name order, all of one type (`.json` and `.jsonl` count
as one type, JSON; names starting with "." are ignored). The formats and what their columns and tags mean:
lorakit.data.records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.readers import FILE_TYPES, file_text
from lorakit.errors import LorakitError

ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": "system",
    "history": "history",
}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_COLUMNS = {"messages": "messages", "system": "system", "tools": "tools"}
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
DEFAULT_COLUMNS = {"alpaca": ALPACA_COLUMNS, "sharegpt": SHAREGPT_COLUMNS}
FORMATS = tuple(DEFAULT_COLUMNS)
TAG = {"system": "system_tag", "user": "user_tag", "assistant": "assistant_tag", "observation": "observation_tag",
       "function_call": "function_tag"}  # fmt: skip


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of dataset_info.json, resolved against --dataset_dir.

    `path` is a data file or a folder of them (`files` lists what is read). `columns` holds every column of the
    format (the entry's over the defaults). `tags` is for sharegpt: every tag, or empty when the entry gives
    neither tags nor columns, so each record is read as ShareGPT or, failing that, OpenAI-style messages.
    """

    name: str
    path: Path
    formatting: str = "alpaca"
    columns: dict[str, str] = field(default_factory=lambda: dict(ALPACA_COLUMNS))
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return data_files(self.path)


# what an entry may hold; file_sha1 (LLaMA-Factory's former checksum) is accepted and unused: lorakit hashes the files
ENTRY_KEYS = {"file_name", "formatting", "columns", "tags", "file_sha1"}


def resolve_datasets(dataset_dir: str, names: tuple[str, ...]) -> list[DatasetSpec]:
    """Look the --dataset names up in dataset_info.json; check that each file exists and is readable."""
    info_path = Path(dataset_dir) / "dataset_info.json"
    if not info_path.is_file():
        raise LorakitError(f"{info_path} not found; --dataset_dir must hold a dataset_info.json naming your data files")
    try:
        info = json.loads(file_text(info_path))
    except json.JSONDecodeError as err:
        raise LorakitError(
            f"{info_path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}"
        ) from None
    if not isinstance(info, dict):
        raise LorakitError(f"{info_path} must be a JSON object mapping dataset names to {{'file_name': ...}}")
    if not names:
        raise LorakitError(f"--dataset is empty; name one or more of {sorted(info)} (defined in {info_path})")
    specs = []
    for name in names:
        if name not in info:
            raise LorakitError(f"dataset '{name}' is not defined in {info_path}; defined names: {sorted(info)}")
        specs.append(_spec(name, info[name], Path(dataset_dir), info_path))
    return specs


def _spec(name: str, entry: Any, dataset_dir: Path, info_path: Path) -> DatasetSpec:
    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
        raise LorakitError(f"dataset '{name}' in {info_path} needs a string 'file_name'")
    where = f"dataset '{name}' in {info_path}"
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:  # e.g. LLaMA-Factory's num_samples, split, ranking or a hub URL: each would change what trains
        hint = " (for num_samples: --max_samples)" if "num_samples" in unknown else ""
        raise LorakitError(f"{where}: {', '.join(unknown)} not supported{hint}; lorakit reads "
                           f"{', '.join(sorted(ENTRY_KEYS - {'file_sha1'}))}: remove the rest")  # fmt: skip
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATS:
        raise LorakitError(f"{where}: formatting '{formatting}' is unsupported; use {FORMATS}")
    columns = _mapping(entry, "columns", DEFAULT_COLUMNS[formatting], where)
    tags = {}
    if formatting == "sharegpt" and ("tags" in entry or "columns" in entry):
        tags = _mapping(entry, "tags", SHAREGPT_TAGS, where)
    elif "tags" in entry:
        raise LorakitError(f"{where}: 'tags' apply to formatting 'sharegpt' only; remove them or set the formatting")
    path = dataset_dir / entry["file_name"]
    if not path.exists():
        raise LorakitError(f"data file {path} for dataset '{name}' not found (file_name in {info_path})")
    data_files(path)
    return DatasetSpec(name, path, formatting, columns, tags)


def _mapping(entry: dict[str, Any], key: str, defaults: dict[str, str], where: str) -> dict[str, str]:
    """The entry's `columns` or `tags` over their defaults; unknown keys and non-string values are errors."""
    given = entry.get(key, {})
    if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
        raise LorakitError(f"{where}: '{key}' must be an object of strings, like {json.dumps(defaults)}")
    unknown = set(given) - set(defaults)
    if unknown:
        raise LorakitError(f"{where}: unknown {key} {sorted(unknown)}; use {list(defaults)}")
    return {**defaults, **given}


def data_files(path: Path) -> list[Path]:
    """The files a dataset reads: `path` itself, or a folder's files in name order, all of one type."""
    if not path.is_dir():
        if path.suffix not in FILE_TYPES:
            raise LorakitError(f"data file {path} has type '{path.suffix}'; lorakit reads {', '.join(FILE_TYPES)}")
        return [path]
    files = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    others = [p.name for p in files if not p.is_file() or p.suffix not in FILE_TYPES]
    if others:
        raise LorakitError(
            f"data folder {path} holds {others}, which lorakit cannot read; it reads {', '.join(FILE_TYPES)} files: "
            "move the others out"
        )
    if not files:
        raise LorakitError(f"data folder {path} is empty; put {', '.join(FILE_TYPES)} files in it")
    types = sorted({FILE_TYPES[p.suffix] for p in files})
    if len(types) > 1:
        raise LorakitError(
            f"data folder {path} mixes file types ({', '.join(types)}); keep one type per folder and make a "
            "dataset_info.json entry for each"
        )
    return files
