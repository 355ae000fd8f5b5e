"""lorakit.engine.graph_trees: the faster lookups give torch's own answers on every kind of path entry (CPU tensors:
the lookups read addresses and reference counts, not the GPU)."""

from __future__ import annotations

import types

import pytest
import torch
from torch._inductor import cudagraph_trees as trees

from lorakit.engine import graph_trees


def torch_own(name: str):
    own = graph_trees.TORCH_OWN.get(name) or trees.CUDAGraphNode.__dict__[name]
    return own.__func__ if isinstance(own, staticmethod) else own


def keep_inductors_options():
    """Inductor's options as they are, restored after: compile_decoder_layers in a CUDA graphs mode turns the warning
    on many graph shapes off (every graphs run of lorakit does), an option inductor's cache keys on, and a later
    test's compile in this process (test_warmup's cache test) then missed what its warm-up process had compiled.
    Through inductor's own patch, which restores an option set to None (monkeypatch could not, on torch 2.11)."""
    option = "triton.cudagraph_dynamic_shape_warn_limit"
    return torch._inductor.config.patch({option: torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit})


def dead_reference(address: int) -> trees.StorageWeakRefWrapper:
    """A reference whose storage is gone, recorded at `address`: a graph's output freed, its memory reused."""
    gone = torch.empty(8)
    reference = trees.StorageWeakRefWrapper(gone)
    del gone
    reference._data_ptr = address
    return reference


@pytest.fixture
def path():
    """Tensors kept alive, probes, and a three-graph path: live, dead, None, an alias and an empty storage."""
    alive, other, shared, reused = torch.empty(16), torch.empty(16), torch.empty(32), torch.empty(8)
    checked, counted = torch.empty(4), torch.empty(4)
    view = shared[4:]  # the same storage as `shared`: one address
    empty = torch.empty(0)
    wrap = trees.StorageWeakRefWrapper
    levels = [
        [wrap(alive), None, dead_reference(other.untyped_storage().data_ptr())],
        [dead_reference(alive.untyped_storage().data_ptr()), wrap(shared), None, wrap(empty)],
        [wrap(other), wrap(view), dead_reference(12345), dead_reference(reused.untyped_storage().data_ptr())],
        # a graph's outputs carry an extra check (torch: live while the check fails, else counted with 2 more refs)
        [wrap(checked, extra_ref_check=lambda: False), wrap(counted, extra_ref_check=lambda: True)],
    ]
    probes = {"live first": alive, "dead first, live later": other, "alias of a live output": view,
              "whole of a live output": shared, "empty storage": empty, "never recorded": torch.empty(4),
              "only a dead output's address": reused, "an extra-checked output": checked,
              "an extra-counted output": counted}  # fmt: skip
    return types.SimpleNamespace(path_weakrefs=levels), probes, (alive, other, shared, view, empty, reused, checked,
                                                                 counted)  # fmt: skip


@pytest.mark.parametrize(
    "probe",
    ["live first", "dead first, live later", "alias of a live output", "whole of a live output", "empty storage",
     "never recorded", "only a dead output's address", "an extra-checked output", "an extra-counted output"],
)  # fmt: skip
def test_each_lookup_answers_as_torchs_own(path, probe):
    node, probes, _ = path
    tensor = probes[probe]
    assert graph_trees.is_recorded_output(node, tensor) == torch_own("_is_cuda_graph_recorded_tensor")(node, tensor)
    own = torch_own("_is_alias_of_live_recorded_tensor")(node, tensor)
    assert graph_trees.live_output_alias(node, tensor) == own


def test_the_table_holds_each_kind_of_answer(path):
    """The path above reaches every branch: a match at depth 0, one past a dead entry at the same address, none."""
    node, probes, _ = path
    answers = {name: graph_trees.live_output_alias(node, tensor) for name, tensor in probes.items()}
    assert answers["live first"] == (0, 0)
    assert answers["dead first, live later"] == (2, 0)  # (0, 2) holds its address, dead
    assert answers["whole of a live output"] == (1, 1)  # before (2, 1), the view's same storage
    assert answers["never recorded"] is None
    assert graph_trees.is_recorded_output(node, probes["dead first, live later"])
    assert not graph_trees.is_recorded_output(node, probes["never recorded"])
    assert graph_trees.is_recorded_output(node, probes["only a dead output's address"])  # the pool keeps it
    assert answers["only a dead output's address"] is None
    assert answers["an extra-checked output"] == (3, 0)  # its check failing keeps it live, as torch has it


