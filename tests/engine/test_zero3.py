"""The pieces of whole-layer gathering that need no process group (the 2-rank runs are in tests/test_multirank.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lorakit.engine.zero3 import decoder_layer_classes, make_layer_inputs_require_grad, remember_module_parameters


def test_decoder_layers_are_found_by_their_transformers_name(tiny_model: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert [c.__name__ for c in decoder_layer_classes(model)] == ["Qwen2DecoderLayer"]
    model._no_split_modules = None  # a model that names none: no leaves, DeepSpeed's default stays
    assert decoder_layer_classes(model) == []


def test_the_first_layer_input_requires_a_gradient_only_while_autograd_records(tiny_model: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.requires_grad_(False)  # frozen, as under LoRA: the embedding output would need no gradient
    seen = []
    model.model.layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    make_layer_inputs_require_grad(model)
    ids = torch.arange(3, 12)[None]
    model(input_ids=ids)
    with torch.no_grad():
        model(input_ids=ids)
    assert [h.requires_grad for h in seen] == [True, False]


def test_deepspeed_lists_a_modules_parameters_once_and_its_external_ones_every_time():
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    assert remember_module_parameters() and remember_module_parameters()  # once per process; a second call keeps it
    layer = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sequential(torch.nn.Linear(3, 2)))
    external: list[tuple[str, torch.nn.Parameter]] = []
    layer.ds_external_parameters = lambda: iter(external)  # DeepSpeed gives every module this at initialisation
    every, walks = list(layer.parameters()), []
    named_parameters = layer.named_parameters
    layer.named_parameters = lambda recurse=True: walks.append(recurse) or named_parameters(recurse=recurse)
    for _ in range(3):
        assert list(coordinator.iter_params(layer, recurse=True)) == every
    assert list(coordinator.iter_params(layer, recurse=False)) == []  # a container owns none itself
    assert walks == [True, False]  # listed once for each way of asking, not on every fetch
    shared = torch.nn.Parameter(torch.zeros(1))
    external.append(("tied", shared))  # registered by DeepSpeed later (a weight used by another module)
    assert list(coordinator.iter_params(layer, recurse=True))[-1] is shared
    other = torch.nn.Linear(2, 2)  # another module is listed afresh
    other.ds_external_parameters = lambda: iter([])
    assert list(coordinator.iter_params(other)) == [other.weight, other.bias]
