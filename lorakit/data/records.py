"""Records on disk to conversations: `dataset_info.json`, JSON/JSONL files, the alpaca format.

`dataset_info.json` maps a dataset name to `{"file_name": ..., "formatting": "alpaca", "columns": {...}}`, the
layout LLaMA-Factory users already have. Alpaca meaning: the user turn is `instruction`, plus "\\n" + `input`
when `input` is non-empty; `system` is an optional system prompt; `history` is an optional list of earlier
`[user, assistant]` pairs. Every problem is reported with the file and record index, never skipped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.templates import Message

ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": "system",
    "history": "history",
}
FORMATS = ("alpaca",)
FILE_TYPES = (".json", ".jsonl")


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of dataset_info.json, resolved against --dataset_dir."""

    name: str
    path: Path
    formatting: str = "alpaca"
    columns: dict[str, str] = field(default_factory=lambda: dict(ALPACA_COLUMNS))


def resolve_datasets(dataset_dir: str, names: tuple[str, ...]) -> list[DatasetSpec]:
    """Look the --dataset names up in dataset_info.json; check that each file exists and is readable."""
    info_path = Path(dataset_dir) / "dataset_info.json"
    if not info_path.is_file():
        raise LorakitError(f"{info_path} not found; --dataset_dir must hold a dataset_info.json naming your data files")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
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
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATS:
        raise LorakitError(f"dataset '{name}' in {info_path}: formatting '{formatting}' is unsupported; use {FORMATS}")
    columns = entry.get("columns", {})
    unknown = set(columns) - set(ALPACA_COLUMNS)
    if not isinstance(columns, dict) or unknown:
        raise LorakitError(
            f"dataset '{name}' in {info_path}: unknown columns {sorted(unknown)}; use {list(ALPACA_COLUMNS)}"
        )
    path = dataset_dir / entry["file_name"]
    if not path.is_file():
        raise LorakitError(f"data file {path} for dataset '{name}' not found (file_name in {info_path})")
    if path.suffix not in FILE_TYPES:
        raise LorakitError(f"data file {path} has type '{path.suffix}'; lorakit reads {', '.join(FILE_TYPES)}")
    return DatasetSpec(name, path, formatting, {**ALPACA_COLUMNS, **columns})


def read_records(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or JSON Lines (one object per line)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise LorakitError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    else:
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise LorakitError(f"{path} line {line_number} is not valid JSON: {err.msg}") from None
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise LorakitError(f"{path} record {index} is a {type(record).__name__}, not an object")
    return records


def alpaca_messages(record: dict[str, Any], columns: dict[str, str], where: str) -> list[Message]:
    """One alpaca record as a conversation; `where` (file and record index) goes into every error."""

    def text(column: str, required: bool) -> str | None:
        key = columns[column]
        value = record.get(key)
        if value is None and not required:
            return None
        if value is None:
            raise LorakitError(f"{where} has no '{key}' field (the {column} column); every record needs one")
        if not isinstance(value, str):
            raise LorakitError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
        return value

    prompt, query, response = text("prompt", True), text("query", False), text("response", True)
    system = text("system", False)
    messages = [Message("system", system)] if system else []
    history = record.get(columns["history"]) or []
    if not isinstance(history, list):
        raise LorakitError(f"{where}: field '{columns['history']}' must be a list of [user, assistant] pairs")
    for turn, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise LorakitError(f"{where}: history turn {turn} must be a [user, assistant] pair of strings")
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    user = f"{prompt}\n{query}" if query else prompt
    return messages + [Message("user", user), Message("assistant", response)]


def load_conversations(specs: list[DatasetSpec], max_samples: int | None) -> list[list[Message]]:
    """Every dataset's conversations, concatenated in --dataset order; at most max_samples from each."""
    conversations = []
    for spec in specs:
        records = read_records(spec.path)[:max_samples]
        conversations += [alpaca_messages(r, spec.columns, f"{spec.path} record {i}") for i, r in enumerate(records)]
    if not conversations:
        raise LorakitError(f"no examples left: the data files of {[s.name for s in specs]} hold no records")
    return conversations
