"""Torch's CUDA graph trees (torch._inductor.cudagraph_trees) recording a new row length faster, the same decisions.

A training step under lorakit's CUDA graphs is one path of the tree: each decoder layer's forward, then each layer's
backward, 56 graphs for a 28-layer model, each keeping weak references to its outputs (the saved activations). When a
new row length is recorded, every graph on the path asks, for each of its ~80 inputs and outputs, whether the tensor
is an output of a graph before it on the path: a Python scan of every earlier output (~1,300 references for the
later layers) that, for the live-alias question, first checks each reference's liveness (four Python calls and a
C++ use count) and only then compares the address, and re-reads the tensor's own address at every entry. cProfile of
one new length on an H100 host (28 Qwen2.5-7B layers, benchmarks/graph_recording.py, session 19): 5.2 million such
liveness checks, ~80 % of the profiled recording; the step with the recording took 4.7-5.6 s unprofiled against
0.16-0.19 s replayed: the whole reference job (300 steps, ~2,400 tokens a rank a step) was ~40 s slower with graphs
than without (benchmarks/RESULTS.md, sessions 18-19).

`faster_graph_tree_lookups` replaces the two scans and the path's liveness map with versions that read the tensor's
address once and compare addresses before liveness: the same first match (same order, same test), without the calls
for the references that cannot match (7x faster on a synthetic path on the CPU, benchmarks/RESULTS.md session 19;
tests/engine/test_graph_trees.py holds each to torch's own on tables of live, dead, empty, aliased and extra-checked
references). Installed only on the torch versions it was read against and tested with (TESTED_TORCH: 2.11 on the GPU
hosts, 2.13 here), where the methods and the reference's stored address exist; elsewhere torch's own run unchanged
and the compile's log line says why. The change is process-wide and stays, as the graph trees do: research code
compiling its own functions with CUDA graphs in the same process records with these lookups too (the same answers);
`restore_torch_lookups` puts torch's back.
"""

from __future__ import annotations

from typing import Any

import torch

PATCHED = "_lorakit_faster_lookups"
TESTED_TORCH = ((2, 11), (2, 13))  # the first and last torch (major, minor) whose cudagraph_trees this was read against
METHODS = ("_is_cuda_graph_recorded_tensor", "_is_alias_of_live_recorded_tensor", "_get_liveness")
TORCH_OWN: dict[str, Any] = {}  # torch's functions replaced, by name (the tests hold the new ones to them)


def is_recorded_output(node: Any, tensor: torch.Tensor) -> bool:
    """CUDAGraphNode._is_cuda_graph_recorded_tensor: whether `tensor`'s memory is an output of a graph on the path,
    live or not (the graphs' pool never frees it)."""
    address = tensor.untyped_storage().data_ptr()
    for references in node.path_weakrefs:
        for reference in references:
            if reference is not None and reference._data_ptr == address:
                return True
    return False


def live_output_alias(node: Any, tensor: torch.Tensor) -> tuple[int, int] | None:
    """CUDAGraphNode._is_alias_of_live_recorded_tensor: (depth, index) of the first live output on the path at
    `tensor`'s address, or None."""
    address = tensor.untyped_storage().data_ptr()
    for depth, references in enumerate(node.path_weakrefs):
        for index, reference in enumerate(references):
            if reference is not None and reference._data_ptr == address and reference() is not None:
                return depth, index
    return None


def path_liveness(weakrefs: list[list[Any]]) -> list[list[bool]]:
    """CUDAGraphNode._get_liveness: for each graph on the path, whether each output is alive. Torch maps its
    is_live over each output list with pytree; each entry is a reference or None, both pytree leaves."""
    return [[reference is not None and reference() is not None for reference in references] for references in weakrefs]


def faster_graph_tree_lookups() -> str | None:
    """Install the faster scans on torch's CUDAGraphNode once; None where done, else why torch's own stay."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2] if part.isdigit())
    if not TESTED_TORCH[0] <= version <= TESTED_TORCH[1]:
        tested = "-".join(".".join(map(str, release)) for release in TESTED_TORCH)
        return f"lorakit's lookups are tested on torch {tested}, this is {torch.__version__}"
    try:
        from torch._inductor import cudagraph_trees as trees
    except ImportError as error:
        return f"torch._inductor.cudagraph_trees does not import ({error})"
    node = getattr(trees, "CUDAGraphNode", None)
    wrapper = getattr(trees, "StorageWeakRefWrapper", None)
    if node is None or wrapper is None or not all(hasattr(node, name) for name in METHODS):
        return "this torch's CUDAGraphNode lacks the lookups lorakit replaces"
    if getattr(node, PATCHED, False):
        return None
    probe = wrapper(torch.empty(1))
    if getattr(probe, "_data_ptr", None) != probe.data_ptr():
        return "this torch's StorageWeakRefWrapper keeps its address elsewhere"
    TORCH_OWN.update((name, node.__dict__[name]) for name in METHODS)
    node._is_cuda_graph_recorded_tensor = is_recorded_output
    node._is_alias_of_live_recorded_tensor = live_output_alias
    node._get_liveness = staticmethod(path_liveness)
    setattr(node, PATCHED, True)
    return None


def restore_torch_lookups() -> None:
    """Torch's own lookups back on CUDAGraphNode (after faster_graph_tree_lookups; nothing to do before it)."""
    from torch._inductor import cudagraph_trees as trees

    if getattr(trees.CUDAGraphNode, PATCHED, False):
        for name, own in TORCH_OWN.items():
            setattr(trees.CUDAGraphNode, name, own)
        setattr(trees.CUDAGraphNode, PATCHED, False)
