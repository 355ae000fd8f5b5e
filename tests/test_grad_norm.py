"""The gradient norm lorakit logs and stops on under --zero_stage 0 in fp32, where DeepSpeed clips inside its own
step and keeps no norm, and under ZeRO-2 in bf16 without DeepSpeed's overflow check (one process, DeepSpeed on the
CPU: tests/grad_norm_driver.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from launch import REPO, finish


def one_process_command(tiny_model: Path, tiny_data: Path, folder: Path) -> list[str]:
    """The driver, writing what it saw to folder/seen.json (conftest.one_process_runs starts it)."""
    return [sys.executable, str(REPO / "tests" / "grad_norm_driver.py"), str(folder), str(tiny_model)]


@pytest.fixture(scope="module")
def seen(one_process_runs: dict) -> dict:
    process, folder = one_process_runs[__name__]  # one_process_command's, started beside the other modules' runs
    finish(process, folder / "stderr")
    return json.loads((folder / "seen.json").read_text())


def test_the_logged_norm_is_that_of_the_gradients_before_clipping(seen: dict):
    clipped = seen["clipped"]
    assert clipped["error"] is None and len(clipped["logged"]) == len(clipped["norms"]) == 3
    assert all(math.isfinite(norm) and norm > 0.1 for norm in clipped["logged"])  # above --max_grad_norm: clipped
    assert clipped["logged"] == pytest.approx([round(norm, 4) for norm in clipped["norms"]], abs=1e-4)


def test_a_gradient_that_is_not_finite_stops_the_run_at_its_step(seen: dict):
    """Step 2's loss is finite and its gradient is not: the run stops at step 2, naming the norm."""
    poisoned = seen["poisoned"]
    assert poisoned["error"] is not None and poisoned["error"].startswith("step 2: the loss ("), poisoned["error"]
    assert "or gradient norm (inf) is not finite; stopped without saving" in poisoned["error"]


def test_bf16_zero2_leaves_the_overflow_check_to_lorakit(seen: dict):
    """DeepSpeed's per-gradient overflow check runs where a DeepSpeed file keeps it, and is off by lorakit's default
    (lorakit.engine.deepspeed_config.leave_overflow_check_to_lorakit) with the same updates to the last bit."""
    checked, unchecked = seen["bf16_checked"], seen["bf16_unchecked"]
    assert checked["checks"] == [True] * 3 and unchecked["checks"] == [False] * 3
    assert checked["error"] is None and unchecked["error"] is None
    assert checked["logged"] == unchecked["logged"] and checked["losses"] == unchecked["losses"]
    assert checked["adapter"] is not None and checked["adapter"] == unchecked["adapter"]


def test_without_deepspeed_s_overflow_check_a_gradient_that_is_not_finite_still_stops_the_run(seen: dict):
    poisoned = seen["bf16_poisoned"]
    assert poisoned["checks"] == [False, False] and poisoned["adapter"] is None
    assert poisoned["error"] is not None and poisoned["error"].startswith("step 2: the loss ("), poisoned["error"]
    assert "or gradient norm (inf) is not finite; stopped without saving" in poisoned["error"]
