"""Records on disk to conversations: `dataset_info.json`, data files and folders, the alpaca and sharegpt formats.

`dataset_info.json` maps a dataset name to `{"file_name": ..., "formatting": ..., "columns": {...}, "tags": {...}}`,
the layout LLaMA-Factory users already have. Every problem is reported with the file and record index, never
skipped silently.

Files: `file_name` is a `.json` file (a JSON list of objects, or JSON Lines), `.jsonl`, `.csv` (a header row; every
value is a string, an empty cell is "") or `.parquet`; or a folder of such files, read in name order, all of one
type (`.json` and `.jsonl` count as one type, JSON; names starting with "." are ignored). In a folder, record
indexes count on across the files, and each error names the file the record is in.

`formatting: alpaca` (the default): the user turn is `instruction`, plus "\\n" + `input` when `input` is non-empty;
`system` is an optional system prompt; `history` is an optional list of earlier `[user, assistant]` pairs.
`columns` renames them: prompt, query, response, system, history.

`formatting: sharegpt`: each record holds a list of messages (`columns.messages`, default "conversations"), each
an object with a role (`tags.role_tag`, default "from") and text (`tags.content_tag`, default "value"). Roles are
`tags.user_tag` ("human"), `tags.assistant_tag` ("gpt") and `tags.system_tag` ("system"). An optional system
message comes first; otherwise the system prompt is the record's `columns.system` field (default "system"), if
any. The turns then alternate user, assistant, ... and end with the assistant. OpenAI-style messages are the same
with tags `{"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
"system_tag": "system"}` and columns `{"messages": "messages"}`. A sharegpt entry with neither `tags` nor `columns`
takes a record without a "conversations" field whose "messages" list holds `{"role", "content"}` objects as
OpenAI-style, with no configuration. Tool-calling records (`function_call` and `observation` turns, a `tools`
column): lorakit.data.tool_records.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.tool_records import function_call_text, tools_message
from lorakit.errors import LorakitError
from lorakit.templates import Message
from lorakit.templates.base import SIDES  # the tool turns stand where the user's and the assistant's do

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
FILE_TYPES = {".json": "JSON", ".jsonl": "JSON", ".csv": "CSV", ".parquet": "Parquet"}


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


def resolve_datasets(dataset_dir: str, names: tuple[str, ...]) -> list[DatasetSpec]:
    """Look the --dataset names up in dataset_info.json; check that each file exists and is readable."""
    info_path = Path(dataset_dir) / "dataset_info.json"
    if not info_path.is_file():
        raise LorakitError(f"{info_path} not found; --dataset_dir must hold a dataset_info.json naming your data files")
    try:
        info = json.loads(_text(info_path))
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


def read_records(path: Path) -> list[dict[str, Any]]:
    """One data file's records: a JSON list of objects or JSON Lines, CSV rows, or Parquet rows."""
    readers: dict[str, Callable[[Path], list[Any]]] = {".csv": _read_csv, ".parquet": _read_parquet}
    records = readers.get(path.suffix, _read_json)(path)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise LorakitError(f"{path} record {index} is a {type(record).__name__}, not an object")
    return records


def _text(path: Path) -> str:
    """The file as text; a UTF-8 byte-order mark (as Windows editors write) is accepted and dropped."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise LorakitError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def _read_json(path: Path) -> list[Any]:
    text = _text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise LorakitError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    if path.suffix == ".json" and text.lstrip().startswith("{"):
        _reject_wrapped_list(path, text)
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LorakitError(f"{path} line {line_number} is not valid JSON: {err.msg}") from None
    return records


WRAPPED = "lorakit reads a JSON list of records ([{...}, ...]) or JSON Lines: write the list itself at the top level"


def _reject_wrapped_list(path: Path, text: str) -> None:
    """A .json file that is one object spread over lines (`{"data": [...]}` pretty-printed) is an error naming the
    shape expected; on one line it may be a JSON Lines record, judged against the columns (_dataset_records)."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return  # JSON Lines (or a bad line, reported below)
    if len([line for line in text.splitlines() if line.strip()]) > 1:
        lists = [key for key, value in whole.items() if isinstance(value, list)] if isinstance(whole, dict) else []
        inside = f"an object with the list under '{lists[0]}'" if lists else "one JSON object over several lines"
        raise LorakitError(f"{path} holds {inside}; {WRAPPED}")


def _check_not_wrapped(path: Path, records: list[dict[str, Any]], spec: DatasetSpec) -> None:
    """One record that has none of the dataset's columns but a list of objects is a wrapped list, not a record."""
    if path.suffix != ".json" or len(records) != 1 or set(records[0]) & {*spec.columns.values(), "messages"}:
        return
    lists = [k for k, v in records[0].items() if isinstance(v, list) and v and all(isinstance(i, dict) for i in v)]
    if lists:
        raise LorakitError(f"{path} holds an object with the list under '{lists[0]}'; {WRAPPED}")


def _read_csv(path: Path) -> list[Any]:
    """Rows as {header: string}; an empty cell is "". A BOM (as Excel writes) is not part of the first header."""
    limit = csv.field_size_limit(2**31 - 1)  # the default, 128 KiB, is short for long documents
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, restval="")
            rows = list(reader)
    except UnicodeDecodeError as err:
        raise LorakitError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except csv.Error as err:
        raise LorakitError(f"{path} line {reader.line_num} is not valid CSV: {err}") from None
    finally:
        csv.field_size_limit(limit)
    for index, row in enumerate(rows):
        if None in row:
            raise LorakitError(f"{path} record {index} has more cells than the header row; quote cells with commas")
    return rows


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        raise LorakitError(f"{path} is not a readable Parquet file: {err}") from None


