"""ShareGPT and OpenAI-style records; CSV, Parquet and folders of data files."""

import csv
import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
from conversations import MIXED_KEY_RECORDS, trained_text

from lorakit.data.encode import encode_conversation
from lorakit.data.records import load_conversations, read_records, resolve_datasets
from lorakit.errors import LorakitError
from lorakit.templates import Message, get_template

OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
SHAREGPT_RECORD = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hello there"},
        {"from": "gpt", "value": "Hi! How can I help?"},
        {"from": "human", "value": "Tell me a joke"},
        {"from": "gpt", "value": "Why did the chicken cross the road?"},
    ]
}
OPENAI_RECORD = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
    ]
}
EXPECTED = [
    Message("system", "Be brief."),
    Message("user", "Hello there"),
    Message("assistant", "Hi! How can I help?"),
    Message("user", "Tell me a joke"),
    Message("assistant", "Why did the chicken cross the road?"),
]


def _dataset(folder: Path, files: dict[str, object], entry: dict | None = None, name: str = "d") -> list:
    """Write the data files (records: a list written as JSON Lines; str: written as is) and dataset_info.json."""
    for file_name, content in files.items():
        path = folder / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in content))
    file_name = entry.pop("file_name") if entry and "file_name" in entry else next(iter(files))
    info = {name: {"file_name": file_name, **(entry or {})}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return resolve_datasets(str(folder), (name,))


@pytest.mark.parametrize(
    "record, entry",
    [
        (SHAREGPT_RECORD, {"formatting": "sharegpt"}),
        (OPENAI_RECORD, {"formatting": "sharegpt"}),  # no tags, no columns: OpenAI messages recognised
        (OPENAI_RECORD, {"formatting": "sharegpt", "tags": OPENAI_TAGS, "columns": {"messages": "messages"}}),
        (
            {
                "turns": [
                    {"speaker": "u", "text": m.content} if m.role == "user" else {"speaker": "a", "text": m.content}
                    for m in EXPECTED[1:]
                ],
                "sys": "Be brief.",
            },
            {
                "formatting": "sharegpt",
                "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "u", "assistant_tag": "a"},
                "columns": {"messages": "turns", "system": "sys"},
            },
        ),
    ],
    ids=["sharegpt", "openai-detected", "openai-tags", "custom-tags-and-system-column"],
)
def test_message_formats_give_the_conversation(tmp_path: Path, record: dict, entry: dict):
    specs = _dataset(tmp_path, {"d.json": json.dumps([record, record])}, entry)
    assert load_conversations(specs, None) == [EXPECTED, EXPECTED]


def test_system_column_is_optional_and_a_first_system_message_wins(tmp_path: Path):
    records = [
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "system": "S"},
        {"system": "column", **SHAREGPT_RECORD},
    ]
    specs = _dataset(tmp_path, {"d.jsonl": records}, {"formatting": "sharegpt"})
    first, second, third = load_conversations(specs, None)
    assert first == [Message("user", "Q"), Message("assistant", "A")]
    assert second == [Message("system", "S"), Message("user", "Q"), Message("assistant", "A")]
    assert third == EXPECTED


@pytest.mark.parametrize("record", [SHAREGPT_RECORD, OPENAI_RECORD], ids=["sharegpt", "openai"])
def test_only_assistant_replies_are_trained_with_qwen(tmp_path: Path, qwen_tokenizer, record: dict):
    (conversation,) = load_conversations(_dataset(tmp_path, {"d.json": [record]}, {"formatting": "sharegpt"}), None)
    example = encode_conversation(conversation, get_template("qwen", qwen_tokenizer), qwen_tokenizer, 1024)
    assert trained_text(qwen_tokenizer, example) == [
        "Hi! How can I help?<|im_end|>",
        "Why did the chicken cross the road?<|im_end|>",
    ]
    assert "<|im_start|>system\nBe brief.<|im_end|>" in qwen_tokenizer.decode(example.input_ids)


def _turns(*roles: str) -> dict:
    return {"conversations": [{"from": role, "value": f"text {i}"} for i, role in enumerate(roles)]}


GOOD = _turns("human", "gpt")


