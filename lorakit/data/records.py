"""Records to conversations: the alpaca and sharegpt formats (`formatting` in dataset_info.json, lorakit.data.info).

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

Every problem is reported with the file and record index, never skipped silently; in a folder, record indexes count
on across its files. Training reads records through the Arrow path (lorakit.data.arrow); `load_datasets` here
reads them whole in this process, for `lorakit preview` and as the reference the Arrow path is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lorakit.data.info import (
    ALPACA_COLUMNS,
    FORMATS,
    OPENAI_COLUMNS,
    OPENAI_TAGS,
    SHAREGPT_COLUMNS,
    SHAREGPT_TAGS,
    TAG,
    DatasetSpec,
    data_files,
    resolve_datasets,
)
from lorakit.data.readers import FILE_TYPES, check_not_wrapped, read_records
from lorakit.data.tool_records import function_call_text, tools_message
from lorakit.errors import LorakitError
from lorakit.templates import Message
from lorakit.templates.base import SIDES  # the tool turns stand where the user's and the assistant's do

__all__ = [  # the names of dataset_info.json and the readers, as this module offered them before it was split
    "ALPACA_COLUMNS", "FILE_TYPES", "FORMATS", "OPENAI_COLUMNS", "OPENAI_TAGS", "SHAREGPT_COLUMNS", "SHAREGPT_TAGS",
    "DatasetSpec", "alpaca_messages", "data_files", "load_conversations", "load_datasets", "load_records",
    "read_records",
    "record_messages", "resolve_datasets", "sharegpt_layout", "sharegpt_messages",
]  # fmt: skip


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
    if text is None and item.get("tool_calls"):  # OpenAI's calls: not a layout lorakit reads (null content)
        call = '{"name": ..., "arguments": {...}}'
        raise LorakitError(
            f"{where}: message {position} has OpenAI 'tool_calls', which lorakit does not read; write each call as a "
            f"'{tags['function_tag']}' message whose text is the JSON {call}"
        )
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        got = f"no '{content_key}' field" if content_key not in item else f"a {kind} '{content_key}'"
        raise LorakitError(f"{where}: message {position} has {got}; each message needs its text as a string")
    return roles[role], text


def _optional_string(record: dict[str, Any], key: str, where: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise LorakitError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def record_messages(spec: DatasetSpec, record: dict[str, Any], where: str) -> list[Message]:
    """One record of `spec`'s dataset as a conversation, in the dataset's format."""
    if spec.formatting == "alpaca":
        return alpaca_messages(record, spec.columns, where)
    if spec.tags:
        return sharegpt_messages(record, spec.columns, spec.tags, where)
    return sharegpt_messages(record, *sharegpt_layout(record), where)


def _dataset_records(spec: DatasetSpec, max_samples: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for the first max_samples records of a dataset; indexes count on across a folder's files."""
    index = 0
    for path in spec.files:
        if max_samples is not None and index >= max_samples:
            return
        records = read_records(path)
        check_not_wrapped(path, records, spec.columns)
        for record in records:
            if max_samples is not None and index >= max_samples:
                return
            yield f"{path} record {index}", record
            index += 1


def load_records(specs: list[DatasetSpec], max_samples: int | None) -> list[list[tuple[str, list[Message]]]]:
    """Each dataset's (file and record index, conversation) pairs, in --dataset order, at most max_samples of each."""
    return [[(where, record_messages(spec, record, where)) for where, record in _dataset_records(spec, max_samples)]
            for spec in specs]  # fmt: skip


def load_datasets(specs: list[DatasetSpec], max_samples: int | None) -> list[list[list[Message]]]:
    """Each dataset's conversations, in --dataset order, at most max_samples of each (lorakit.data.mixing mixes)."""
    return [[conversation for _, conversation in dataset] for dataset in load_records(specs, max_samples)]


def load_conversations(specs: list[DatasetSpec], max_samples: int | None) -> list[list[Message]]:
    """Every dataset's conversations, concatenated in --dataset order; at most max_samples from each."""
    conversations = [conversation for dataset in load_datasets(specs, max_samples) for conversation in dataset]
    if not conversations:
        raise LorakitError(f"no examples left: the data files of {[s.name for s in specs]} hold no records")
    return conversations
