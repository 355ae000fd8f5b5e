"""Records to ids and labels on every core: data files as Arrow tables, tokenised with `datasets.Dataset.map`.

Each data file becomes an Arrow file of raw rows. A JSON Lines file's lines are read by pyarrow's multithreaded
reader as they are, and parsed in the workers; any other file (a JSON list, CSV, Parquet) is parsed whole by
lorakit.data.readers in the build's process, and its rows point at the records held there: the workers are forked
from that process after reading, so they find the records (Python's own values, so the ids are those of the
reference path whatever a record holds) without copying them. `Dataset.map(batched=True, num_proc=N)` then turns
rows into conversations, renders and tokenises them in N processes, each writing its share of the result to Arrow
files. A record's problem does not stop a worker: it is kept, with the stage it came from, and the first one in
reading order (file by file: a line that is not JSON, then a record that is not an object, then a record's
fields) is the one-line error, the same one the reference path raises (lorakit.data.records).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lorakit.config import DataConfig
from lorakit.data.encode import IGNORE_INDEX, Rendered, encode_rendered, render_for_encoding
from lorakit.data.info import DatasetSpec
from lorakit.data.readers import (
    check_not_wrapped,
    is_json_lines,
    json_lines,
    json_lines_column,
    not_an_object,
    parse_line,
    read_records,
)
from lorakit.data.records import record_messages
from lorakit.data.system_prompt import with_system
from lorakit.errors import LorakitError
from lorakit.templates import Message, Template
from lorakit.templates.tools import has_tools

LINE, LOADED, CONVERSATION = 0, 1, 2  # a raw row: a JSON line's text; a record or conversation held in memory
NOT_JSON, NOT_OBJECT, BAD_RECORD = 0, 1, 2  # the stages a record's error comes from, in the order they are raised
ROWS_PER_WORKER = 256  # fewer rows than this per process: starting the process costs more than it saves
RAW_SCHEMA = pa.schema(
    [
        ("record", pa.large_string()),  # a JSON line (LINE rows; null for the others)
        ("kind", pa.int8()),  # LINE, LOADED or CONVERSATION
        ("file", pa.int32()),  # in the build's list of files (-1: data from Python)
        ("dataset", pa.int32()),  # in --dataset order
        ("index", pa.int64()),  # the record's index in its dataset ("record 12" in errors)
        ("file_index", pa.int64()),  # ... and in its file ("record 3 is a list"; where a LOADED record is)
        ("line", pa.int64()),  # a JSON line's number
        ("use", pa.bool_()),  # within --max_samples (the rest of a file is checked, as the whole file is read)
    ]
)
# Records parsed whole (a JSON list, CSV, Parquet; data from Python: -1), by file: the worker processes are forked
# from the build's process after they are read, so they find them here without copying them through a file.
LOADED_RECORDS: dict[int, list[Any]] = {}


def _write(columns: dict[str, Any], path: Path) -> Path:
    table = pa.Table.from_pydict(columns, schema=RAW_SCHEMA)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, RAW_SCHEMA) as writer:
        writer.write_table(table, max_chunksize=10_000)
    return path


def _lines(path: Path, spec: DatasetSpec) -> tuple[pa.Array, np.ndarray]:
    """A JSON Lines file's non-blank lines (an Arrow column, unparsed) and their numbers."""
    column = json_lines_column(path)
    if column is None:  # lorakit.data.readers: where pyarrow's reader could split otherwise, or to say what is wrong
        lines = json_lines(path) or []
        text, numbers = pa.array([line for _, line in lines], pa.large_string()), [n for n, _ in lines]
    else:  # a line is blank as str.strip() says: only lines not starting with "{" can be, and are looked at here
        maybe = np.flatnonzero(_first_bytes(column) != ord("{"))
        blank = np.zeros(len(column), bool)
        blank[maybe] = [not line.strip() for line in column.take(pa.array(maybe)).to_pylist()]
        text, numbers = column.filter(pa.array(~blank)), np.flatnonzero(~blank) + 1
    if path.suffix == ".json" and len(text) == 1:  # one record in a .json file may be a wrapped list
        check_not_wrapped(path, [parse_line(path, int(numbers[0]), text[0].as_py())], spec.columns)
    return text, np.asarray(numbers, np.int64)