@pytest.mark.parametrize(
    "records, message",
    [
        (
            [GOOD, GOOD, GOOD, _turns("system", "human", "human", "gpt")],
            "data.json record 3: message 2 has role 'human' where 'gpt' was expected; "
            "ShareGPT turns must alternate human, gpt, ... and end with gpt",
        ),
        ([GOOD, _turns("gpt", "human")], "data.json record 1: message 0 has role 'gpt' where 'human' was expected"),
        ([_turns("human", "gpt", "human")], "data.json record 0: the last message (2) has role 'human'"),
        ([_turns("human", "gpt", "system", "gpt")], "record 0: message 2 has role 'system' where 'human' was"),
        ([_turns("system")], "data.json record 0: 'conversations' holds no human/gpt turns"),
        ([GOOD, _turns("human", "bot")], "data.json record 1: message 1 has role 'bot'; roles are system, human, gpt"),
        ([{"conversations": [{"value": "x"}]}], "record 0: message 0 has no 'from' string"),
        ([{"conversations": [{"from": "human", "value": 3}]}], "record 0: message 0 has a int 'value'"),
        ([{"conversations": ["hi"]}], "record 0: message 0 must be an object with 'from' and 'value', got str"),
        ([{"conversations": "hi"}], "record 0: field 'conversations' must be a list of messages, got str"),
        ([{"chat": []}], "data.json record 0 has no 'conversations' field"),
        ([{**GOOD, "system": 1}], "record 0: field 'system' must be a string, got int"),
    ],
)
def test_bad_sharegpt_records_name_file_record_and_message(tmp_path: Path, records: list, message: str):
    specs = _dataset(tmp_path, {"data.json": json.dumps(records)}, {"formatting": "sharegpt"})
    with pytest.raises(LorakitError, match=_literal(message)):
        load_conversations(specs, None)


def test_openai_records_report_their_own_roles(tmp_path: Path):
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    specs = _dataset(tmp_path, {"o.jsonl": [record]}, {"formatting": "sharegpt"})
    with pytest.raises(LorakitError, match="o.jsonl record 0: message 1 has role 'user' where 'assistant' was"):
        load_conversations(specs, None)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"formatting": "sharegpt", "tags": {"speaker": "x"}}, r"unknown tags \['speaker'\]; use \['role_tag'"),
        ({"formatting": "sharegpt", "columns": {"prompt": "x"}}, r"unknown columns \['prompt'\]; use \['messages'"),
        ({"formatting": "sharegpt", "tags": ["role"]}, "'tags' must be an object of strings"),
        ({"tags": {"role_tag": "role"}}, "'tags' apply to formatting 'sharegpt' only"),
        ({"formatting": "openai"}, r"formatting 'openai' is unsupported; use \('alpaca', 'sharegpt'\)"),
    ],
)
def test_bad_entries_name_the_dataset(tmp_path: Path, entry: dict, message: str):
    with pytest.raises(LorakitError, match=f"dataset 'd' in .*dataset_info.json: {message}"):
        _dataset(tmp_path, {"d.json": [GOOD]}, entry)


def _literal(message: str) -> str:
    return message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")


def _alpaca(*names: str) -> list[dict]:
    return [{"instruction": name, "output": "o"} for name in names]


def _instructions(conversations) -> list[str]:
    return [c[0].content for c in conversations]


def test_folder_of_jsonl_files_reads_them_in_name_order(tmp_path: Path):
    files = {"d/b.jsonl": _alpaca("b0", "b1"), "d/a.jsonl": _alpaca("a0", "a1", "a2"), "d/c.json": _alpaca("c0")}
    specs = _dataset(tmp_path, {**files, "d/.DS_Store": "junk"}, {"file_name": "d"})
    assert _instructions(load_conversations(specs, None)) == ["a0", "a1", "a2", "b0", "b1", "c0"]
    assert [p.name for p in specs[0].files] == ["a.jsonl", "b.jsonl", "c.json"]


