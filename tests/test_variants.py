"""LoRA variants (rsLoRA, LoRA+, DoRA, PiSSA, modules trained in full) on 2 gloo ranks: ZeRO-3 must compute what
ZeRO-2 computes with nothing partitioned; DoRA's magnitude and PiSSA's decomposition, both taken from base weights
that ZeRO-3 partitions at birth, must be what PEFT computes on the whole model; what is saved must give the trained
model's logits where it is loaded or merged. One launch (tests/variants_driver.py) serves the whole module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch import REPO, launch, torchrun
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import make_model
from transformers import AutoModelForCausalLM

from lorakit.errors import LorakitError
from lorakit.merge import merge

pytestmark = pytest.mark.multirank
DS_FILE = REPO / "examples" / "ds_config_zero3.json"
VARIANTS = ("rslora", "loraplus", "dora")


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def variants_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_data: Path, tied_model: Path) -> Path:
    workdir = tmp_path_factory.mktemp("variants")
    script = str(REPO / "tests" / "variants_driver.py")
    command = [*torchrun(2), script, str(workdir), str(tiny_model), str(tiny_data), str(DS_FILE), str(tied_model)]
    launch(command, workdir / "log")
    return workdir


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "run",
    ["rslora_zero3", "loraplus_zero3", "dora_zero3", "dora_per_module", "pissa_zero3", "full_zero3", "tied_zero3",
     "dora_resident", "pissa_resident", "full_resident"],
)  # fmt: skip
def test_zero3_trains_each_variant_as_zero2_does_over_every_step(variants_run: Path, run: str):
    """`dora_per_module`: DeepSpeed's per-module gathering rather than lorakit's whole layers; `_resident`: every
    weight kept whole, so without ZeRO-3's per-unit hooks, through checkpoint saves."""
    variant = run.split("_")[0]
    zero3 = _log(variants_run / run / "trainer_log.jsonl")
    zero2 = _log(variants_run / f"{variant}_zero2" / "trainer_log.jsonl")
    assert len(zero3) == len(zero2) == 6
    for a, b in zip(zero3, zero2):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    assert zero3[-1]["loss"] < zero3[0]["loss"]  # it trains


def test_every_weight_resident_removes_zero3s_unit_hooks_for_each_variant(variants_run: Path):
    metrics = json.loads((variants_run / "metrics.json").read_text())
    assert {name: metrics[name]["unit_hooks"] for name in metrics if name.endswith("_resident")} == {
        "dora_resident": 0, "pissa_resident": 0, "full_resident": 0}  # fmt: skip


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


@pytest.mark.parametrize("run", ["loraplus_zero2", "loraplus_zero3", "dora_zero3", "pissa_zero3", "full_zero3"])
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


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(40).reshape(2, 20) % 300).logits.float()


def _trained_logits(variants_run: Path, run: str) -> torch.Tensor:
    return torch.load(variants_run / "logits.pt")[run]


def test_pissa_under_zero3_starts_where_peft_starts(variants_run: Path, tiny_model: Path):
    """The residual base and A, B that the ZeRO-3 engine made from partitioned weights are PEFT's own (exact SVD)
    on the whole model; so is the starting point, base model's output unchanged (first losses equal)."""
    saved = torch.load(variants_run / "pissa_start.pt")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa", task_type="CAUSAL_LM")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora)
    expected = {n: p.detach() for n, p in peft.named_parameters() if n in saved}
    assert set(saved) == set(expected) and len(saved) == 3 * 14  # base weight, A and B of 2 layers x 7 linears
    original = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5)
        if "base_layer" in name:  # the residual was written back into the partitioned weight
            base = original[name.removeprefix("base_model.model.").replace(".base_layer", "")]
            assert (tensor - base).abs().max() > 1e-3
    first = {run: _log(variants_run / run / "trainer_log.jsonl")[0]["loss"] for run in ("pissa_zero3", "rslora_zero2")}
    assert first["pissa_zero3"] == pytest.approx(first["rslora_zero2"], abs=1e-4)


def test_pissa_adapter_converted_for_the_original_base(variants_run: Path, tiny_model: Path, tmp_path: Path):
    """The default save: plain LoRA of twice the rank, for the unmodified base; loaded there with PEFT, and merged
    into it, it gives the trained model's logits."""
    adapter = variants_run / "pissa_zero3"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    assert not (adapter / "pissa_init").exists()
    trained = _trained_logits(variants_run, "pissa_zero3")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    torch.testing.assert_close(_logits(loaded), trained, rtol=1e-4, atol=1e-4)
    merged = merge(str(tiny_model), str(adapter), str(tmp_path / "merged"))
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(merged)), trained, rtol=1e-4, atol=1e-4)
    checkpoint = json.loads((adapter / "checkpoint-3" / "adapter_config.json").read_text())
    assert checkpoint["r"] == 8  # a checkpoint's adapter is converted too: usable on its own


def test_pissa_adapter_kept_for_the_residual_base(variants_run: Path, tiny_model: Path, tmp_path: Path):
    """--pissa_convert false: PEFT's unconverted adapter, its starting point in pissa_init/ (PEFT's
    path_initial_model_for_weight_conversion folder); merge converts it and gives the trained logits."""
    adapter = variants_run / "pissa_zero2"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (4, "pissa_niter_16")
    start = json.loads((adapter / "pissa_init" / "adapter_config.json").read_text())
    assert (start["r"], start["init_lora_weights"]) == (4, True)
    merged = merge(str(tiny_model), str(adapter), str(tmp_path / "merged"))
    trained = _trained_logits(variants_run, "pissa_zero2")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(merged)), trained, rtol=1e-4, atol=1e-4)
    shutil.rmtree(adapter / "pissa_init")
    with pytest.raises(LorakitError, match="unconverted PiSSA adapter"):
        merge(str(tiny_model), str(adapter), str(tmp_path / "again"))


@pytest.mark.parametrize("run", ["full_zero3", "tied_zero3"])
def test_full_modules_saved_as_modules_to_save(variants_run: Path, tiny_model: Path, tied_model: Path, run: str,
                                               tmp_path: Path):  # fmt: skip
    """--additional_target embed_tokens,lm_head: whole trained matrices in the adapter (a tied head the embedding's
    own), which plain PEFT reloads and merge writes, both giving the trained model's logits."""
    base = tied_model if run.startswith("tied") else tiny_model
    adapter = variants_run / run
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    embed, head = tensors["base_model.model.model.embed_tokens.weight"], tensors["base_model.model.lm_head.weight"]
    original = AutoModelForCausalLM.from_pretrained(base)
    assert embed.shape == head.shape == original.lm_head.weight.shape
    assert (embed - original.model.embed_tokens.weight).abs().max() > 1e-3  # trained
    if run.startswith("tied"):
        assert config["modules_to_save"] == ["model.embed_tokens"] and config["ensure_weight_tying"]
        assert torch.equal(embed, head)
    else:
        assert sorted(config["modules_to_save"]) == ["lm_head", "model.embed_tokens"]
    trained = _trained_logits(variants_run, run)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(original, adapter)), trained, rtol=1e-4, atol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(merge(str(base), str(adapter), str(tmp_path / "merged")))
    assert merged.config.tie_word_embeddings == run.startswith("tied")
    torch.testing.assert_close(_logits(merged), trained, rtol=1e-4, atol=1e-4)
