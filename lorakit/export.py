"""A merged model's ollama `Modelfile`, written from the lorakit template it was trained with.

A fine-tuned model only behaves when it is prompted in the exact format it was trained on, so the format comes
from the template itself (`Template.ollama_format()`: its Go TEMPLATE, stop lines and default system prompt),
never picked by model name; `merge` likewise stores `Template.chat_template_jinja()` as the merged tokenizer's
`chat_template` for transformers / vLLM.

Ollama loads GGUF files only, and lorakit does not bundle the converter. From a llama.cpp checkout::

    python convert_hf_to_gguf.py MERGED_DIR --outfile MERGED_DIR/model.gguf --outtype q8_0
    ollama create NAME -f MERGED_DIR/Modelfile
    ollama run NAME
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.templates import Template


def ollama_modelfile(template: Template, model_path: str, system: str | None = None) -> str:
    """An ollama Modelfile for the GGUF file at `model_path`, prompting as `template` does: its Go TEMPLATE, a
    `PARAMETER stop` per end-of-turn marker (ollama otherwise only stops at the GGUF's eos token) and `SYSTEM`
    (`system`, else the template's default system prompt), which ollama uses when a chat brings none.

    The GGUF comes from llama.cpp (not bundled): `python convert_hf_to_gguf.py MERGED_DIR --outfile model.gguf
    --outtype q8_0`, then `ollama create NAME -f Modelfile`. `auto` works when the tokenizer's chat_template is
    one of the named formats; others raise LorakitError.
    """
    ollama = template.ollama_format()
    system = system if system is not None else ollama.system
    lines = [
        f"# ollama Modelfile written by lorakit (template {template.name}): ollama create NAME -f Modelfile",
        f"FROM {model_path}",
        f"TEMPLATE {_triple_quoted(ollama.template)}",
        *(f"PARAMETER stop {_quoted(stop)}" for stop in dict.fromkeys(ollama.stops)),
    ]
    if system:
        lines.append(f"SYSTEM {_triple_quoted(system)}")
    return "\n".join(lines) + "\n"


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
