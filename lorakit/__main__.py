"""`python -m lorakit {train,preview,merge,chat} ...`

- train FLAGS: the training run (as `deepspeed examples/sft.py FLAGS`).
- preview [--num_examples N] FLAGS: the first encoded examples as JSON lines.
- merge --base MODEL --adapter DIR --out DIR [--overwrite] [--export ollama]: a standalone merged model.
- chat --model DIR [--adapter DIR] [--prompt TEXT] [--system TEXT] [--max_new_tokens N]: talk to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorakit.cli import main, parse_config, run_cli
from lorakit.errors import LorakitError

USAGE = "usage: python -m lorakit {train,preview,merge,chat} ...  (--help after a command lists its options)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise LorakitError(f"{message}; run with --help")


REMOTE_CODE_HELP = "run the Python code a model folder ships (auto_map in its config); off: such a model is refused"


def _say_remote_code(trust_remote_code: bool, path: str) -> None:
    """The one line that starts a command run with --trust_remote_code (stderr: stdout may be JSON or a reply)."""
    from lorakit.engine.model import remote_code_note

    if trust_remote_code:
        print(remote_code_note(path), file=sys.stderr, flush=True)


def _preview(argv: list[str]) -> None:
    from lorakit.preview import preview

    count = 3
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--num_examples=") else [arg])]
    if "--num_examples" in argv:
        at = argv.index("--num_examples")
        if at + 1 >= len(argv) or not argv[at + 1].isdigit():
            raise LorakitError("--num_examples needs a whole number")
        count = int(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    config = parse_config(argv, "lorakit preview [--num_examples N (default 3)]")
    _say_remote_code(config.model.trust_remote_code, config.model.model_name_or_path)
    for record in preview(config, count):
        print(json.dumps(record, ensure_ascii=False))


def _merge(argv: list[str]) -> None:
    from lorakit.engine.model import load_tokenizer
    from lorakit.export import write_export
    from lorakit.merge import merge
    from lorakit.run_record import CONFIG_FILE, training_template

    parser = _Parser(prog="lorakit merge", description="Merge a LoRA adapter into its base model.")
    parser.add_argument("--base", required=True, help="the base model folder the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="the adapter folder (a lorakit output_dir or checkpoint)")
    parser.add_argument("--out", required=True, help="where the merged model goes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--export", choices=["ollama"], help="also write an ollama Modelfile next to the model")
    parser.add_argument("--trust_remote_code", action="store_true", help=REMOTE_CODE_HELP)
    args = parser.parse_args(argv)
    if args.export and not (Path(args.adapter) / CONFIG_FILE).is_file():
        raise LorakitError(
            f"--export ollama needs {args.adapter}/{CONFIG_FILE} (lorakit's record of the chat template)"
        )
    _say_remote_code(args.trust_remote_code, args.base)
    out = merge(args.base, args.adapter, args.out, args.overwrite, args.trust_remote_code)
    print(f"merged model written to {out}")
    if args.export:
        tokenizer = load_tokenizer(str(out), trust_remote_code=args.trust_remote_code)
        modelfile = write_export(out, training_template(out, tokenizer))
        print(f"ollama Modelfile written to {modelfile}; convert the model to GGUF first (see README)")


def _chat(argv: list[str]) -> None:
    from lorakit.chat import chat_loop, load_chat_model
    from lorakit.generation import generate_reply
    from lorakit.templates import Message

    parser = _Parser(prog="lorakit chat", description="Talk to a trained model.")
    parser.add_argument("--model", required=True, help="a model folder (merged, or the base with --adapter)")
    parser.add_argument("--adapter", help="a LoRA adapter folder to apply on top of --model")
    parser.add_argument("--prompt", help="one-shot: print the reply to this prompt and exit")
    parser.add_argument("--system", help="a system prompt for the conversation")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--trust_remote_code", action="store_true", help=REMOTE_CODE_HELP)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise LorakitError(f"--max_new_tokens {args.max_new_tokens} must be at least 1")
    _say_remote_code(args.trust_remote_code, args.model)
    model, tokenizer, template = load_chat_model(args.model, args.adapter, args.trust_remote_code)
    if args.prompt is None:
        chat_loop(model, tokenizer, template, args.system, args.max_new_tokens)
        return
    messages = ([Message("system", args.system)] if args.system else []) + [Message("user", args.prompt)]
    print(generate_reply(model, tokenizer, template, messages, args.max_new_tokens))


COMMANDS = {"preview": _preview, "merge": _merge, "chat": _chat}


def _no_command(argv: list[str]) -> None:
    given = f"unknown command {argv[0]!r}" if argv else "no command given"
    raise LorakitError(f"{given}; start with train, preview, merge or chat (python -m lorakit --help lists them)")


def entry(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(f"{USAGE}\n{__doc__}")
        return 0
    if not argv or argv[0] not in ("train", *COMMANDS):
        return run_cli(lambda: _no_command(argv))
    if argv[0] == "train":
        return main(argv[1:], "lorakit train")
    return run_cli(lambda: COMMANDS[argv[0]](argv[1:]))


if __name__ == "__main__":
    sys.exit(entry(sys.argv[1:]))
