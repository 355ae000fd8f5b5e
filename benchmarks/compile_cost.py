"""What the compiled decoder layers cost at a run's start, by phase: one GPU, the Qwen2.5-7B layer's shapes (2 layers,
a small vocabulary), LoRA on every linear as the reference's flags, lorakit's compile_decoder_layers, three steps of
packed rows like a 4-GPU reference step's share (~2,300 tokens). An experiment for issue 11's whole-job target.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/compile_cost.py ['{"triton.autotune_pointwise": false}']

The JSON argument sets torch._inductor.config options for this process. Prints one JSON line: each step's seconds
(the first holds the compile), lorakit's compile_seconds, and torch's timers over 0.3 s.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.config import LoraSettings  # noqa: E402
from lorakit.engine.kernels import compile_decoder_layers, compile_seconds  # noqa: E402
from lorakit.engine.model import attach_lora  # noqa: E402
from lorakit.loss import model_loss_sum  # noqa: E402


def set_inductor_options(options: dict) -> None:
    for key, value in options.items():
        owner, *path, last = [torch._inductor.config, *key.split(".")]
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, last, value)


def build_model(layers: int = 2) -> torch.nn.Module:
    """`layers` Qwen2.5-7B decoder layers (a small vocabulary) on the GPU in bf16, LoRA as the reference's flags."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=1024, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                         rope_theta=1e6)  # fmt: skip
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    model = attach_lora(model, LoraSettings(lora_rank=8, lora_alpha=32, lora_dropout=0.1, lora_target=targets), 0)
    model.train()
    return model


def step_seconds(model: torch.nn.Module, lengths: list[int]) -> float:
    started = time.perf_counter()
    input_ids = torch.randint(3, 1024, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    inputs = {"input_ids": input_ids.cuda(), "position_ids": position_ids.cuda()}
    model_loss_sum(model, inputs, input_ids.clone()).backward()
    torch.cuda.synchronize()
    return round(time.perf_counter() - started, 2)


if __name__ == "__main__":
    options = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    set_inductor_options(options)
    model = build_model()
    compile_decoder_layers(model)
    steps = [step_seconds(model, lengths) for lengths in ([768, 896, 640], [1152, 896, 256], [512] * 4)]
    timers = torch._dynamo.utils.compilation_time_metrics
    phases = {key: round(sum(values), 2) for key, values in timers.items() if sum(values) > 0.3}
    threads = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "default")
    print(json.dumps({"options": options, "compile_threads": threads, "step_seconds": steps,
                      "compile_seconds": round(compile_seconds(), 2), "phases": phases}))  # fmt: skip
