"""When lorakit uses liger-kernel: an explicit flag is obeyed, unset means wherever the kernels can run."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lorakit.engine.kernels import use_liger_kernel


@pytest.mark.parametrize(
    "requested, cuda, installed, expected, says",
    [
        (None, False, False, False, None),  # the CPU: plain PyTorch, nothing to say
        (None, True, False, False, "liger-kernel package"),  # a GPU without the extra: one line on what it misses
        (False, True, False, False, None),
        (True, True, False, True, None),  # validate has already refused this combination (tests/test_bad_input.py)
    ],
)
def test_choice(monkeypatch, requested, cuda, installed, expected, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "liger_kernel" and not installed else real_find_spec(name, *a),
    )
    chosen, lines = use_liger_kernel(requested, "qwen2")
    assert chosen is expected
    assert (says in lines[0]) if says else lines == []
