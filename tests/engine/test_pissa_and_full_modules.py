"""PiSSA's saved forms and --additional_target's module matching, on one process (no DeepSpeed). The 2-rank
ZeRO-3 behaviour is in tests/test_variants.py."""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit.checkpoint import ADAPTER_WEIGHTS, save_adapter
from lorakit.config import Config, LoraSettings
from lorakit.engine.memory import ModelShape
from lorakit.engine.model import attach_lora, lora_targets
from lorakit.engine.variants import additional_targets, initial_adapter
from lorakit.errors import LorakitError
from lorakit.merge import merge
from lorakit.pissa import PissaStart
from lorakit.resume import lora_variants


def _train_a_little(model: torch.nn.Module) -> None:
    """Move every trainable tensor as training would, deterministically."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(30).reshape(2, 15)).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_lorakit_converts_pissa_as_peft_documents(tiny_model: Path, tmp_path: Path, rslora: bool):
    """PEFT's route: save the initial adapter with init_lora_weights=True, then save_pretrained with
    path_initial_model_for_weight_conversion. lorakit's conversion writes the same tensors and settings."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_4",
                      use_rslora=rslora, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora)
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "pissa_init")
    model.peft_config["default"].init_lora_weights = "pissa_niter_4"
    start = PissaStart(initial_adapter(model), convert=True)
    _train_a_little(model)
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init"))
    save_adapter(model, tmp_path / "lorakit", True, start)
    ours, peft = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("lorakit", "peft"))
    assert ours.keys() == peft.keys() and len(ours) == 8
    for key in ours:
        assert torch.equal(ours[key], peft[key])
    settings = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("lorakit", "peft")]
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert settings[0][key] == pytest.approx(settings[1][key])
    assert settings[0]["r"] == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_converted_pissa_on_the_original_base_is_as_close_as_peft_s_in_the_training_dtype(
    tiny_model: Path, tmp_path: Path, dtype: torch.dtype
):
    """In bf16 (fp16) training PEFT's conversion concatenates the trained A, B with A0, B0 loaded back in fp32, so
    its file is fp32, where lorakit's keeps the adapter's dtype. No precision is lost: PEFT casts A0, B0 to the
    base's dtype right after the decomposition (autocast_adapter_dtype=False, as lorakit trains), so both files
    hold the same numbers, give the same logits on the original base, and stay within twice the trained model's
    own rounding in that dtype (its logits against the same weights computed in fp32)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    model = attach_lora(base, LoraSettings(lora_rank=4, lora_alpha=8, pissa_init=True), seed=5)
    start = PissaStart(initial_adapter(model), convert=True)
    assert {t.dtype for t in start.initial.values()} == {dtype}  # the start the trained model moved from
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "pissa_init")
    model.peft_config["default"].init_lora_weights = "pissa_niter_16"
    _train_a_little(model)
    trained, exact = _logits(model).float(), _logits(copy.deepcopy(model).float())
    save_adapter(model, tmp_path / "lorakit", True, start)
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init"))
    ours, peft = (load_file(tmp_path / d / ADAPTER_WEIGHTS) for d in ("lorakit", "peft"))
    assert {t.dtype for t in ours.values()} == {dtype} and {t.dtype for t in peft.values()} == {torch.float32}
    assert ours.keys() == peft.keys() and all(torch.equal(ours[k].float(), peft[k]) for k in ours)
    loaded = [_logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype),
                                                tmp_path / d)).float() for d in ("lorakit", "peft")]  # fmt: skip
    assert torch.equal(loaded[0], loaded[1])
    noise, error = (trained - exact).abs(), (loaded[0] - trained).abs()
    moved = (_logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)).float() - trained).abs()
    assert error.mean() <= 2 * noise.mean() + 1e-6 and error.max() <= 2 * noise.max() + 1e-5
    assert error.mean() < moved.mean() / 2  # the bound is well below what training changed


def test_converted_pissa_keeps_doras_magnitudes_and_full_modules(tiny_model: Path, tmp_path: Path):
    """Where PEFT's conversion keeps lora_A/lora_B only, lorakit's keeps every other trained tensor: the converted
    adapter on the original base is the trained model."""
    settings = LoraSettings(lora_rank=4, lora_alpha=8, use_dora=True, pissa_init=True,
                            additional_target=("lm_head",))  # fmt: skip
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model), settings, seed=5)
    start = PissaStart(initial_adapter(model), convert=True)
    _train_a_little(model)
    trained = _logits(model)
    save_adapter(model, tmp_path, True, start)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in saved) and "base_model.model.lm_head.weight" in saved
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path)
    torch.testing.assert_close(_logits(loaded), trained, rtol=1e-4, atol=1e-4)


def test_unconverted_pissa_with_full_modules_saves_and_merges(tiny_model: Path, tmp_path: Path):
    """--pissa_convert false with --additional_target: pissa_init/ is a whole PEFT adapter (PEFT's modules_to_save
    needs a tensor per trained module; saving it raised KeyError), and merge, which converts from it, gives the
    trained model."""
    settings = LoraSettings(lora_rank=4, lora_alpha=8, use_dora=True, pissa_init=True,
                            additional_target=("lm_head",))  # fmt: skip
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model), settings, seed=5)
    start = PissaStart(initial_adapter(model), convert=False)
    _train_a_little(model)
    trained = _logits(model)
    save_adapter(model, tmp_path / "adapter", True, start)
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter" / "pissa_init" / ADAPTER_WEIGHTS)
    merged = merge(str(tiny_model), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(merged)), trained, rtol=1e-4, atol=1e-4)


def test_merge_converts_from_a_pissa_init_folder_peft_saved(tiny_model: Path, tmp_path: Path):
    """PEFT's documented route saves the whole initial model in pissa_init/, DoRA's magnitudes and modules_to_save
    included: merge converts with its A0 and B0 alone (a magnitude was taken for a B0 and failed to concatenate)."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_4",
                      use_dora=True, modules_to_save=["lm_head"], task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora)
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "adapter" / "pissa_init")
    model.peft_config["default"].init_lora_weights = "pissa_niter_4"
    _train_a_little(model)
    trained = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    assert any("lora_magnitude_vector" in k for k in load_file(tmp_path / "adapter" / "pissa_init" / ADAPTER_WEIGHTS))
    merged = merge(str(tiny_model), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(merged)), trained, rtol=1e-4, atol=1e-4)