def _dataset_records(spec: DatasetSpec, max_samples: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for the first max_samples records of a dataset; indexes count on across a folder's files."""
    index = 0
    for path in spec.files:
        if max_samples is not None and index >= max_samples:
            return
        records = read_records(path)
        _check_not_wrapped(path, records, spec)
        for record in records:
            if max_samples is not None and index >= max_samples:
                return
            yield f"{path} record {index}", record
            index += 1


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


def sharegpt_layout(record: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Columns and tags for a record of a sharegpt entry without tags or columns: ShareGPT, or OpenAI-style."""
    messages = record.get("messages")
    if SHAREGPT_COLUMNS["messages"] not in record and isinstance(messages, list):
        if messages and isinstance(messages[0], dict) and "role" in messages[0]:
            return OPENAI_COLUMNS, OPENAI_TAGS
    return SHAREGPT_COLUMNS, SHAREGPT_TAGS


def sharegpt_messages(
    record: dict[str, Any], columns: dict[str, str], tags: dict[str, str], where: str
) -> list[Message]:
    """One sharegpt record as a conversation: [system,] user, assistant, ... ending with the assistant."""
    key = columns["messages"]
    items = record.get(key)
    if items is None:
        raise LorakitError(
            f"{where} has no '{key}' field (the messages column); name the field holding the messages with "
            "'columns': {'messages': ...} in dataset_info.json"
        )
    if not isinstance(items, list):
        raise LorakitError(f"{where}: field '{key}' must be a list of messages, got {type(items).__name__}")
    turns = [_role_and_text(item, position, tags, where) for position, item in enumerate(items)]
    system = _optional_string(record, columns["system"], where)
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    offset = len(items) - len(turns)
    user, assistant = tags["user_tag"], tags["assistant_tag"]
    rule = f"ShareGPT turns must alternate {user}, {assistant}, ... and end with {assistant}"
    if not turns:
        raise LorakitError(f"{where}: '{key}' holds no {user}/{assistant} turns; {rule}")
    for position, (role, _) in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if SIDES.get(role, role) != expected:  # a system message past the first is out of place
            raise LorakitError(
                f"{where}: message {position + offset} has role '{tags[TAG[role]]}' where "
                f"'{tags[TAG[expected]]}' was expected; {rule}"
            )
    if len(turns) % 2:
        last = tags[TAG[turns[-1][0]]]
        raise LorakitError(f"{where}: the last message ({len(items) - 1}) has role '{last}'; {rule}")
    tools = tools_message(record.get(columns["tools"]), where)
    head = ([Message("system", system)] if system else []) + ([tools] if tools else [])
    return head + [_message(role, text, where, position + offset) for position, (role, text) in enumerate(turns)]


def _message(role: str, text: str, where: str, position: int) -> Message:
    return Message(role, function_call_text(text, where, position) if role == "function_call" else text)


def _role_and_text(item: Any, position: int, tags: dict[str, str], where: str) -> tuple[str, str]:
    """A message as (lorakit role, text); the role is one of system, user, assistant."""
    role_key, content_key = tags["role_tag"], tags["content_tag"]
    if not isinstance(item, dict):
        raise LorakitError(
            f"{where}: message {position} must be an object with '{role_key}' and '{content_key}', "
            f"got {type(item).__name__}"
        )
    roles = {tags[key]: role for role, key in TAG.items() if key in tags}
    role = item.get(role_key)
    if not isinstance(role, str) or role not in roles:
        found = f"role '{role}'" if isinstance(role, str) else f"no '{role_key}' string"
        raise LorakitError(
            f"{where}: message {position} has {found}; roles are {', '.join(roles)} (map yours with 'tags' in "
            "dataset_info.json)"
        )
    text = item.get(content_key)
    if not isinstance(text, str):
        got = f"no '{content_key}' field" if text is None else f"a {type(text).__name__} '{content_key}'"
        raise LorakitError(f"{where}: message {position} has {got}; each message needs its text as a string")
    return roles[role], text


def _optional_string(record: dict[str, Any], key: str, where: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise LorakitError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _to_messages(spec: DatasetSpec) -> Callable[[dict[str, Any], str], list[Message]]:
    if spec.formatting == "alpaca":
        return lambda record, where: alpaca_messages(record, spec.columns, where)
    if spec.tags:
        return lambda record, where: sharegpt_messages(record, spec.columns, spec.tags, where)
    return lambda record, where: sharegpt_messages(record, *sharegpt_layout(record), where)


def load_datasets(specs: list[DatasetSpec], max_samples: int | None) -> list[list[list[Message]]]:
    """Each dataset's conversations, in --dataset order, at most max_samples of each (lorakit.data.mixing mixes)."""
    readers = [(_to_messages(spec), _dataset_records(spec, max_samples)) for spec in specs]
    return [[to_messages(record, where) for where, record in records] for to_messages, records in readers]


def load_conversations(specs: list[DatasetSpec], max_samples: int | None) -> list[list[Message]]:
    """Every dataset's conversations, concatenated in --dataset order; at most max_samples from each."""
    conversations = [conversation for dataset in load_datasets(specs, max_samples) for conversation in dataset]
    if not conversations:
        raise LorakitError(f"no examples left: the data files of {[s.name for s in specs]} hold no records")
    return conversations
