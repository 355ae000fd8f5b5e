"""Frozen linear layers that let ZeRO-3 free their gathered weights during the forward.

Under ZeRO-3 a partitioned weight is gathered before its module runs and released after (DeepSpeed sets
`param.data` to an empty tensor), and gathered again before its backward. An eager `nn.Linear` breaks that: autograd
saves `weight.t()`, a view with its own reference to the gathered storage, so releasing the parameter frees nothing
and every gathered weight stays alive until its backward: after the forward, the whole model on every rank. Found on
4 x H200: the Qwen2.5-32B, frozen weights partitioned, no layer recomputed, ran out of memory in its first eager
forward (128 GiB allocated, the memory plan 104; compiled layers: 81 GiB measured); on 2 gloo ranks a tiny Qwen2
held every gathered linear weight after the forward (28.8 of 29.4 MB), the all-gather fetch as much as the
all-reduce one (benchmarks/RESULTS.md, session 15). Compiled layers do not leak (AOTAutograd saves the parameter
itself) and recomputed layers save nothing, but the output head runs eager outside both. Session 3 had turned
DeepSpeed's memory-efficient linear off under lorakit's whole-layer gathering (lorakit.engine.deepspeed_config: the
weights are gathered again before a layer's backward, so torch's linear computes the same), missing this: its
Python autograd function around every linear, LoRA's included, saved the weight parameter too.

FrozenWeightLinear saves the parameter itself, as AOTAutograd does: DeepSpeed's release then frees the storage and
its gather before the backward refills it. The forward is torch's own `F.linear` (the same kernel) and the backward
the input's gradient `grad @ W`, the matmul torch's linear backward runs. DeepSpeed's own answer,
`zero3_linear_wrap`, adds the bias after the matmul (not bitwise the same in bf16 with Qwen's q/k/v biases) and also
saves the input (more memory with LoRA dropout). Only frozen plain `nn.Linear` modules (not a quantised subclass, not
a module trained in full) are changed, none inside a compiled decoder layer (its graph would differ from the
compile warm-up's, and compiled layers do not leak), and none where DeepSpeed's memory-efficient linear runs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F


class FrozenWeightLinear(torch.autograd.Function):
    """`F.linear(x, weight, bias)` for a weight and bias that receive no gradient, saving the weight parameter (not
    a view of it) for the input's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        # the weight in the gradient's dtype: under autocast the forward's matmul ran in the cast dtype too
        return (grad.matmul(weight.to(grad.dtype)) if ctx.needs_input_grad[0] else None), None, None


def frozen_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The module's forward; torch's own linear again should research code unfreeze the weight or bias later."""
    bias = module.bias
    if module.weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.linear(x, module.weight, bias)
    return FrozenWeightLinear.apply(x, module.weight, bias)


def save_frozen_weights_by_reference(model: torch.nn.Module, skip: list[torch.nn.Module]) -> list[str]:
    """Every frozen plain `nn.Linear` of `model` outside the modules in `skip` (compiled decoder layers) runs
    FrozenWeightLinear (an instance's `forward`: DeepSpeed's hooks around the module call stay); the log line."""
    skipped = {id(m) for outer in skip for m in outer.modules()}
    changed = 0
    for module in model.modules():
        frozen = type(module) is torch.nn.Linear and not module.weight.requires_grad
        if frozen and (module.bias is None or not module.bias.requires_grad) and id(module) not in skipped:
            module.forward = functools.partial(frozen_forward, module)  # a partial pickles; a bound method does not
            changed += 1
    if not changed:
        return []
    return [f"ZeRO-3: {changed} frozen linear layers save their weight, not a view of it, for the backward, so a "
            "released gathered weight is freed during the forward (lorakit.engine.frozen_linear)"]  # fmt: skip