def test_liveness_answers_as_torchs_own_and_follows_the_tensors(path):
    node, _, _ = path
    assert graph_trees.path_liveness(node.path_weakrefs) == torch_own("_get_liveness")(node.path_weakrefs)
    first, second = torch.empty(8), torch.empty(8)
    levels = [[trees.StorageWeakRefWrapper(first), None], [trees.StorageWeakRefWrapper(second)]]
    assert graph_trees.path_liveness(levels) == [[True, False], [True]]
    del second
    assert graph_trees.path_liveness(levels) == [[True, False], [False]] == torch_own("_get_liveness")(levels)
    assert graph_trees.path_liveness([]) == []


def test_installed_on_torchs_graph_node_once():
    assert graph_trees.faster_graph_tree_lookups() is None
    assert trees.CUDAGraphNode._is_cuda_graph_recorded_tensor is graph_trees.is_recorded_output
    assert trees.CUDAGraphNode._is_alias_of_live_recorded_tensor is graph_trees.live_output_alias
    assert trees.CUDAGraphNode._get_liveness is graph_trees.path_liveness
    own = dict(graph_trees.TORCH_OWN)
    assert graph_trees.faster_graph_tree_lookups() is None
    assert graph_trees.TORCH_OWN == own  # a second call keeps torch's own, not lorakit's, as the originals
    for function in own.values():  # torch's, so the tables above compare lorakit's lookups with torch's
        assert getattr(function, "__func__", function).__module__ == "torch._inductor.cudagraph_trees"


@pytest.mark.parametrize("mode, installed", [("reduce-overhead", True), ("default", False)])
def test_compiling_the_layers_for_graphs_installs_them(monkeypatch, mode, installed):
    """compile_decoder_layers installs the lookups where its layers replay as CUDA graphs (torch.compile is lazy:
    nothing compiles here)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lorakit.engine.kernels import compile_decoder_layers

    node = trees.CUDAGraphNode
    for name in ("_is_cuda_graph_recorded_tensor", "_is_alias_of_live_recorded_tensor", "_get_liveness"):
        monkeypatch.setattr(node, name, graph_trees.TORCH_OWN.get(name, node.__dict__[name]))  # restored after
    monkeypatch.setattr(node, graph_trees.PATCHED, False, raising=False)
    config = Qwen2Config(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    with keep_inductors_options():
        lines = compile_decoder_layers(Qwen2ForCausalLM(config), mode=mode)
    assert (node._is_alias_of_live_recorded_tensor is graph_trees.live_output_alias) is installed
    assert not any("at torch's pace" in line for line in lines)


def test_an_untested_torch_keeps_its_own_lookups_and_the_log_says_so(monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lorakit.engine.kernels import compile_decoder_layers

    node = trees.CUDAGraphNode
    for name in graph_trees.METHODS:
        monkeypatch.setattr(node, name, graph_trees.TORCH_OWN.get(name, node.__dict__[name]))  # restored after
    monkeypatch.setattr(node, graph_trees.PATCHED, False, raising=False)
    monkeypatch.setattr(torch, "__version__", "2.14.0+cu130")
    config = Qwen2Config(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    with keep_inductors_options():
        lines = compile_decoder_layers(Qwen2ForCausalLM(config), mode="reduce-overhead")
    assert node._is_alias_of_live_recorded_tensor is not graph_trees.live_output_alias
    assert lines[-1] == ("torch.compile: CUDA graphs record each new row length at torch's pace (lorakit's lookups "
                         "are tested on torch 2.11-2.13, this is 2.14.0+cu130)")  # fmt: skip


def test_restore_puts_torchs_own_back(monkeypatch):
    node = trees.CUDAGraphNode
    for name in graph_trees.METHODS:
        monkeypatch.setattr(node, name, node.__dict__[name])  # whatever is installed now, restored after the test
    monkeypatch.setattr(node, graph_trees.PATCHED, getattr(node, graph_trees.PATCHED, False), raising=False)
    assert graph_trees.faster_graph_tree_lookups() is None
    graph_trees.restore_torch_lookups()
    assert node._is_alias_of_live_recorded_tensor is torch_own("_is_alias_of_live_recorded_tensor")
    assert not getattr(node, graph_trees.PATCHED)
    assert graph_trees.faster_graph_tree_lookups() is None  # and installs again
    assert node._is_alias_of_live_recorded_tensor is graph_trees.live_output_alias