def _first_bytes(column: pa.Array) -> np.ndarray:
    """Each line's first byte (0 for an empty line), from the column's buffers (a line holds no NUL bytes)."""
    _, offsets, values = column.buffers()
    starts = np.frombuffer(offsets, np.int64, len(column) + 1, column.offset * 8)
    data = np.frombuffer(values, np.uint8) if values is not None and values.size else np.zeros(1, np.uint8)
    return np.where(np.diff(starts) > 0, data[np.minimum(starts[:-1], len(data) - 1)], 0)


def _raw_file(path: Path, spec: DatasetSpec, ids: tuple[int, int], start: int, limit: int | None) -> dict[str, Any]:
    """A data file's records as raw rows; `ids` = (file, dataset), `start` = the dataset's index of its first."""
    if is_json_lines(path):
        text, numbers = _lines(path, spec)
        count, kind = len(text), LINE
    else:
        records = read_records(path)
        check_not_wrapped(path, records, spec.columns)
        LOADED_RECORDS[ids[0]] = records
        count, kind, numbers = len(records), LOADED, np.zeros(len(records), np.int64)
        text = pa.nulls(count, pa.large_string())
    index = np.arange(start, start + count, dtype=np.int64)
    use = index < limit if limit is not None else np.ones(count, bool)
    return {"record": text, "kind": np.full(count, kind, np.int8), "file": np.full(count, ids[0], np.int32),
            "dataset": np.full(count, ids[1], np.int32), "index": index, "file_index": index - start,
            "line": numbers, "use": use}  # fmt: skip


def raw_files(specs: Sequence[DatasetSpec], max_samples: int | None,
              work: Path) -> tuple[list[Path], list[Path], str | None]:  # fmt: skip
    """Every file of every dataset (at most max_samples records of each) as Arrow files in `work`: (the data files
    read, the Arrow files, the first file's reading error or None; the files after it are not read)."""
    files: list[Path] = []
    arrows: list[Path] = []
    for dataset, spec in enumerate(specs):
        start = 0
        for path in spec.files:
            if max_samples is not None and start >= max_samples:
                break
            files.append(path)
            try:
                columns = _raw_file(path, spec, (len(files) - 1, dataset), start, max_samples)
            except LorakitError as err:
                return files, arrows, str(err)
            start += len(columns["index"])
            arrows.append(_write(columns, work / f"raw-{len(files) - 1}.arrow"))
    return files, arrows, None


def raw_conversations(conversations: Sequence[list[Message]], work: Path) -> list[Path]:
    """Data from Python (read and checked by lorakit.data.inmemory) as raw rows."""
    count = len(conversations)
    LOADED_RECORDS[-1] = list(conversations)
    index = np.arange(count, dtype=np.int64)
    columns = {"record": pa.nulls(count, pa.large_string()), "kind": np.full(count, CONVERSATION, np.int8),
               "file": np.full(count, -1, np.int32), "dataset": np.zeros(count, np.int32), "index": index,
               "file_index": index, "line": np.zeros(count, np.int64), "use": np.ones(count, bool)}  # fmt: skip
    return [_write(columns, work / "raw-python.arrow")]


_FORKED: dict[int, Encoder] = {}  # the encoders a forked worker finds in the memory it was forked with


def _forked_encoder(key: int) -> Encoder:
    return _FORKED[key]


