"""The hooks' values are read from the device only when a hook reads them (lorakit.hooks).

The step's loss and gradient norm are given here as tensors on PyTorch's `meta` device, which hold no values:
reading one raises, so a hook that does not read them shows that nothing was read (on a GPU: nothing waited)."""

from __future__ import annotations

import pytest
import torch

from lorakit.hooks import Hooks, LiveModel, StepInfo

NO_VALUE = torch.tensor(1.0, device="meta")


def _step(on_step) -> bool:
    hooks = Hooks(on_step, None, LiveModel(None, None, None), total_steps=10)
    return hooks.step(3, 0.3, NO_VALUE, NO_VALUE, 1e-4, tokens=512)


def test_a_hook_that_reads_nothing_reads_nothing_from_the_device():
    seen: list[StepInfo] = []
    assert _step(lambda info: seen.append(info)) is False  # None: go on
    (info,) = seen
    assert (info.step, info.total_steps, info.epoch, info.learning_rate) == (3, 10, 0.3, 1e-4)
    assert info.tokens_per_second > 0


def test_reading_the_loss_or_gradient_norm_reads_the_device_then_and_only_then():
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        _step(lambda info: info.loss)
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        _step(lambda info: info.grad_norm)


def test_a_true_return_asks_to_stop_and_no_hook_costs_nothing():
    assert _step(lambda info: info.step == 3) is True
    assert Hooks(None, None, LiveModel(None, None, None), 10).step(1, 0.1, NO_VALUE, None, 1e-4, 8) is False
