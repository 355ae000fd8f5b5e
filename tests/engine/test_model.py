from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lorakit.config import LoraSettings
from lorakit.engine.model import (
    attach_lora,
    linear_module_names,
    lora_targets,
    parameter_counts,
    recompute_first_layers_only,
)
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


def _mlp_runs_and_grads(tiny_model: Path, checkpointed_layers: int | None, checkpointing: bool):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if checkpointing:  # as lorakit.engine.build_engine turns it on
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        recompute_first_layers_only(model, checkpointed_layers)
    model = attach_lora(model, LoraSettings(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target=("all",)), 0)
    model.train()
    runs = [0, 0]
    for index, layer in enumerate(model.base_model.model.model.layers):  # a sub-module: called again in a recompute
        layer.mlp.register_forward_pre_hook(lambda *_, i=index: runs.__setitem__(i, runs[i] + 1))
    input_ids = torch.arange(3, 60)[None]
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return runs, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_the_memory_plans_partial_checkpointing_recomputes_only_the_first_layers(tiny_model: Path):
    """The memory plan recomputes the fewest layers that fit (lorakit.engine.memory): the first k run twice, the
    others once, and the gradients are those of no checkpointing (recomputation changes memory, not numbers)."""
    plain_runs, plain = _mlp_runs_and_grads(tiny_model, None, checkpointing=False)
    assert plain_runs == [1, 1]
    for layers, expected_runs in ((1, [2, 1]), (None, [2, 2]), (0, [1, 1])):
        runs, grads = _mlp_runs_and_grads(tiny_model, layers, checkpointing=True)
        assert runs == expected_runs, layers
        for name, grad in plain.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)
