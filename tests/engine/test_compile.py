"""--torch_compile computes what the eager layers compute: the same loss and the same LoRA gradients.

On the CPU the capture is checked with dynamo's "aot_eager" backend (the graphs and their autograd, without
inductor's code generation, which needs a C++ toolchain and minutes on 2 cores); on a CUDA machine (skipped in CI)
inductor itself runs, in fp32 and bf16. Two packed rows of different lengths exercise the dynamic-shape recompile.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.config import LoraSettings, ModelConfig
from lorakit.engine.kernels import compile_decoder_layers
from lorakit.engine.model import attach_lora
from lorakit.errors import LorakitError
from lorakit.loss import model_loss_sum

CUDA = torch.cuda.is_available()


def _model(tiny_model: Path, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    model = attach_lora(model, LoraSettings(lora_rank=8, lora_alpha=16, lora_dropout=0.0, lora_target=("all",)), 0)
    for name, param in model.named_parameters():  # LoRA B starts at zero; give it values so every path matters
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.to(device)


def _loss_and_grads(model, lengths: list[int], device: str) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(sum(lengths))
    input_ids = torch.randint(3, model.config.vocab_size, (1, sum(lengths)), generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    loss = model_loss_sum(model, {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device)},
                          input_ids.clone())  # fmt: skip
    loss.backward()
    return float(loss), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}


CASES = [("cpu", "aot_eager", torch.float32, 1e-5)]
if CUDA:
    CASES += [("cuda", "inductor", torch.float32, 1e-4), ("cuda", "inductor", torch.bfloat16, 3e-2)]


@pytest.mark.parametrize(("device", "backend", "dtype", "tolerance"), CASES)
def test_compiled_layers_match_the_eager_layers(tiny_model: Path, device, backend, dtype, tolerance):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = _model(tiny_model, dtype, device), _model(tiny_model, dtype, device)
    (line,) = compile_decoder_layers(compiled, backend=backend)
    assert line.startswith("torch.compile: the forward of each of 2 Qwen2DecoderLayers compiled")
    for lengths in ([37, 90, 1], [12, 64, 33, 5], [200]):  # three row lengths: static, then dynamic, then reused
        eager_loss, eager_grads = _loss_and_grads(eager, lengths, device)
        compiled_loss, compiled_grads = _loss_and_grads(compiled, lengths, device)
        assert compiled_loss == pytest.approx(eager_loss, rel=tolerance)
        assert eager_grads.keys() == compiled_grads.keys() and len(eager_grads) == 2 * 7 * 2
        for name, expected in eager_grads.items():
            error = (compiled_grads[name] - expected).norm() / expected.norm()
            assert error < tolerance, f"{lengths} {name}: relative gradient error {error:.2e}"
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] >= 2, dict(stats)  # dynamo did capture the layers: a static and a dynamic graph


def test_torch_compile_is_refused_with_quantisation():
    with pytest.raises(LorakitError, match="--torch_compile with --quantization_bit is not supported"):
        ModelConfig(torch_compile=True, quantization_bit=4)
