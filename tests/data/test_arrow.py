"""The Arrow path (lorakit.data.arrow, .build, .tokens) against the path it replaced: the same ids and labels, byte
for byte, and the same one-line errors, for every format, flag and mixture, with one worker process and with two.

The reference is the former encoder, copied here as it was (one conversation at a time, a label per token found with
`bisect`), run on conversations read whole in this process by lorakit.data.records / .mixing (the reading path
lorakit used, kept for `lorakit preview`)."""

from __future__ import annotations

import bisect
import csv
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest

from lorakit.config import DataConfig
from lorakit.data import prepare_data, resolve_datasets, with_system
from lorakit.data.mixing import load_mixed
from lorakit.errors import LorakitError
from lorakit.templates import Segment, get_template

WORDS = "the a cat dog 甄嬛 娘娘 本宫 café naïve 🙂 red green blue amber owl fox yak \t tab end. why? 42".split(" ")
AREA = {"name": "calculate_area", "description": "Area of a shape", "parameters": {"type": "object"}}
CALL = {"name": "calculate_area", "arguments": {"shape": "circle", "radius": 4}}
SHAREGPT_TOOLS = {"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}


def _text(rng: random.Random, most: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, most)))


def _alpaca(rng: random.Random, count: int) -> list[dict[str, Any]]:
    records = []
    for index in range(count):
        record = {"instruction": _text(rng, 30), "input": _text(rng, 8) if index % 3 else "", "output": _text(rng, 60)}
        if index % 5 == 0:
            record["system"] = _text(rng, 6)
        if index % 7 == 0:
            record["history"] = [[_text(rng, 10), _text(rng, 20)] for _ in range(rng.randint(1, 3))]
        records.append(record)
    return records


def _sharegpt(rng: random.Random, count: int, openai: bool) -> list[dict[str, Any]]:
    role, content, user, assistant = ("role", "content", "user", "assistant") if openai else \
        ("from", "value", "human", "gpt")  # fmt: skip
    records = []
    for index in range(count):
        turns = [{role: "system", content: _text(rng, 8)}] if index % 4 == 0 else []
        for _ in range(rng.randint(1, 4)):
            turns += [{role: user, content: _text(rng, 25)}, {role: assistant, content: _text(rng, 50)}]
        records.append({"messages" if openai else "conversations": turns})
    return records


