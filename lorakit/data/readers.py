"""Data files to records: a JSON list of objects or JSON Lines (`.json`, `.jsonl`), CSV rows, Parquet rows.

Every problem is one line naming the file and the line or record, never skipped silently. `.json` is a JSON list
when its text starts with "[", otherwise JSON Lines (a pretty-printed object wrapping the list is an error naming
the key). CSV: a header row; every value is a string, an empty cell is "". A UTF-8 byte-order mark (as Windows
editors and Excel write) is accepted and dropped. Parquet: a null value is a missing key, at any depth (Arrow gives
every row every key of its column's type; `without_nulls`).

`read_records` parses a whole file (the reference path, `lorakit preview`); the Arrow path (lorakit.data.arrow)
takes JSON Lines as `json_lines` gives them, unparsed, and parses them in its worker processes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

FILE_TYPES = {".json": "JSON", ".jsonl": "JSON", ".csv": "CSV", ".parquet": "Parquet"}
WRAPPED = "lorakit reads a JSON list of records ([{...}, ...]) or JSON Lines: write the list itself at the top level"


def read_records(path: Path) -> list[dict[str, Any]]:
    """One data file's records: a JSON list of objects or JSON Lines, CSV rows, or Parquet rows."""
    readers: dict[str, Callable[[Path], list[Any]]] = {".csv": _read_csv, ".parquet": _read_parquet}
    records = readers.get(path.suffix, _read_json)(path)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise LorakitError(not_an_object(path, index, record))
    return records


def not_an_object(path: Path, index: int, record: Any) -> str:
    return f"{path} record {index} is a {type(record).__name__}, not an object"


def file_text(path: Path) -> str:
    """The file as text; a UTF-8 byte-order mark (as Windows editors write) is accepted and dropped."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise LorakitError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def json_lines(path: Path) -> list[tuple[int, str]] | None:
    """A JSON Lines file's non-blank lines with their 1-based numbers, unparsed; None for a JSON list (read those,
    and CSV and Parquet files, with `read_records`)."""
    if path.suffix not in (".json", ".jsonl"):
        return None
    text = file_text(path)
    return None if _is_list(path, text) else _lines(path, text)


# Where str.splitlines breaks a line and pyarrow's reader does not (and \x1f, the reader's delimiter below)
SPLITLINES_ONLY = (b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x1f", b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9")


def json_lines_column(path: Path) -> Any:
    """A JSON Lines file's lines, blank ones included, as one Arrow string column read by pyarrow's multithreaded
    CSV reader (one column, no quoting): line i is row i - 1, exactly as `json_lines` numbers them. None where the
    two could differ (a line separator only str.splitlines knows, text that is not UTF-8, an empty file): then
    `json_lines` reads the file (and reports what is wrong)."""
    import pyarrow
    import pyarrow.csv

    data = path.read_bytes()
    if not data or any(separator in data for separator in SPLITLINES_ONLY):
        return None
    try:
        table = pyarrow.csv.read_csv(
            pyarrow.py_buffer(data),
            read_options=pyarrow.csv.ReadOptions(column_names=["line"], block_size=1 << 26),
            parse_options=pyarrow.csv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False,
                                                   newlines_in_values=False, ignore_empty_lines=False),
            convert_options=pyarrow.csv.ConvertOptions(column_types={"line": pyarrow.large_string()},
                                                       strings_can_be_null=False, quoted_strings_can_be_null=False),
        )  # fmt: skip
    except pyarrow.ArrowInvalid:
        return None
    return table.column("line").combine_chunks()


def is_json_lines(path: Path) -> bool:
    """Whether the file is JSON Lines (a .jsonl, or a .json that is not a JSON list: one wrapping the list in an
    object is an error here)."""
    if path.suffix != ".json":
        return path.suffix == ".jsonl"
    text = file_text(path)
    if _is_list(path, text):
        return False
    if text.lstrip().startswith("{"):
        _reject_wrapped_list(path, text)
    return True


def parse_line(path: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise LorakitError(f"{path} line {number} is not valid JSON: {err.msg}") from None


def _is_list(path: Path, text: str) -> bool:
    return path.suffix == ".json" and text.lstrip().startswith("[")


def _lines(path: Path, text: str) -> list[tuple[int, str]]:
    if path.suffix == ".json" and text.lstrip().startswith("{"):
        _reject_wrapped_list(path, text)
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _read_json(path: Path) -> list[Any]:
    text = file_text(path)
    if _is_list(path, text):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise LorakitError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    return [parse_line(path, number, line) for number, line in _lines(path, text)]


def _reject_wrapped_list(path: Path, text: str) -> None:
    """A .json file that is one object spread over lines (`{"data": [...]}` pretty-printed) is an error naming the
    shape expected; on one line it may be a JSON Lines record, judged against the columns (check_not_wrapped)."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return  # JSON Lines (or a bad line, reported below)
    if len([line for line in text.splitlines() if line.strip()]) > 1:
        lists = [key for key, value in whole.items() if isinstance(value, list)] if isinstance(whole, dict) else []
        inside = f"an object with the list under '{lists[0]}'" if lists else "one JSON object over several lines"
        raise LorakitError(f"{path} holds {inside}; {WRAPPED}")


def check_not_wrapped(path: Path, records: list[Any], columns: dict[str, str]) -> None:
    """One record that has none of the dataset's columns but a list of objects is a wrapped list, not a record."""
    if path.suffix != ".json" or len(records) != 1 or not isinstance(records[0], dict):
        return
    if set(records[0]) & {*columns.values(), "messages"}:
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
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        raise LorakitError(f"{path} is not a readable Parquet file: {err}") from None
    return [without_nulls(row) for row in rows]


def without_nulls(value: Any) -> Any:
    """An Arrow row (Parquet, a datasets.Dataset) as the record it was written from: every key whose value is null
    dropped, from the record and from every object inside it, at any depth.

    Arrow gives all rows of a column one type: a list of objects is a list of one struct holding every key that any
    object of any row had, so a sharegpt message {from, value} comes back with `role: None` where another record
    had OpenAI messages, and a tool's `parameters.properties` with every other tool's parameters as None. A key
    that was written as null comes back the same way (Arrow cannot tell the two apart) and is dropped too: lorakit
    reads a null field as a missing one (no system prompt, no text, no tools), so what trains is unchanged (a
    message with null text is still an error, naming the text as missing rather than null); what is lost is a
    literal null inside a tool's definition (e.g. `"default": null`), which the tools text would otherwise show.
    Null items of a list are kept: they were written (Arrow adds none)."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value