class _RowError(Exception):
    def __init__(self, message: str, stage: int) -> None:
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True)
class Encoder:
    """The function `Dataset.map` runs on each batch of raw rows, in each worker. The workers are forked from the
    process that made it, so they hold it already: it pickles as a reference (pickling a large tokenizer takes a
    second or two per worker)."""

    specs: tuple[DatasetSpec, ...]
    files: tuple[Path, ...]
    template: Template
    tokenizer: Any
    config: DataConfig

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return _forked_encoder, (id(self),)  # registered in _FORKED by `tokenise` before the workers fork

    def where(self, row: dict[str, Any]) -> str:
        """The record a row came from, as the errors name it."""
        if row["kind"] == CONVERSATION:
            return f"the in-memory data's record {row['index']}"
        return f"{self.files[row['file']]} record {row['index']}"

    def conversation(self, row: dict[str, Any]) -> list[Message] | None:
        """The row's conversation (None: a record past --max_samples, only checked); raises _RowError."""
        if row["kind"] == CONVERSATION:
            return LOADED_RECORDS[-1][row["index"]]
        path = self.files[row["file"]]
        if row["kind"] == LINE:
            try:
                record = parse_line(path, row["line"], row["record"])
            except LorakitError as err:
                raise _RowError(str(err), NOT_JSON) from None
            if not isinstance(record, dict):
                raise _RowError(not_an_object(path, row["file_index"], record), NOT_OBJECT)
        else:
            record = LOADED_RECORDS[row["file"]][row["file_index"]]
        if not row["use"]:
            return None
        try:
            return record_messages(self.specs[row["dataset"]], record, f"{path} record {row['index']}")
        except LorakitError as err:
            raise _RowError(str(err), BAD_RECORD) from None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["record", "kind", "file", "dataset", "index", "file_index", "line", "use"]).to_pylist()
        config, renders_tools = self.config, getattr(self.template, "renders_tools", False)
        errors: list[str | None] = [None] * len(rows)
        stages, tools = np.zeros(len(rows), np.int8), np.zeros(len(rows), bool)
        todo: list[tuple[int, list[Message], Rendered]] = []
        for position, row in enumerate(rows):
            try:
                conversation = self.conversation(row)
                if conversation is None:
                    continue
                conversation = with_system(conversation, config.system, config.default_system)
                tools[position] = has_tools(conversation)
                if not tools[position] or renders_tools:  # tool data for another template: refused after the map
                    todo.append((position, conversation, render_for_encoding(
                        conversation, self.template, config.mask_history, config.train_on_prompt)))  # fmt: skip
            except _RowError as err:
                errors[position], stages[position] = str(err), err.stage
            except LorakitError as err:  # the template's own checks on a conversation
                errors[position], stages[position] = f"{self.where(row)}: {err}", BAD_RECORD
        encoded = encode_rendered([c for _, c, _ in todo], [r for _, _, r in todo], self.template, self.tokenizer,
                                  config.cutoff_len, config.train_on_prompt, config.mask_history)  # fmt: skip
        return _tokens_table(batch, [p for p, _, _ in todo], encoded, errors, stages, tools)


def _tokens_table(batch: pa.Table, positions: list[int], encoded: list[tuple[np.ndarray, np.ndarray, bool]],
                  errors: list[str | None], stages: np.ndarray, tools: np.ndarray) -> pa.Table:  # fmt: skip
    count = batch.num_rows
    lengths, truncated, targets = np.zeros(count, np.int32), np.zeros(count, bool), np.zeros(count, np.int32)
    for position, (ids, labels, cut) in zip(positions, encoded):
        lengths[position], truncated[position] = len(ids), cut
        targets[position] = int(np.count_nonzero(labels[1:] != IGNORE_INDEX))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))
    empty = np.zeros(0, np.int32)
    ids = pa.array(np.concatenate([e[0] for e in encoded] or [empty]))
    labels = pa.array(np.concatenate([e[1] for e in encoded] or [empty]))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, ids),
                     "labels": pa.ListArray.from_arrays(offsets, labels), "truncated": truncated, "targets": targets,
                     "tools": tools, "error": pa.array(errors, pa.string()), "stage": stages,
                     "file": batch.column("file"), "dataset": batch.column("dataset"),
                     "use": batch.column("use")})  # fmt: skip


def tokenise(arrows: list[Path], encoder: Encoder, workers: int, work: Path) -> Any:
    """The raw rows of `arrows` tokenised by `workers` processes (fewer for little data): a datasets.Dataset over
    Arrow files in `work`, one row per raw row (past --max_samples and bad rows: no tokens); None for no rows."""
    import datasets
    import multiprocess  # datasets' process pools

    raw = datasets.concatenate_datasets([datasets.Dataset.from_file(str(path)) for path in arrows])
    if not len(raw):
        return None
    num_proc = max(1, min(workers, len(raw) // ROWS_PER_WORKER))
    multiprocess.set_start_method("fork", force=True)  # the workers inherit the encoder (this is lorakit's own process)
    _FORKED[id(encoder)] = encoder
    return raw.with_format("arrow").map(
        encoder,
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=raw.column_names,
        cache_file_name=str(work / "tokens.arrow"),
        new_fingerprint=hashlib.sha256(str(work).encode()).hexdigest()[:32],  # lorakit keys its own cache
        load_from_cache_file=False,
    )
