"""Data from Python (`lorakit.train(config, train_data=...)`): the same records, checks, cache and ids as files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import tiny
from conversations import MIXED_KEY_RECORDS

from lorakit import Message
from lorakit.config import Config
from lorakit.data import prepare_data
from lorakit.data.inmemory import conversations_from
from lorakit.errors import LorakitError
from lorakit.validate import validate


def _config(model: Path, tmp_path: Path, **flags: Any) -> Config:
    return Config.from_flat({"model_name_or_path": str(model), "template": "qwen", "cutoff_len": 256,
                             "output_dir": str(tmp_path / "out"), **flags})  # fmt: skip


def _messages(record: dict[str, str]) -> list[Message]:
    user = f"{record['instruction']}\n{record['input']}" if record["input"] else record["instruction"]
    return [Message("user", user), Message("assistant", record["output"])]


def _forms(records: list[dict[str, str]]) -> dict[str, Any]:
    """The same conversations in every form train_data takes."""
    conversations = [_messages(r) for r in records]
    return {
        "alpaca": records,
        "messages": conversations,
        "sharegpt": [
            {"conversations": [{"from": "human", "value": c[0].content}, {"from": "gpt", "value": c[1].content}]}
            for c in conversations
        ],  # fmt: skip
        "openai": [{"messages": [{"role": m.role, "content": m.content} for m in c]} for c in conversations],
        "dataset": datasets.Dataset.from_list(records),
    }


def _tokenised(plan: Any) -> Any:
    data, _, cached = prepare_data(plan.config.data, plan.tokenizer, plan.template, source=plan.train_data)
    return data, cached


def test_every_form_gives_the_files_ids_and_one_cache_keyed_by_the_content(tiny_model, tiny_data, tmp_path):
    records = tiny.alpaca_records(48)
    from_file = validate(_config(tiny_model, tmp_path, dataset_dir=str(tiny_data), dataset=("tiny",)))
    file_data, _ = _tokenised(from_file)
    keys = set()
    for form, train_data in _forms(records).items():
        plan = validate(_config(tiny_model, tmp_path), train_data=train_data)  # no dataset, no dataset_dir
        data, cached = _tokenised(plan)
        assert cached == (form != "alpaca"), form  # the first form tokenises; the others find its cache file
        for name in ("ids", "labels", "offsets"):
            np.testing.assert_array_equal(getattr(data, name), getattr(file_data, name))
        keys.add(plan.train_data.key)
    assert len(keys) == 1
    changed = [dict(records[0], output="The owl is teal."), *records[1:]]
    assert validate(_config(tiny_model, tmp_path), train_data=changed).train_data.key not in keys
    flags = validate(_config(tiny_model, tmp_path, cutoff_len=200), train_data=records).train_data.key
    assert flags not in keys  # the data flags still count


def test_eval_data_and_max_samples_apply_as_for_files(tiny_model, tmp_path):
    records = tiny.alpaca_records(20)
    plan = validate(_config(tiny_model, tmp_path, max_samples=12), train_data=records, eval_data=records[:5])
    assert len(plan.train_data.conversations) == 12 and len(plan.eval_data.conversations) == 5
    assert (plan.train_data.meta["examples"], plan.eval_data.meta["examples"]) == (12, 5)
    assert plan.eval_data.key != plan.train_data.key


@pytest.mark.parametrize(
    "train_data, message",
    [
        ([{"instruction": "a", "output": "b"}] * 3 + [{"instruction": "a"}],
         "train_data record 3 has no 'output' field (the response column); every record needs one"),
        ([[Message("user", "a"), Message("assistant", "b")], [Message("user", "a"), Message("user", "b")]],
         "train_data record 1: message 1 has role 'user' where 'assistant' was expected"),
        ([{"messages": [{"role": "human", "content": "a"}]}], "train_data record 0: message 0 has role 'human'"),
        ([{"instruction": "a", "output": "b"}, 7], "train_data record 1 is a int; give a conversation"),
        ([], "no examples left: train_data holds no records"),
        ({"instruction": "a", "output": "b"}, "train_data must be a list of conversations or records"),
    ],
)  # fmt: skip
def test_a_bad_record_is_one_line_naming_its_index(tiny_model, tmp_path, train_data, message):
    with pytest.raises(LorakitError) as caught:
        validate(_config(tiny_model, tmp_path), train_data=train_data)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_data_from_python_and_from_files_together_is_an_error(tiny_model, tiny_data, tmp_path):
    records = tiny.alpaca_records(8)
    with pytest.raises(LorakitError, match="^train_data and --dataset tiny both give the training data"):
        validate(_config(tiny_model, tmp_path, dataset_dir=str(tiny_data), dataset=("tiny",)), train_data=records)
    with pytest.raises(LorakitError, match="^eval_data and --eval_dataset / --val_size both"):
        validate(_config(tiny_model, tmp_path, val_size=2), train_data=records, eval_data=records)


def test_a_datasets_dataset_reads_its_records_as_written():
    """A datasets.Dataset gives every object every key of its column's Arrow type (null where the record had none),
    as a Parquet file does: the records read as the Python list they were made from."""
    from_list = conversations_from(MIXED_KEY_RECORDS, "train_data", None)
    assert conversations_from(datasets.Dataset.from_list(MIXED_KEY_RECORDS), "train_data", None) == from_list
