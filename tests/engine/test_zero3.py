"""The pieces of whole-layer gathering that need no process group (the 2-rank runs are in tests/test_multirank.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lorakit.engine.zero3 import (
    decoder_layer_classes,
    make_layer_inputs_require_grad,
    quiet_deepspeed_bookkeeping,
    remember_module_parameters,
    walk_only_parameter_owners,
)


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


class FlaggedDict(dict):
    """DeepSpeed's ZeROOrderedDict as far as the forward flag goes: a dict that takes an attribute."""


class EngineLike:
    """DeepSpeed 0.19's prologue and epilogue as far as the walk goes: flag every module's parameter dict."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.walked = module, []

    def _forward_prologue(self, inputs, kwargs):
        for module in self.module.modules():
            module._parameters = (
                module._parameters if isinstance(module._parameters, FlaggedDict) else FlaggedDict(module._parameters)
            )
            module._parameters._in_forward = True
            self.walked.append(module)

    def _forward_epilogue(self):
        for module in self.module.modules():
            module._parameters._in_forward = False


def test_the_forward_flag_walk_goes_over_the_modules_that_own_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(3, 2)))
    engine = EngineLike(model)
    assert walk_only_parameter_owners(engine)
    engine._forward_prologue((), {})
    owners = [model[0], model[1][1]]
    assert engine.walked == owners  # the containers and the ReLU own nothing to flag
    assert all(m._parameters._in_forward for m in owners)
    assert "modules" not in vars(model) and len(list(model.modules())) == 5  # the model's own walk is back
    engine._forward_epilogue()
    assert not any(m._parameters._in_forward for m in owners)


def test_the_walk_is_changed_only_where_deepspeeds_functions_walk_for_the_flag_alone():
    from deepspeed.runtime.engine import DeepSpeedEngine

    real = DeepSpeedEngine.__new__(DeepSpeedEngine)  # the installed DeepSpeed's functions, no process group needed
    torch.nn.Module.__init__(real)
    real.module = torch.nn.Linear(2, 2)
    assert walk_only_parameter_owners(real)  # this speed path is live with the DeepSpeed lorakit runs on

    class WalksForMore(EngineLike):
        def _forward_prologue(self, inputs, kwargs):
            self.hooked = list(self.module.modules())  # another use of the walk: must stay the model's own
            for module in self.module.modules():
                module._parameters._in_forward = True

    assert not walk_only_parameter_owners(WalksForMore(torch.nn.Linear(2, 2)))


def test_deepspeeds_per_call_bookkeeping_is_off_and_its_forced_messages_still_print(monkeypatch, capsys):
    import deepspeed.comm as ds_dist
    import deepspeed.utils.nvtx as nvtx
    from deepspeed.runtime.zero import partition_parameters

    assert "partition_parameters" in quiet_deepspeed_bookkeeping()
    assert quiet_deepspeed_bookkeeping() == []  # once per process
    assert nvtx.enable_nvtx is False
    asked = []
    monkeypatch.setattr(ds_dist, "get_rank", lambda: asked.append(1) or 0)
    partition_parameters.print_rank_0("routine")
    assert asked == [] and capsys.readouterr().out == ""  # nothing to print: the rank is not asked for
    partition_parameters.print_rank_0("asked for", force=True)
    assert asked == [1] and capsys.readouterr().out == "asked for\n"
