"""LoRA variants (rsLoRA, LoRA+, DoRA) on 2 gloo ranks: ZeRO-3 must compute what ZeRO-2 computes with nothing
partitioned, and DoRA's magnitude, initialised from base weights that ZeRO-3 partitions at birth, must be the
true row norms. One launch (tests/variants_driver.py) serves the whole module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import REPO, launch, torchrun
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.multirank
DS_FILE = REPO / "examples" / "ds_config_zero3.json"
VARIANTS = ("rslora", "loraplus", "dora")


@pytest.fixture(scope="module")
def variants_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_data: Path) -> Path:
    workdir = tmp_path_factory.mktemp("variants")
    script = str(REPO / "tests" / "variants_driver.py")
    launch([*torchrun(2), script, str(workdir), str(tiny_model), str(tiny_data), str(DS_FILE)], workdir / "log")
    return workdir


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("run", ["rslora_zero3", "loraplus_zero3", "dora_zero3", "dora_per_module"])
def test_zero3_trains_each_variant_as_zero2_does_over_every_step(variants_run: Path, run: str):
    """`dora_per_module`: DeepSpeed's per-module gathering rather than lorakit's whole layers."""
    variant = run.split("_")[0]
    zero3 = _log(variants_run / run / "trainer_log.jsonl")
    zero2 = _log(variants_run / f"{variant}_zero2" / "trainer_log.jsonl")
    assert len(zero3) == len(zero2) == 6
    for a, b in zip(zero3, zero2):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    assert zero3[-1]["loss"] < zero3[0]["loss"]  # it trains


def test_variants_train_differently(variants_run: Path):
    """Each flag reaches the model: the same data and seed give other losses after the first update."""
    losses = {v: [r["loss"] for r in _log(variants_run / f"{v}_zero2" / "trainer_log.jsonl")] for v in VARIANTS}
    assert len({tuple(round(x, 4) for x in losses[v][1:]) for v in VARIANTS}) == 3


def test_loraplus_keeps_its_ratio_through_the_schedule(variants_run: Path):
    metrics = json.loads((variants_run / "metrics.json").read_text())
    for stage in (3, 2):
        assert metrics[f"loraplus_zero{stage}"]["lrs"] == pytest.approx([1e-2, 16e-2])
        assert metrics[f"rslora_zero{stage}"]["lrs"] == pytest.approx([1e-2])


def test_dora_magnitude_under_zero3_is_the_base_weights_row_norm(variants_run: Path, tiny_model: Path):
    saved = torch.load(variants_run / "dora_magnitudes.pt")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM")
    expected = {n: p for n, p in get_peft_model(model, lora).named_parameters() if "lora_magnitude_vector" in n}
    assert set(saved) == set(expected) and saved
    for name, magnitude in saved.items():
        assert magnitude.abs().min() > 0  # an empty partition's norm would be 0
        torch.testing.assert_close(magnitude, expected[name].detach().float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("run", ["loraplus_zero2", "loraplus_zero3", "dora_zero3"])
def test_resumed_variant_run_equals_the_uninterrupted_run(variants_run: Path, run: str):
    full, again = (
        _log(variants_run / run / "trainer_log.jsonl"),
        _log(variants_run / f"{run}_resumed" / "trainer_log.jsonl"),
    )
    assert [r["step"] for r in again] == [4, 5, 6]
    for a, b in zip(full[3:], again):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
    first = load_file(variants_run / run / "adapter_model.safetensors")
    second = load_file(variants_run / f"{run}_resumed" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert any("lora_magnitude_vector" in key for key in first) == run.startswith("dora")
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-6, atol=1e-7)