def _tools(rng: random.Random, count: int) -> list[dict[str, Any]]:
    records = []
    for index in range(count):
        turns = [
            {"from": "human", "value": _text(rng, 10)},
            {"from": "function_call", "value": json.dumps(CALL)},
            {"from": "observation", "value": '{"area": 50.24}'},
            {"from": "gpt", "value": _text(rng, 20)},
        ]
        records.append({"conversations": turns, "tools": json.dumps([AREA]) if index % 2 else [AREA]})
    return records


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every format: a JSON list, JSON Lines, CSV, Parquet, a folder of JSON Lines files; sharegpt, OpenAI-style and
    tool records; 1,070 records in all, so two worker processes share them."""
    root, rng = tmp_path_factory.mktemp("formats"), random.Random(0)
    (root / "alpaca.json").write_text(json.dumps(_alpaca(rng, 300), ensure_ascii=False, indent=1))
    (root / "sharegpt.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in _sharegpt(rng, 250, False)))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(_sharegpt(rng, 150, True)), root / "openai.parquet")
    with open(root / "plain.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("instruction", "input", "output")} for r in _alpaca(rng, 120))
    (root / "parts").mkdir()
    for part in range(3):
        (root / "parts" / f"{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _alpaca(rng, 50)))
    (root / "tools.json").write_text(json.dumps(_tools(rng, 100), ensure_ascii=False))
    info = {"alpaca": {"file_name": "alpaca.json"},
            "sharegpt": {"file_name": "sharegpt.jsonl", "formatting": "sharegpt"},
            "openai": {"file_name": "openai.parquet", "formatting": "sharegpt"}, "csv": {"file_name": "plain.csv"},
            "parts": {"file_name": "parts"}, "tools": {"file_name": "tools.json", **SHAREGPT_TOOLS}}  # fmt: skip
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def reference_encode(messages: Any, template: Any, tokenizer: Any, cutoff_len: int, train_on_prompt: bool,
                     mask_history: bool) -> tuple[list[int], list[int], bool]:  # fmt: skip
    """lorakit.data.encode.encode_conversation as it was before the Arrow path."""
    ids, labels = _reference_ids_and_labels(messages, template, tokenizer, train_on_prompt, mask_history)
    dropped_turns = False
    if mask_history and len(ids) > cutoff_len:
        head = list(messages[: next(i for i, m in enumerate(messages) if m.role not in ("system", "tools"))])
        turns = list(messages[len(head) :])
        while len(ids) > cutoff_len and len(turns) > 2:
            turns, dropped_turns = turns[2:], True
            ids, labels = _reference_ids_and_labels(head + turns, template, tokenizer, train_on_prompt, mask_history)
    return ids[:cutoff_len], labels[:cutoff_len], dropped_turns or len(ids) > cutoff_len


def _reference_ids_and_labels(messages: Any, template: Any, tokenizer: Any, train_on_prompt: bool,
                              mask_history: bool) -> tuple[list[int], list[int]]:  # fmt: skip
    segments = template.render(messages)
    if mask_history:  # with train_on_prompt: the prompts and the last reply (LLaMA-Factory's meaning)
        last = max(i for i, segment in enumerate(segments) if segment.trained)
        segments = [Segment(s.text, i == last if s.trained else train_on_prompt) for i, s in enumerate(segments)]
    text, starts, ends = "", [], []
    for segment in segments:
        if segment.trained:
            starts.append(len(text))
            ends.append(len(text) + len(segment.text))
        text += segment.text
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    labels = []
    for token_id, (start, _) in zip(ids, encoding["offset_mapping"]):
        i = bisect.bisect_right(starts, start) - 1
        every = train_on_prompt and not mask_history
        labels.append(token_id if every or (i >= 0 and start < ends[i]) else -100)
    return ids, [-100, *labels[1:]] if labels else labels  # the first token: nothing of the example predicts it


def reference_examples(config: DataConfig, template: Any, tokenizer: Any, seed: int) -> tuple[list, int, int]:
    """(the training set's (ids, labels) in order, truncated count, dropped count) as the former path made them."""
    mixed = load_mixed(resolve_datasets(config.dataset_dir, config.dataset), config, seed)
    examples, truncated, dropped = [], 0, 0
    for messages in mixed.conversations:
        messages = with_system(messages, config.system, config.default_system)
        ids, labels, cut = reference_encode(messages, template, tokenizer, config.cutoff_len, config.train_on_prompt,
                                            config.mask_history)  # fmt: skip
        truncated += cut
        if sum(label != -100 for label in labels[1:]) == 0:
            dropped += 1
            continue
        examples.append((ids, labels))
    return examples, truncated, dropped


ALL = ("alpaca", "sharegpt", "openai", "csv", "parts", "tools")
CASES = {
    "every format, whole": dict(dataset=ALL, cutoff_len=4096),
    "truncated and dropped, prompts trained": dict(dataset=ALL, cutoff_len=48, train_on_prompt=True),
    "truncated, earliest turns dropped": dict(dataset=("alpaca", "sharegpt", "tools"), cutoff_len=90,
                                              mask_history=True),
    "earlier replies masked, prompts trained": dict(dataset=("sharegpt", "tools"), cutoff_len=90, mask_history=True,
                                                   train_on_prompt=True),
    "no system prompt at all": dict(dataset=("alpaca", "sharegpt"), system=""),
    "a default system prompt": dict(dataset=("alpaca", "openai", "tools"), default_system="Be brief, 甄嬛."),
    "interleaved at random, max_samples": dict(dataset=("alpaca", "sharegpt", "parts"), max_samples=120,
                                               mix_strategy="interleave_over", interleave_probs=(0.5, 0.3, 0.2)),
    "interleaved in turn": dict(dataset=("csv", "openai"), mix_strategy="interleave_under"),
}  # fmt: skip


_REFERENCES: dict[str, tuple[list, int, int]] = {}  # a case's reference_examples, the same for 1 worker and for 2


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("workers", [1, 2])
def test_the_same_ids_and_labels_byte_for_byte(case: str, workers: int, folder: Path, qwen_tokenizer: Any,
                                               tmp_path: Path):  # fmt: skip
    flags = {"cutoff_len": 1024, **CASES[case]}
    config = DataConfig(dataset_dir=str(folder), data_cache_dir=str(tmp_path), preprocessing_num_workers=workers,
                        **flags)  # fmt: skip
    template = get_template("qwen", qwen_tokenizer)
    data, path, _ = prepare_data(config, qwen_tokenizer, template, seed=7)
    if case not in _REFERENCES:  # the former path reads no worker count: computed once for both cases
        _REFERENCES[case] = reference_examples(config, template, qwen_tokenizer, seed=7)
    expected, truncated, dropped = _REFERENCES[case]
    assert len(data) == len(expected) and (data.num_truncated, data.num_dropped) == (truncated, dropped)
    for index, (ids, labels) in enumerate(expected):
        got_ids, got_labels = data.example(index)
        assert got_ids.dtype == np.int32 and got_ids.tolist() == ids and got_labels.tolist() == labels, index
    assert data.lengths.tolist() == [len(ids) for ids, _ in expected]
    assert data.target_counts.tolist() == [sum(label != -100 for label in labels[1:]) for _, labels in expected]
    assert json.loads((path / "meta.json").read_text())["workers"] == workers


def _write(folder: Path, files: dict[str, str], entry: dict | None = None) -> DataConfig:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    name = next(iter(files)).split("/")[0]
    (folder / "dataset_info.json").write_text(json.dumps({"d": {"file_name": name, **(entry or {})}}))
    return DataConfig(dataset=("d",), dataset_dir=str(folder), data_cache_dir=str(folder / "cache"),
                      preprocessing_num_workers=2)  # fmt: skip


GOOD = json.dumps({"instruction": "a", "output": "b"})
BAD_FIELD = json.dumps({"instruction": "a", "output": 5})
BAD_ROLE = json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]})
ERRORS = {
    "a line that is not JSON comes before a record's fields": (
        {"d.jsonl": "\n".join([BAD_FIELD, *[GOOD] * 600, "{oops", GOOD])}, None, "d.jsonl line 602 is not valid JSON"),
    "a record that is not an object, counted in its file": (
        {"d.jsonl": "\n".join([*[GOOD] * 400, BAD_FIELD, *[GOOD] * 300, "[1, 2]"])}, None, "record 701 is a list"),
    "the first bad record of many": (
        {"d.jsonl": "\n".join([*[GOOD] * 500, BAD_FIELD, GOOD, BAD_FIELD])}, None,
        "d.jsonl record 500: field 'output' must be a string, got int"),
    "a folder: a bad record before a file that is not JSON": (
        {"f/a.jsonl": "\n".join([GOOD, BAD_FIELD]), "f/b.json": "[{"}, None, "a.jsonl record 1: field 'output'"),
    "a folder: indexes count on across its files": (
        {"f/a.json": json.dumps([{"instruction": "a", "output": "b"}] * 3), "f/b.jsonl": "\n".join([GOOD, BAD_FIELD])},
        None, "b.jsonl record 4: field 'output' must be a string"),
    "sharegpt roles": ({"d.jsonl": "\n".join([BAD_ROLE] * 3)}, {"formatting": "sharegpt"},
                       "d.jsonl record 0: message 1 has role 'human' where 'gpt' was expected"),
    "a bad tool call": ({"d.json": json.dumps([{"conversations": [{"from": "human", "value": "a"}, {
        "from": "function_call", "value": "area(4)"}], "tools": "[]"}])}, SHAREGPT_TOOLS,
        "d.json record 0: message 1 (a function call) is not valid JSON"),
    "every example cut away": ({"d.json": json.dumps([{"instruction": "a " * 300, "output": "b"}])}, {},
                               "no examples left: all 1 lost every trained token to --cutoff_len 64"),
}  # fmt: skip


