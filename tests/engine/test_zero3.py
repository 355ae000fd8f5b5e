"""The pieces of whole-layer gathering that need no process group (the 2-rank runs are in tests/test_multirank.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lorakit.engine.zero3 import decoder_layer_classes, make_layer_inputs_require_grad


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
