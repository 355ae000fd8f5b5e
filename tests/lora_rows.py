"""The tiny model with LoRA on every linear, lora_B given values, and one packed row's loss and LoRA gradients:
what the compiled-layer tests (tests/engine/test_compile.py, tests/engine/test_cuda_graphs.py) compare paths on."""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.config import LoraSettings
from lorakit.engine.model import attach_lora
from lorakit.loss import model_loss_sum


def lora_model(tiny_model: Path, dtype: torch.dtype, device: str, variant: str = "lora", dropout: float = 0.0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    if variant == "checkpointed":  # as lorakit turns it on (lorakit.engine.build_engine): recompute in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = LoraSettings(lora_rank=8, lora_alpha=16, lora_dropout=dropout, lora_target=("all",),
                            use_dora=variant == "dora", use_rslora=variant == "rslora")  # fmt: skip
    model = attach_lora(model, settings, 0)
    model.train()
    for name, param in model.named_parameters():  # LoRA B starts at zero; give it values so every path matters
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.to(device)


def loss_and_grads(model, lengths: list[int], device: str) -> tuple[float, dict[str, torch.Tensor]]:
    """One packed row of examples of these lengths (its tokens seeded by them): the summed loss and every trained
    tensor's gradient."""
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(sum(lengths))
    input_ids = torch.randint(3, model.config.vocab_size, (1, sum(lengths)), generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    loss = model_loss_sum(model, {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device)},
                          input_ids.clone())  # fmt: skip
    loss.backward()
    return float(loss.detach()), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
