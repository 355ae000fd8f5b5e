"""A merged model's chat format for other runtimes: a Jinja `chat_template` for transformers / vLLM, and an ollama
`Modelfile`.

A fine-tuned model only behaves when it is prompted in the exact format it was trained on, so both are written
from the lorakit template itself, never picked by model name:

- `chat_template_jinja(template)`: Hugging Face Jinja that renders a conversation exactly as the template's
  `render` (segments joined) and, with `add_generation_prompt=True`, as its `generation_prompt`. `merge` stores it
  as the merged tokenizer's `chat_template`.
- `ollama_modelfile(template, model_path)` / `write_export(out_dir, template)`: an ollama Modelfile whose Go
  `TEMPLATE` writes the same prompt, with the end-of-turn markers as `stop` parameters.

Ollama loads GGUF files only, and lorakit does not bundle the converter. From a llama.cpp checkout::

    python convert_hf_to_gguf.py MERGED_DIR --outfile MERGED_DIR/model.gguf --outtype q8_0
    ollama create NAME -f MERGED_DIR/Modelfile
    ollama run NAME
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.templates import (
    ChatMLTemplate,
    Llama3Template,
    Message,
    PlainTemplate,
    Qwen3Template,
    Template,
    TokenizerTemplate,
    check_against_tokenizer,
)
from lorakit.templates.chatml import CHATML
from lorakit.templates.llama3 import LLAMA3
from lorakit.templates.qwen3 import QWEN3

NAMED = "qwen, qwen3, chatml, llama3, default"


def _literal(text: str) -> str:
    """`text` as a Jinja string literal: Jinja unescapes literals like Python's unicode-escape codec, so any text
    (quotes, backslashes, newlines, non-ASCII) round-trips exactly."""
    return "'" + text.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


# Qwen2.5's own chat_template (tools included, so a merged Qwen keeps its function calling); only the default
# system prompt is filled in, and for QWEN this gives the official text character for character.
_QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
@TOOLS_SYSTEM@# Tools\n\nYou may call one or more functions to assist with the user query.\
\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments \
within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \
\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
@DEFAULT_SYSTEM@    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) \
or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""".replace("\\\n", "")  # the backslash-newlines above only keep lines short

# ChatML with the first system message (or the default) on top; qwen3 adds the empty think block to the final
# reply (@FINAL@), as Qwen3's template writes a reply without reasoning, and honours its enable_thinking=false.
_CHATML = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
@DEFAULT_SYSTEM@{%- endif %}
{%- for message in messages %}
    {%- if not (loop.first and message['role'] == 'system') %}
        {%- set content = message['content'] %}
