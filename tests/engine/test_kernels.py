"""--enable_liger_kernel computes what the plain path computes: the same loss and the same LoRA gradients.

GPU only (Liger's kernels are Triton): skipped without CUDA or liger-kernel, so CI on the CPU skips it; the
benchmark host runs it (see benchmarks/RESULTS.md). A packed row with restarting position ids exercises the
rotary kernel at positions other than 0..n, and LoRA on every projection runs through the fused SwiGLU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lorakit.config import LoraSettings
from lorakit.engine.kernels import apply_liger_kernel
from lorakit.engine.model import attach_lora
from lorakit.loss import model_loss_sum

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="liger-kernel's Triton kernels need CUDA and the liger-kernel package",
)


def _loss_and_grads(tiny_model: Path, dtype: torch.dtype, liger: bool) -> tuple[float, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    if liger:
        apply_liger_kernel(model)
    model = attach_lora(model, LoraSettings(lora_rank=8, lora_alpha=16, lora_dropout=0.0, lora_target=("all",)), 0)
    for name, param in model.named_parameters():  # LoRA B starts at zero; give it values so every path matters
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    model.cuda()
    generator = torch.Generator().manual_seed(0)
    lengths = [37, 90, 1, 128]
    input_ids = torch.randint(3, model.config.vocab_size, (1, sum(lengths)), generator=generator).cuda()
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    labels = input_ids.clone()
    loss = model_loss_sum(model, {"input_ids": input_ids, "position_ids": position_ids}, labels)
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss), grads


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_liger_path_matches_the_plain_path(tiny_model: Path, dtype: torch.dtype, tolerance: float, monkeypatch):
    from transformers.models.qwen2 import modeling_qwen2

    # Liger's rotary patch replaces a module-level function of transformers: restore it for later tests
    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", modeling_qwen2.apply_rotary_pos_emb)
    plain_loss, plain_grads = _loss_and_grads(tiny_model, dtype, liger=False)
    liger_loss, liger_grads = _loss_and_grads(tiny_model, dtype, liger=True)
    assert modeling_qwen2.apply_rotary_pos_emb.__module__.startswith("liger_kernel")  # the kernels did run
    assert modeling_qwen2.Qwen2MLP.__module__ == modeling_qwen2.__name__  # lorakit put the classes back
    assert liger_loss == pytest.approx(plain_loss, rel=tolerance)
    assert plain_grads.keys() == liger_grads.keys() and len(plain_grads) > 0
    for name, plain in plain_grads.items():
        error = (liger_grads[name] - plain).norm() / plain.norm()
        assert error < tolerance, f"{name}: relative gradient error {error:.2e}"