@pytest.mark.parametrize("max_samples, expected", [(2, ["a0", "a1"]), (4, ["a0", "a1", "a2", "b0"]), (9, None)])
def test_max_samples_counts_across_a_folder(tmp_path: Path, max_samples: int, expected: list | None):
    files = {"d/a.jsonl": _alpaca("a0", "a1", "a2"), "d/b.jsonl": _alpaca("b0", "b1")}
    specs = _dataset(tmp_path, files, {"file_name": "d"})
    all_five = ["a0", "a1", "a2", "b0", "b1"]
    assert _instructions(load_conversations(specs, max_samples)) == (expected or all_five)


def test_errors_in_a_folder_name_the_file_and_count_records_across_files(tmp_path: Path):
    files = {"d/a.jsonl": _alpaca("a0", "a1", "a2"), "d/b.jsonl": [*_alpaca("b0"), {"instruction": "b1"}]}
    specs = _dataset(tmp_path, files, {"file_name": "d"})
    with pytest.raises(LorakitError, match=r"d/b\.jsonl record 4 has no 'output' field"):
        load_conversations(specs, None)


@pytest.mark.parametrize(
    "files, message",
    [
        ({"d/a.jsonl": _alpaca("a"), "d/b.csv": "instruction,output\nb,o\n"}, r"mixes file types \(CSV, JSON\)"),
        ({"d/a.jsonl": _alpaca("a"), "d/notes.txt": "x"}, r"holds \['notes.txt'\], which lorakit cannot read"),
        ({"d/.hidden": "x"}, "data folder .*d is empty"),
    ],
)
def test_bad_folders(tmp_path: Path, files: dict, message: str):
    with pytest.raises(LorakitError, match=message):
        _dataset(tmp_path, files, {"file_name": "d"})


def test_csv_values_are_strings_and_empty_cells_are_empty(tmp_path: Path):
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "input", "output", "system"])
        writer.writerow(["Sum", "1, 2", "3", ""])
        writer.writerow(["Say hi\nplease", "", "Hi", "Be brief."])
        writer.writerow(["Short row", "", "ok"])
    specs = _dataset(tmp_path, {}, {"file_name": "d.csv"})
    assert load_conversations(specs, None) == [
        [Message("user", "Sum\n1, 2"), Message("assistant", "3")],
        [Message("system", "Be brief."), Message("user", "Say hi\nplease"), Message("assistant", "Hi")],
        [Message("user", "Short row"), Message("assistant", "ok")],
    ]


def test_csv_row_with_extra_cells(tmp_path: Path):
    specs = _dataset(tmp_path, {"d.csv": "instruction,output\na,b\nc,d,e\n"})
    with pytest.raises(LorakitError, match=r"d\.csv record 1 has more cells than the header row"):
        load_conversations(specs, None)


def test_parquet_alpaca_and_openai_messages(tmp_path: Path):
    pyarrow.parquet.write_table(
        pyarrow.Table.from_pylist([{"instruction": "Q", "input": None, "output": "A"}]), tmp_path / "a.parquet"
    )
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([OPENAI_RECORD, OPENAI_RECORD]), tmp_path / "o.parquet")
    info = {"a": {"file_name": "a.parquet"}, "o": {"file_name": "o.parquet", "formatting": "sharegpt"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    conversations = load_conversations(resolve_datasets(str(tmp_path), ("a", "o")), None)
    assert conversations == [[Message("user", "Q"), Message("assistant", "A")], EXPECTED, EXPECTED]


def test_parquet_records_read_back_as_written(tmp_path: Path):
    """Arrow adds every other record's keys to each object as nulls (a message's, a tool's parameters'); lorakit
    drops them, so the tools text a template shows is the record's own."""
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(MIXED_KEY_RECORDS), tmp_path / "t.parquet")
    assert read_records(tmp_path / "t.parquet") == MIXED_KEY_RECORDS
    (tmp_path / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.parquet", "formatting": "sharegpt"}}))
    conversations = load_conversations(resolve_datasets(str(tmp_path), ("t",)), None)
    tools = [next(m.content for m in c if m.role == "tools") for c in conversations]
    assert tools == [json.dumps(r["tools"]) for r in MIXED_KEY_RECORDS]


def test_unreadable_parquet(tmp_path: Path):
    specs = _dataset(tmp_path, {"d.parquet": "not parquet"})
    with pytest.raises(LorakitError, match=r"d\.parquet is not a readable Parquet file"):
        load_conversations(specs, None)