def test_pissa_seeds_each_layer_so_the_decomposition_repeats(tiny_model: Path):
    """The fast SVD's random start comes from --seed and the layer, not from the global RNG's history."""
    settings = LoraSettings(lora_rank=4, pissa_init=True, pissa_iter=2)
    first = initial_adapter(attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model), settings, seed=5))
    torch.randn(1000)  # a different global RNG state
    again = initial_adapter(attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model), settings, seed=5))
    other = initial_adapter(attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model), settings, seed=6))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def _targets(model: torch.nn.Module, *names: str, lora: tuple[str, ...] = ("all",)) -> list[str]:
    settings = LoraSettings(lora_target=lora, additional_target=names)
    return additional_targets(model, settings, lora_targets(model, settings))


def test_additional_targets_match_whole_name_components(tiny_model: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert _targets(model, "embed_tokens", "lm_head") == ["model.embed_tokens", "lm_head"]
    assert _targets(model, "norm") == ["model.norm"]  # not input_layernorm / post_attention_layernorm
    assert _targets(model, "input_layernorm") == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]
    with pytest.raises(LorakitError, match=r"--additional_target embed matches no module.*embed_tokens, gate_proj"):
        _targets(model, "embed")
    with pytest.raises(LorakitError, match="--additional_target q_proj is .* a module LoRA adapts"):
        _targets(model, "q_proj")
    with pytest.raises(LorakitError, match="--additional_target layers.0 is .*model.layers.0.self_attn.q_proj"):
        _targets(model, "layers.0")
    with pytest.raises(LorakitError, match="--additional_target down_proj is inside model.layers.0.mlp, which"):
        _targets(model, "mlp", "down_proj", lora=("q_proj",))  # PEFT's wrapper inside a wrapper: no adapter saved
    with pytest.raises(LorakitError, match="--additional_target down_proj is inside model.layers.0.mlp, which"):
        _targets(model, "down_proj", "mlp", lora=("q_proj",))
    assert _targets(model, "q_proj", lora=("v_proj",)) == ["model.layers.0.self_attn.q_proj",
                                                           "model.layers.1.self_attn.q_proj"]  # fmt: skip


def test_memory_plan_counts_full_modules_with_their_optimizer_state():
    shape = ModelShape(layers=28, hidden=3584, intermediate=18944, vocab=152064, parameters=7_600_000_000,
                       dtype_bytes=2)  # fmt: skip
    full = ModelShape(**{**shape.__dict__, "trained_full": 2 * 152064 * 3584})
    extra = full.fixed_bytes(True, 4) - shape.fixed_bytes(True, 4)
    assert extra == pytest.approx(2 * 152064 * 3584 * 16 / 4, rel=1e-6)  # 2 + 2 + 12 bytes a weight, over 4 GPUs
    assert full.fixed_bytes(False, 4) - shape.fixed_bytes(False, 4) > extra  # ZeRO-2 keeps the copy whole


def test_the_resume_fingerprint_names_pissa_and_full_modules():
    assert lora_variants(Config()) == {}
    flags = {"pissa_init": True, "pissa_iter": -1, "additional_target": ("lm_head",), "pissa_convert": False}
    assert lora_variants(Config.from_flat(flags)) == {"pissa": "pissa", "additional_target": ["lm_head"]}
