from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lorakit.config import LoraSettings
from lorakit.engine.model import linear_module_names, lora_targets, parameter_counts
from lorakit.errors import LorakitError

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def skeleton(tiny_model: Path):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model))


def test_all_means_every_linear_layer_but_the_output_head(skeleton):
    assert linear_module_names(skeleton) == PROJECTIONS
    assert lora_targets(skeleton, LoraSettings(lora_target=("all",))) == PROJECTIONS


def test_reference_targets_are_accepted(skeleton):
    reference = ("q_proj", "v_proj", "k_proj", "gate_proj", "up_proj", "o_proj", "down_proj")
    assert lora_targets(skeleton, LoraSettings(lora_target=reference)) == list(reference)


def test_unknown_target_names_the_missing_and_lists_the_real_ones(skeleton):
    """Reference pitfall 2: GPT-2's c_attn on a Qwen model."""
    with pytest.raises(
        LorakitError,
        match=r"LoRA target module\(s\) \['c_attn'\] not found in the model; its linear "
        r"modules are \['down_proj', 'gate_proj'",
    ):
        lora_targets(skeleton, LoraSettings(lora_target=("q_proj", "c_attn")))


def test_parameter_counts(tiny_model: Path):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    total_before = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    trainable, total = parameter_counts(model)
    assert trainable == 2 * 2 * (64 + 64) and total == total_before + trainable


def test_the_adapter_trains_in_the_base_models_precision(tiny_model: Path):
    """PEFT would upcast a bf16 model's adapter to fp32; ZeRO-3 would then cast every LoRA input and output."""
    from lorakit.engine.model import attach_lora

    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16), LoraSettings(), 0)
    adapter = {p.dtype for name, p in model.named_parameters() if "lora_" in name}
    assert adapter == {torch.bfloat16}
