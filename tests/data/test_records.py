import json
from pathlib import Path

import pytest

from lorakit.data.records import alpaca_messages, load_conversations, read_records, resolve_datasets
from lorakit.errors import LorakitError
from lorakit.templates import Message

ALPACA = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"instruction": "Hi", "input": "", "output": "Hello"}, [("user", "Hi"), ("assistant", "Hello")]),
        ({"instruction": "Sum", "input": "1 2", "output": "3"}, [("user", "Sum\n1 2"), ("assistant", "3")]),
        (
            {"instruction": "Q", "output": "A", "system": "Be brief."},
            [("system", "Be brief."), ("user", "Q"), ("assistant", "A")],
        ),
        (
            {"instruction": "Q2", "input": "", "output": "A2", "history": [["Q1", "A1"]]},
            [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")],
        ),
    ],
)
def test_alpaca_meaning(record, expected):
    assert alpaca_messages(record, ALPACA, "f record 0") == [Message(r, c) for r, c in expected]


def test_columns_mapping_renames_fields(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "Hi", "a": "Yo", "sys": "S"}) + "\n\n")
    info = {
        "mine": {
            "file_name": "d.jsonl",
            "formatting": "alpaca",
            "columns": {"prompt": "q", "response": "a", "system": "sys"},
        }
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    conversations = load_conversations(resolve_datasets(str(tmp_path), ("mine",)), None)
    assert conversations == [[Message("system", "S"), Message("user", "Hi"), Message("assistant", "Yo")]]


def test_max_samples_applies_per_dataset(tmp_path: Path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(
            json.dumps([{"instruction": f"{name}{i}", "output": "o"} for i in range(5)])
        )
    info = {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    conversations = load_conversations(resolve_datasets(str(tmp_path), ("a", "b")), max_samples=2)
    assert [c[0].content for c in conversations] == ["a0", "a1", "b0", "b1"]


def _folder(tmp_path: Path, text: str, file_name: str = "d.json") -> Path:
    (tmp_path / file_name).write_text(text)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": file_name}}))
    return tmp_path


@pytest.mark.parametrize(
    "text, file_name, message",
    [
        (
            '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
            "d.json",
            "d.json is not valid JSON (line 2",
        ),
        ('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n', "d.jsonl", "d.jsonl line 2 is not valid JSON"),
        ('[{"instruction": "a", "input": ""}]', "d.json", "d.json record 0 has no 'output' field"),
        (
            '[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 7}]',
            "d.json",
            "d.json record 1: field 'output' must be a string, got int",
        ),
        (
            '[{"instruction": "a", "output": "b", "history": [["x"]]}]',
            "d.json",
            "history turn 0 must be a [user, assistant]",
        ),
        ("[]", "d.json", "no examples left"),
        ("[1]", "d.json", "record 0 is a int, not an object"),
    ],
)
def test_bad_records_name_file_and_place(tmp_path: Path, text: str, file_name: str, message: str):
    folder = _folder(tmp_path, text, file_name)
    with pytest.raises(LorakitError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_conversations(resolve_datasets(str(folder), ("d",)), None)


def test_undefined_dataset_lists_the_defined_names(tmp_path: Path):
    folder = _folder(tmp_path, "[]")
    with pytest.raises(
        LorakitError, match=r"dataset 'identity' is not defined in .*dataset_info.json; defined names: \['d'\]"
    ):
        resolve_datasets(str(folder), ("identity",))


def test_missing_info_and_missing_file(tmp_path: Path):
    with pytest.raises(LorakitError, match="dataset_info.json not found"):
        resolve_datasets(str(tmp_path), ("d",))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "gone.json"}}))
    with pytest.raises(LorakitError, match="gone.json for dataset 'd' not found"):
        resolve_datasets(str(tmp_path), ("d",))


def test_read_records_accepts_json_lines_in_a_json_file(tmp_path: Path):
    path = tmp_path / "d.json"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert [r["instruction"] for r in read_records(path)] == ["a", "c"]