@pytest.mark.parametrize("case", ERRORS)
def test_the_same_one_line_errors_and_nothing_cached(case: str, qwen_tokenizer: Any, tmp_path: Path):
    files, entry, message = ERRORS[case]
    config = _write(tmp_path, files, entry)
    if case == "every example cut away":
        config = DataConfig(**{**config.__dict__, "cutoff_len": 64})
    template = get_template("qwen", qwen_tokenizer)
    with pytest.raises(LorakitError) as caught:
        prepare_data(config, qwen_tokenizer, template)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "cache").exists()
    if case != "every example cut away":  # the former path raised that one while tokenising
        with pytest.raises(LorakitError) as former:
            reference_examples(config, template, qwen_tokenizer, seed=42)
        assert str(former.value) == str(caught.value)


LINES = {
    "blank lines, spaces, CRLF, a byte-order mark": "\ufeff" + f"{GOOD}\r\n  \t \r\n\r\n{GOOD}\n \u3000\n{GOOD}",
    "separators only str.splitlines knows": f"{GOOD}\n{GOOD[:-1]}, \"x\": \"a\x0bb\"}}\n{GOOD}",
    "a line separator inside a string": f"{GOOD}\n" + json.dumps({"instruction": "a\u2028b", "output": "c"},
                                                                  ensure_ascii=False),
    "a record that starts with a space": f" {GOOD}\n\t{GOOD}",
}  # fmt: skip


@pytest.mark.parametrize("case", LINES)
def test_json_lines_split_as_str_splitlines_splits_them(case: str, qwen_tokenizer: Any, tmp_path: Path):
    """pyarrow's reader splits JSON Lines; where it could split otherwise than str.splitlines, lorakit reads the
    lines in Python: either way the records, their line numbers and their errors are the reference path's."""
    config = _write(tmp_path, {"d.jsonl": LINES[case]})
    template = get_template("qwen", qwen_tokenizer)
    try:
        expected, _, _ = reference_examples(config, template, qwen_tokenizer, seed=42)
    except LorakitError as err:
        with pytest.raises(LorakitError) as caught:
            prepare_data(config, qwen_tokenizer, template)
        assert str(caught.value) == str(err)
        return
    data, _, _ = prepare_data(config, qwen_tokenizer, template)
    assert [(ids.tolist(), labels.tolist()) for ids, labels in map(data.example, range(len(data)))] == expected