@FINAL@        {{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
@THINKING_OFF@{%- endif %}
"""
_QWEN3_FINAL = r"""        {%- if loop.last and message['role'] == 'assistant' %}
            {%- set content = '<think>\n\n</think>\n\n' + content.lstrip('\n') %}
        {%- endif %}
"""
_QWEN3_THINKING_OFF = r"""    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
"""

# Meta's Llama 3 template, with <|begin_of_text|> written literally (lorakit's text includes it; tokenizing it
# again must not add another: apply_chat_template(tokenize=True) adds no special tokens).
_LLAMA3 = r"""{{- '<|begin_of_text|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

_PLAIN = r"""{%- set labels = {'system': 'System', 'user': 'Human', 'assistant': 'Assistant'} %}
{%- for message in messages %}
    {{- labels[message['role']] + ': ' + message['content'] }}
    {%- if message['role'] == 'assistant' %}
        {{- @EOS@ }}
    {%- endif %}
    {%- if not loop.last or add_generation_prompt %}
        {{- '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'Assistant:' }}
{%- endif %}
"""


def chat_template_jinja(template: Template) -> str:
    """The Jinja chat_template that writes conversations exactly as `template` does, so the merged model is
    prompted (by transformers, vLLM, TGI, ...) in the format it was trained on. `auto`: the tokenizer's own."""
    if isinstance(template, TokenizerTemplate):
        return template.tokenizer.chat_template
    if isinstance(template, ChatMLTemplate):
        return _qwen25_jinja(template.default_system) if template.name == "qwen" else _chatml_jinja(template)
    if isinstance(template, Qwen3Template):
        return _chatml_jinja(template)
    if isinstance(template, Llama3Template):
        return _LLAMA3
    if isinstance(template, PlainTemplate):
        return _PLAIN.replace("@EOS@", _literal(template.eos_token))
    raise LorakitError(f"no Jinja chat_template for template {template.name!r}; use one of {NAMED} or auto")


def _qwen25_jinja(default_system: str | None) -> str:
    """Qwen2.5's template; without a default system prompt a system block appears only when a conversation has
    one (with tools: Qwen3's wording, so no empty line opens the tools block)."""
    if default_system is None:
        tools = "    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] + '\\n\\n' }}\n"
        tools += '    {%- endif %}\n    {{- "'
        default = ""
    else:
        tools = "    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n"
        tools += f"    {{%- else %}}\n        {{{{- {_literal(default_system)} }}}}\n"
        tools += '    {%- endif %}\n    {{- "\\n\\n'
        block = _literal(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        default = f"    {{%- else %}}\n        {{{{- {block} }}}}\n"
    return _QWEN25.replace("@TOOLS_SYSTEM@", tools).replace("@DEFAULT_SYSTEM@", default)


def _chatml_jinja(template: ChatMLTemplate | Qwen3Template) -> str:
    default_system = getattr(template, "default_system", None)
    default = ""
    if default_system is not None:
        block = _literal(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        default = f"{{%- else %}}\n    {{{{- {block} }}}}\n"
    qwen3 = isinstance(template, Qwen3Template)
    return (
        _CHATML.replace("@DEFAULT_SYSTEM@", default)
        .replace("@FINAL@", _QWEN3_FINAL if qwen3 else "")
        .replace("@THINKING_OFF@", _QWEN3_THINKING_OFF if qwen3 else "")
    )


# Ollama Go templates. Ollama passes the system prompt as .System (the request's system messages, or the
# Modelfile's SYSTEM when there are none) and, in recent versions, the system messages in .Messages too: they are
# skipped there. The prompt always ends asking for the assistant's reply, as generation_prompt does.
_OLLAMA_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""
# No <|begin_of_text|>: llama.cpp adds the bos token itself for Llama 3 GGUF files. Go templates cannot trim, so
# messages are written as sent (Meta's template trims them).
_OLLAMA_LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
_OLLAMA_PLAIN = """{{- if .System }}System: {{ .System }}
{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}Human: {{ .Content }}
{{ else if eq .Role "assistant" }}Assistant: {{ .Content }}@EOS@
{{ end }}
{{- end }}Assistant:"""

# Markers a reply must never run into, beyond the template's own end-of-turn: the next turn's opening.
_EXTRA_STOPS = {
    "chatml": ("<|im_start|>",),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>"),
    "default": ("Human:",),  # a base model that misses its eos token goes on to write the next turn
}


def ollama_modelfile(template: Template, model_path: str, system: str | None = None) -> str:
    """An ollama Modelfile for the GGUF file at `model_path`, prompting as `template` does: its Go TEMPLATE, a
    `PARAMETER stop` per end-of-turn marker (ollama otherwise only stops at the GGUF's eos token) and `SYSTEM`
    (`system`, else the template's default system prompt), which ollama uses when a chat brings none.

    The GGUF comes from llama.cpp (not bundled): `python convert_hf_to_gguf.py MERGED_DIR --outfile model.gguf
    --outtype q8_0`, then `ollama create NAME -f Modelfile`. `auto` works when the tokenizer's chat_template is
    one of the named formats; others raise LorakitError.
    """
    named = _named_equivalent(template) if isinstance(template, TokenizerTemplate) else template
    family, go_template = _ollama_template(named)
    system = system if system is not None else getattr(named, "default_system", None)
    stops = dict.fromkeys((*named.stop_strings, *_EXTRA_STOPS.get(family, ())))
    lines = [
        f"# ollama Modelfile written by lorakit (template {template.name}): ollama create NAME -f Modelfile",
        f"FROM {model_path}",
        f"TEMPLATE {_triple_quoted(go_template)}",
        *(f"PARAMETER stop {_quoted(stop)}" for stop in stops),
    ]
    if system:
        lines.append(f"SYSTEM {_triple_quoted(system)}")
    return "\n".join(lines) + "\n"


def _ollama_template(template: Template) -> tuple[str, str]:
    """(format family, Go template) of a named template."""
    if isinstance(template, (ChatMLTemplate, Qwen3Template)):
        return "chatml", _OLLAMA_CHATML
    if isinstance(template, Llama3Template):
        return "llama3", _OLLAMA_LLAMA3
    if isinstance(template, PlainTemplate):
        return "default", _OLLAMA_PLAIN.replace("@EOS@", template.eos_token)
    raise LorakitError(f"ollama export needs a named template ({NAMED}); {template.name!r} is not one")


def _named_equivalent(template: TokenizerTemplate) -> Template:
    """The named template that writes exactly what the tokenizer's chat_template writes (checked on the
    start-of-run probe conversations), chosen among those sharing its end-of-turn marker."""
    tokenizer, stops = template.tokenizer, template.stop_strings
    candidates: list[Template] = []
    if "<|im_end|>" in stops:
        prompt = template.generation_prompt([Message("user", "Hi")])
        header = "<|im_start|>system\n"
        default = prompt[len(header) : prompt.find("<|im_end|>")] if prompt.startswith(header) else None
        candidates += [ChatMLTemplate(name=CHATML.name, default_system=default), QWEN3]
    if "<|eot_id|>" in stops:
        candidates.append(LLAMA3)
    if getattr(tokenizer, "eos_token", None):
        candidates.append(PlainTemplate(name="default", eos_token=tokenizer.eos_token))
    for candidate in candidates:
        if check_against_tokenizer(candidate, tokenizer) is None:
            return candidate
    raise LorakitError(
        f"ollama export needs a named template ({NAMED}): the chat_template of "
        f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')} is none of them; "
        "train with --template NAME to export for ollama"
    )


def _quoted(text: str) -> str:
    if '"' in text or "\n" in text:
        raise LorakitError(f"ollama stop strings cannot contain quotes or newlines: {text!r}")
    return f'"{text}"'


def _triple_quoted(text: str) -> str:
    if '"""' in text or text.endswith('"'):
        raise LorakitError(f'an ollama Modelfile cannot hold text containing """: {text[:60]!r}')
    return f'"""{text}"""'


def write_export(out_dir: Path, template: Template, gguf_name: str = "model.gguf", system: str | None = None) -> Path:
    """Write `out_dir/Modelfile` pointing at `./{gguf_name}` beside it (where convert_hf_to_gguf.py is told to
    write the GGUF), so the folder can be moved as a whole; the path of the Modelfile."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "Modelfile"
    path.write_text(ollama_modelfile(template, f"./{gguf_name}", system=system))
    return path
