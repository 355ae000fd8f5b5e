"""Talk to a trained model: `python -m lorakit chat --model DIR [--adapter DIR] [--prompt TEXT]`.

The prompt is built by the same template object that built the training data (read from the adapter's or the
merged model's lorakit_config.json; the tokenizer's own chat_template otherwise), and generation stops at the
template's end-of-turn token. Interactively, replies stream token by token and the history is kept; `/reset`
starts a new conversation and `/exit` (or end of input) leaves.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from transformers import AutoModelForCausalLM, TextStreamer

from lorakit.adapter import (
    check_belongs,
    check_full_weights,
    check_unquantized_base,
    full_weights,
    lora_deltas,
    qlora_base_line,
)
from lorakit.checks import check_model_weights
from lorakit.engine.model import load_tokenizer, model_config
from lorakit.errors import LorakitError
from lorakit.generation import generate_reply
from lorakit.pissa import is_unconverted_pissa
from lorakit.run_record import training_template
from lorakit.templates import Message, Template, get_template


def load_chat_model(model_dir: str, adapter_dir: str | None = None,
                    trust_remote_code: bool = False) -> tuple[Any, Any, Template]:  # fmt: skip
    config = model_config(model_dir, trust_remote_code)  # a clear error for a folder that is not a model, or code
    check_model_weights(model_dir)
    if adapter_dir is not None:
        # the adapter's tensors against the base's shapes (headers only): an adapter made for another model is
        # one line here, not a traceback from PEFT after the model is loaded
        if is_unconverted_pissa(Path(adapter_dir)):
            # PEFT would decompose the base again, with a fresh random start for the fast SVD: another model
            raise LorakitError(f"--adapter {adapter_dir} is an unconverted PiSSA adapter (--pissa_convert false), "
                               "valid only on its residual base; merge it first (python -m lorakit merge), then "
                               "chat with the merged model")  # fmt: skip
        check_unquantized_base(config, model_dir)  # the adapter applies to the unquantised weights, as in merge
        index = check_belongs(lora_deltas(Path(adapter_dir))[0], model_dir, adapter_dir)
        tied = bool(getattr(config, "tie_word_embeddings", False))  # modules trained in full, as merge checks them
        check_full_weights(full_weights(Path(adapter_dir)), index, tied, f"the adapter {adapter_dir}")
        qlora_line = qlora_base_line(Path(adapter_dir), model_dir, config)
        if qlora_line:  # stderr: a one-shot reply on stdout stays the reply alone
            print(f"chat: {qlora_line}", file=sys.stderr, flush=True)
    source = Path(adapter_dir or model_dir)
    tokenizer = load_tokenizer(str(source) if (source / "tokenizer_config.json").is_file() else model_dir,
                               trust_remote_code=trust_remote_code)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    template = training_template(source, tokenizer) or get_template("auto", tokenizer)
    return model.eval(), tokenizer, template


def chat_loop(model: Any, tokenizer: Any, template: Template, system: str | None, max_new_tokens: int,
              source: TextIO = sys.stdin, sink: TextIO = sys.stdout) -> None:  # fmt: skip
    """The interactive session: history kept, replies streamed, /reset and /exit."""
    start = [Message("system", system)] if system else []
    history = list(start)
    sink.write("lorakit chat: /reset starts over, /exit leaves\n")
    while True:
        sink.write(">>> ")
        sink.flush()
        line = source.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append(Message("user", line.rstrip("\n")))
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = generate_reply(model, tokenizer, template, history, max_new_tokens, streamer=streamer)
        history.append(Message("assistant", reply))
