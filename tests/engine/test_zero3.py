"""The pieces of whole-layer gathering that need no process group (the 2-rank runs are in tests/test_multirank.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit.engine.zero3 import (
    decoder_layer_classes,
    make_layer_inputs_require_grad,
    quiet_deepspeed_bookkeeping,
    remember_module_parameters,
    skip_unit_hooks_when_all_resident,
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


class OffloadLike:
    """DeepSpeed 0.19's DeepSpeedZeRoOffload as far as the hook switch reads it: the module, the two hook lists."""

    def __init__(self, model: torch.nn.Module, calls: list[str]):
        self.module = model
        self.forward_hooks = [m.register_forward_pre_hook(lambda *_: calls.append("fetch")) for m in model]
        self.backward_hooks = [m.register_forward_hook(lambda *_: calls.append("release")) for m in model]


def _zero3_model(persist: list[bool], available: list[bool]) -> torch.nn.Module:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    gathered = []
    for layer, persistent, present in zip(model, persist, available):
        param = layer.weight
        param.ds_persist = persistent
        param.ds_status = ZeroParamStatus.AVAILABLE if present else ZeroParamStatus.NOT_AVAILABLE

        class Handle:
            def wait(self):
                pass

        def all_gather_coalesced(params, _gathered=gathered):
            _gathered.extend(params)
            for p in params:  # DeepSpeed's gather puts each weight in new memory
                p.data = torch.full((2, 2), float(len(_gathered)))
                p.ds_status = ZeroParamStatus.AVAILABLE
            return Handle()

        param.all_gather_coalesced = all_gather_coalesced
    model.gathered = gathered
    return model


@pytest.mark.parametrize(
    ("persist", "available", "removed"),
    [
        ([True, True], [True, True], True),  # every weight resident: the hooks have nothing to do
        ([True, True], [True, False], True),  # resident, one not yet gathered: gathered now, in one collective
        ([True, False], [True, True], False),  # one partitioned weight: the hooks gather it, so they stay
    ],
)
def test_zero3_unit_hooks_go_only_where_every_weight_stays_gathered(persist, available, removed):
    calls: list[str] = []
    model = _zero3_model(persist, available)
    model[1].weight.requires_grad_(False)  # a frozen weight beside a trainable one, as under LoRA
    offload = OffloadLike(model, calls)
    engine = SimpleNamespace(optimizer=SimpleNamespace(parameter_offload=offload))
    assert skip_unit_hooks_when_all_resident(engine) is removed
    model(torch.ones(1, 2))
    assert calls == ([] if removed else ["fetch", "release", "fetch", "release"])
    assert (offload.forward_hooks == [] and offload.backward_hooks == []) is removed
    if removed:
        assert [id(p) for p in model.gathered] == [id(w) for w, a in zip((m.weight for m in model), available) if not a]
        assert list(engine.lorakit_fixed_addresses) == [id(model[0].weight)]  # the trainable one is kept in place
        # a GatheredParameters block (a checkpoint save) released a resident weight: the next forward gathers it
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        model.gathered.clear()
        weight = model[0].weight
        home = weight.data_ptr()
        weight.ds_status, weight.data = ZeroParamStatus.NOT_AVAILABLE, torch.empty(0)  # as DeepSpeed releases it
        model(torch.ones(1, 2))
        assert model.gathered == [weight] and weight.ds_status == ZeroParamStatus.AVAILABLE
        # gathered back into the memory it had (a CUDA graph's address), holding what the gather brought
        assert weight.data_ptr() == home and torch.equal(weight.data, torch.full((2, 2), 1.0))
        model(torch.ones(1, 2))
        assert model.gathered == [model[0].weight]  # nothing missing: nothing gathered


def test_zero3_unit_hooks_stay_without_deepspeeds_hook_lists_or_under_qlora():
    assert not skip_unit_hooks_when_all_resident(SimpleNamespace(optimizer=SimpleNamespace()))  # ZeRO-2
    model = _zero3_model([True, True], [True, True])
    model[0].weight.quant_state = object()  # bitsandbytes' 4-bit weight: its GPU tests have not run this way
    calls: list[str] = []
    engine = SimpleNamespace(optimizer=SimpleNamespace(parameter_offload=OffloadLike(model, calls)))
    assert not skip_unit_hooks_when_all_resident(engine)
