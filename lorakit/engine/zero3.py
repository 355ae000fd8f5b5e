"""How ZeRO-3 moves weights: whole decoder layers, one gather each; the updated adapter, one gather a step.

By default DeepSpeed hooks every module that owns parameters and gathers each one's weights just before use. A
LoRA model multiplies those modules (each adapted linear becomes a base linear plus lora_A, lora_B and a dropout),
so a Qwen2.5-7B pass runs ~650 hooked modules, and at SFT's small per-GPU batches the hooks' CPU time, not the
GPU, sets the step time (benchmarks/RESULTS.md). Marking each decoder layer a ZeRO-3 "leaf" makes DeepSpeed
gather the layer's weights in one go at its entry and release them at its exit, hooking 28 modules instead.

One trap, and why `make_layer_inputs_require_grad` exists: DeepSpeed releases a leaf's weights in a backward hook
on the leaf that fires once the gradient with respect to the leaf's *inputs* is known. The first layer's input
comes from the frozen embedding, so it needs no gradient, and PyTorch fires that hook as soon as the gradient of
the layer's *outputs* arrives: before the layer's own backward has run. Its LoRA gradients then meet released
(empty) weights: "The size of tensor a (0) must match the size of tensor b (8)". Making the embedding output
require a gradient keeps the hook where it belongs; it costs one extra input gradient of one layer.

Where the memory plan keeps the frozen weights whole (a persistence threshold above every weight), DeepSpeed still
released every resident weight at the start of each optimizer step and gathered the whole model again after it
(its `_post_step` re-gathers all persistent parameters, because the trainable ones among them changed): for
Qwen2.5-7B on 4 GPUs, 15 GB through NCCL and 339 frees a step (benchmarks/RESULTS.md, session 4).
`keep_resident_weights` leaves them in place; the adapter is refreshed in place after each step.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from lorakit.engine.model import (
    decoder_layer_classes,
    decoder_layers,
    make_layer_inputs_require_grad,
    model_and_inner_model,
)


def gather_whole_layers(model: Any) -> list[str]:
    """Make every decoder layer one ZeRO-3 unit; returns the log line (none when the model names no layers)."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = decoder_layer_classes(model)
    if not classes:
        return ["ZeRO-3: the model names no decoder layer class (_no_split_modules); DeepSpeed gathers per module"]
    set_z3_leaf_modules(model, classes)
    make_layer_inputs_require_grad(model)
    names = ", ".join(c.__name__ for c in classes)
    return [f"ZeRO-3: each {names} is gathered whole, one unit per layer (a stage3_module_granularity_threshold in "
            "the DeepSpeed file hands this choice back to DeepSpeed)"]  # fmt: skip


def gather_updated_adapter_at_once(engine: Any) -> list[Any]:
    """After every optimizer step ZeRO-3 re-gathers each updated resident parameter (the LoRA matrices, which its
    optimizer updates partition by partition) with an all-gather of its own: 392 collectives a step for
    Qwen2.5-7B's adapter, more than half of all its collectives (counted in tests/test_multirank.py on the CPU).
    Where DeepSpeed keeps the updated partitions in its plain flat buffers (`adapter_partition_layout`), the
    gathered adapter is instead refreshed where it lies, one all-gather per optimizer sub-group
    (`refresh_in_place`), and DeepSpeed need not release it at the step's start (`keep_resident_weights` is told
    which weights these are: returned). Elsewhere the released ones are gathered in one coalesced all-gather,
    DeepSpeed's own (the one its forward fetches use), so the step's own gather finds nothing left to do."""
    optimizer = engine.optimizer
    if not hasattr(optimizer, "_post_step") or not hasattr(optimizer, "persistent_parameters"):
        return []  # another DeepSpeed layout: its own per-parameter gather stays, correct and slower
    post_step = optimizer._post_step  # DeepSpeed 0.19: called at the end of every step, gathers the resident ones
    layout, kept = adapter_partition_layout(optimizer), {}

    def gather_then_post_step(*args: Any) -> Any:
        if layout:
            refresh_in_place(layout, kept)
        gather_released(optimizer.persistent_parameters, getattr(engine, "lorakit_fixed_addresses", None))
        return post_step(*args)

    optimizer._post_step = gather_then_post_step
    return [param for _, _, entries in layout or () for param, _, _ in entries]


# (flat buffer of one optimizer sub-group's partitions, its process group, [(parameter, offset, partition size)])
PartitionLayout = list[tuple[torch.Tensor, Any, list[tuple[Any, int, int]]]]


def adapter_partition_layout(optimizer: Any) -> PartitionLayout | None:
    """Where each trainable weight's updated partition lies: DeepSpeed 0.19's stage-3 optimizer keeps every
    sub-group's partitions back to back in one flat buffer (`fp16_partitioned_groups_flat`, each weight's
    `ds_tensor` a view of it), rank r's partition of a weight being its r-th slice. None where that is not the
    layout, or a trainable weight is not resident: offloaded parameters or optimizer, hpZ's secondary partitions,
    MiCS's shards, a weight gathered per use (DeepSpeed's own release and gather stay there)."""
    groups, flats = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp16_partitioned_groups_flat", None)
    if type(optimizer).__name__ != "DeepSpeedZeroOptimizer_Stage3" or groups is None or flats is None:
        return None
    if optimizer.offload_optimizer or optimizer.offload_param or getattr(optimizer, "zero_hpz_partition_size", 1) > 1:
        return None
    layout: PartitionLayout = []
    for params, flat in zip(groups, flats, strict=True):
        if flat is None or not all(getattr(p, "ds_persist", False) for p in params):
            return None
        entries, offset = [], 0
        for param in params:
            size = param.partition_numel()
            if size and param.ds_tensor.data_ptr() != flat[offset:].data_ptr():
                return None
            entries.append((param, offset, size))
            offset += size
        if offset != flat.numel() or len({id(p.ds_process_group) for p in params}) > 1:
            return None
        layout.append((flat, params[0].ds_process_group if params else None, entries))
    return layout


def refresh_in_place(layout: PartitionLayout, kept: dict[int, tuple]) -> None:
    """Bring each gathered trainable weight up to its updated partitions: one all-gather of each sub-group's flat
    buffer, then every weight's slices copied into the memory it already has (one batched copy). What DeepSpeed's
    release-then-gather computes, without ~400 releases, per-weight allocations and a new address for every weight
    each step. A weight released meanwhile (a GatheredParameters block) is left to `gather_released`. `kept`: the
    gather buffer and the copies' views per sub-group, reused while every weight stays where it was."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for index, (flat, group, entries) in enumerate(layout):
        where = tuple(p.data.data_ptr() if p.ds_status == ZeroParamStatus.AVAILABLE else 0 for p, _, _ in entries)
        if not any(where):  # every one released (DeepSpeed's own release stayed): gathered by `gather_released`
            continue
        if index not in kept or kept[index][0] != where:
            kept[index] = (where, *refresh_copies(flat, torch.distributed.get_world_size(group), entries, where))
        _, rows, targets, sources = kept[index]
        torch.distributed.all_gather_into_tensor(rows, flat, group=group)
        if targets:
            torch._foreach_copy_(targets, sources)


def refresh_copies(
    flat: torch.Tensor, world: int, entries: list[tuple[Any, int, int]], where: tuple[int, ...]
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The all-gather's buffer (rank r's flat partitions in row r) and, for each gathered weight, the views that
    copy its slices out of the rows into its memory (the last partition of a weight may be padded)."""
    rows = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    grid = rows.view(world, flat.numel())
    targets, sources = [], []
    for (param, offset, size), pointer in zip(entries, where, strict=True):
        if not size or not pointer:
            continue
        whole = param.data.view(-1)
        full = whole.numel() // size  # partitions wholly inside the weight
        targets.append(whole[: full * size].view(full, size))
        sources.append(grid[:full, offset : offset + size])
        if whole.numel() > full * size:
            targets.append(whole[full * size :])
            sources.append(grid[full, offset : offset + whole.numel() - full * size])
    return rows, targets, sources


def gather_released(parameters: list[Any], addresses: dict[int, torch.Tensor] | None = None) -> None:
    """The ZeRO-3 parameters of `parameters` that are released (partitioned), gathered in one coalesced all-gather,
    DeepSpeed's own (the one its forward fetches use); nothing where none is. `addresses` (where every weight stays
    gathered): each gathered weight is copied back into the memory it had before, so it never moves. DeepSpeed's
    gather puts each weight in new memory, and a CUDA graph replays on the addresses it was recorded with: the
    adapter, released and gathered at every step, would otherwise be recorded again every step (CUDA graphs run
    under ZeRO-3 where every weight stays whole: lorakit.engine.kernels.settle_compile_mode). Tested on 2 CPU ranks;
    the copy is 2 bytes a LoRA weight a step."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    pending = [p for p in parameters if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if pending:
        pending[0].all_gather_coalesced(pending).wait()
    if addresses is None:
        return
    for param in pending:
        home = addresses.get(id(param))
        if home is not None and home.data_ptr() != param.data.data_ptr():
            home.copy_(param.data)
            param.data = home


def keep_first_layers_whole(engine: Any, count: int) -> list[str]:
    """Keep the frozen weights of the first `count` decoder layers gathered (DeepSpeed's own persistence flag,
    `ds_persist`, and its list of persistent parameters), so ZeRO-3 skips those layers' gathers in every forward and
    backward after the first step (whose trace DeepSpeed records releasing everything; lorakit's post-step gather
    brings them back); the memory plan sizes `count` (lorakit.engine.memory.resident_layers). DeepSpeed's
    thresholds cannot name layers: they mark weights persistent by size, greedily in parameter order, which here
    would cut a layer in two and leave the adapter of the last layers partitioned. Call before the first forward
    (DeepSpeed lists a unit's weights to release from its first trace) and before `keep_resident_weights`, which
    then keeps these in place at every step. Returns the log line (none where nothing was kept)."""
    optimizer = engine.optimizer
    persistent = getattr(optimizer, "persistent_parameters", None)
    offload = getattr(optimizer, "parameter_offload", None)
    if count <= 0 or offload is None or not isinstance(persistent, list):
        return []
    kept = 0
    for layer in decoder_layers(offload.module)[:count]:
        weights = [p for p in layer.parameters() if hasattr(p, "ds_id") and not p.requires_grad and not p.ds_persist]
        if not weights:
            continue
        for weight in weights:
            weight.ds_persist = True
        weights[0].all_gather(param_list=weights)  # one layer at a time: no more than a layer in flight
        persistent.extend(weights)
        kept += 1
    if not kept:
        return []
    return [f"ZeRO-3: the frozen weights of the first {kept} decoder layers stay gathered (DeepSpeed's persistence)"]


def keep_resident_weights(engine: Any, refreshed: list[Any]) -> int:
    """Stop ZeRO-3 releasing (and then re-gathering) resident weights at every optimizer step; returns how many
    weights stay in place. A frozen weight never changes, so its gathered copy is always current; a trainable one
    in `refreshed` is brought up to date in place after the step (`gather_updated_adapter_at_once`); any other
    trainable one goes through DeepSpeed's release and re-gather as before (its partition is what Adam updates).
    DeepSpeed 0.19's coordinator is used through its own release function; another layout keeps DeepSpeed's way."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    offload = getattr(engine.optimizer, "parameter_offload", None)
    coordinator = offload.get_param_coordinator() if offload is not None else None
    release = getattr(coordinator, "_PartitionedParameterCoordinator__release_param", None)
    inflight = getattr(coordinator, "_PartitionedParameterCoordinator__inflight_param_registry", None)
    if release is None or inflight is None or not hasattr(offload, "partition_all_parameters"):
        return 0
    module_parameters = list(offload.module.parameters())  # fixed once the engine exists: LoRA is attached before
    in_place = {id(p) for p in refreshed}
    resident = [p for p in module_parameters if getattr(p, "ds_persist", False) and not p.requires_grad]
    resident += [p for p in module_parameters if id(p) in in_place]
    if not resident:
        return 0
    kept = {id(p) for p in resident}
    released = [p for p in module_parameters if id(p) not in kept]

    def partition_all_but_resident_frozen() -> None:  # DeepSpeed's release_and_reset_all, over `released` only
        for param in released:
            if param in inflight:
                inflight.pop(param).wait()
            param.ds_active_sub_modules.clear()
            release(param)
        still = [p.ds_summary() for p in released if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
        if still:
            raise RuntimeError(f"ZeRO-3 parameters expected to be released: {still[:3]}")

    offload.partition_all_parameters = partition_all_but_resident_frozen
    return len(resident)


def remember_module_parameters() -> bool:
    """DeepSpeed lists a module's parameters afresh (`named_parameters`, a walk of every submodule) each time it
    fetches, releases or traces a ZeRO-3 unit, several times per decoder layer per pass: 817,000 `named_modules`
    calls in 5 kept-whole steps of Qwen2.5-7B (benchmarks/RESULTS.md, session 4). A module's own parameters do not
    change once the engine exists (LoRA, DoRA and PiSSA are attached before it), so the list is kept per module,
    weakly (a module that goes away takes its entry along; a new one is listed afresh); the parameters DeepSpeed
    registers as external to a module are still asked for each time. True where DeepSpeed's function was replaced
    (DeepSpeed 0.19's `partitioned_param_coordinator.get_all_parameters`); process-wide, once."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    original = getattr(coordinator, "get_all_parameters", None)
    if original is None or getattr(original, "remembers", False):
        return original is not None
    listed: weakref.WeakKeyDictionary[torch.nn.Module, dict[bool, list]] = weakref.WeakKeyDictionary()

    def get_all_parameters(sub_module: torch.nn.Module, recurse: bool = False) -> Iterator[tuple[str, Any]]:
        by_recurse = listed.setdefault(sub_module, {})
        named = by_recurse.get(recurse)
        if named is None:
            named = by_recurse[recurse] = list(sub_module.named_parameters(recurse=recurse))
        return itertools.chain(named, sub_module.ds_external_parameters())

    get_all_parameters.remembers = True  # type: ignore[attr-defined]
    coordinator.get_all_parameters = get_all_parameters
    return True


def quiet_deepspeed_bookkeeping() -> list[str]:
    """Two pieces of DeepSpeed bookkeeping that run thousands of times a step and do nothing for a training run:
    NVTX ranges around every hooked ZeRO-3 function (two calls into the accelerator and two `is_compiling` checks
    each; DeepSpeed's own `engine.compile` switches them off the same way, through `deepspeed.utils.nvtx`), and
    ZeRO-3's `print_rank_0`, which asks the process group for its rank before learning that nothing is to be printed
    (1,600 calls a step). Measured on the CPU proxy with the walks below (benchmarks/RESULTS.md, session 5). A
    profile in Nsight loses DeepSpeed's range names; torch.profiler does not use them. Returns the modules changed
    (DeepSpeed 0.19's names; another layout keeps its own); process-wide, idempotent."""
    import importlib
    import inspect

    import deepspeed.comm as ds_dist
    import deepspeed.utils.nvtx as nvtx

    nvtx.enable_nvtx = False
    changed = []
    for name in ("partition_parameters", "parameter_offload", "partitioned_param_coordinator", "stage3"):
        try:
            module = importlib.import_module(f"deepspeed.runtime.zero.{name}")
        except ImportError:
            continue
        original = getattr(module, "print_rank_0", None)
        if original is None or getattr(original, "quiet", False):
            continue
        if list(inspect.signature(original).parameters) != ["message", "debug", "force"]:
            continue
        emit = module.logger.info if name == "stage3" and hasattr(module, "logger") else print

        def print_rank_0(message: str, debug: bool = False, force: bool = False, emit: Any = emit) -> None:
            if (debug or force) and ds_dist.get_rank() == 0:
                emit(message)

        print_rank_0.quiet = True  # type: ignore[attr-defined]
        module.print_rank_0 = print_rank_0
        changed.append(name)
    return changed


def walk_only_parameter_owners(engine: Any) -> bool:
    """Around each forward, DeepSpeed's ZeRO-3 engine walks every module of the model twice (`_forward_prologue`
    and `_forward_epilogue`) to flag its parameter dict as in or out of a forward pass: the flag lets a dict notice
    a partitioned parameter read by a module that does not own it. A LoRA Qwen2.5-7B has ~1,170 modules, and the
    walk's nested generators made a fifth of a kept-whole step's Python calls (CPU proxy, benchmarks/RESULTS.md).
    Only a module that owns parameters has anything to flag, and the module tree is fixed once the engine exists
    (LoRA and its variants are attached before), so both walks go over that list, made once. DeepSpeed's own
    prologue and epilogue still run (timers, profiler); only `modules()` answers from the list while they do.
    True where applied: DeepSpeed 0.19's functions, which call `modules()` for this walk alone."""
    import inspect

    try:
        names = ("_forward_prologue", "_forward_epilogue")
        sources = [inspect.getsource(getattr(type(engine), name)) for name in names]
    except (AttributeError, OSError, TypeError):
        return False
    if not all(s.count(".modules()") == 1 and "_in_forward" in s for s in sources):
        return False
    model = engine.module
    owners = [module for module in model.modules() if module._parameters]

    def listing_owners(run: Any) -> Any:
        def run_over_owners(*args: Any) -> Any:
            model.modules = lambda: iter(owners)  # an instance attribute: this model, this call only
            try:
                return run(*args)
            finally:
                del model.modules

        return run_over_owners

    engine._forward_prologue = listing_owners(engine._forward_prologue)
    engine._forward_epilogue = listing_owners(engine._forward_epilogue)
    return True


def gather_released_residents_before_forward(engine: Any) -> bool:
    """Where some weights stay partitioned: before each forward, the resident (persistent) weights a GatheredParameters
    block released (lorakit's checkpoint save and load release the adapter) are gathered on their own, in one
    collective; nothing where none is (a look at each resident weight's flag). Left to DeepSpeed, the next layer's
    fetch would gather its released LoRA matrices together with the layer's frozen weights, and under the all-reduce
    fetch (lorakit.engine.deepspeed_config.fetch_layers_by_all_reduce) every weight of that fetch is a view of one
    buffer: the LoRA matrices, never released again, would keep each layer's whole buffer alive, the whole model on
    every GPU after the first save. True where the hooks are in place."""
    persistent = getattr(engine.optimizer, "persistent_parameters", None)
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None or not isinstance(persistent, list):
        return False

    gather_before_each_forward(engine, offload.module, lambda *_: gather_released(persistent))
    return True


def gather_before_each_forward(engine: Any, module: Any, gather: Any) -> None:
    """`gather` as a forward pre-hook of the PEFT model and of the HF model inside it (PEFT's `generate` and
    `get_base_model()` call that one directly), kept on the engine as `lorakit_gather_hooks`."""
    engine.lorakit_gather_hooks = [top.register_forward_pre_hook(gather) for top in model_and_inner_model(module)]


def skip_unit_hooks_when_all_resident(engine: Any) -> bool:
    """Where every parameter stays gathered between steps (the memory plan keeps the frozen weights whole, the LoRA
    matrices sit under the persistence threshold, and the adapter is re-gathered right after each step by
    `gather_updated_adapter_at_once`), ZeRO-3's fetch and release hooks around each unit have nothing to fetch or
    release, yet each one walks the unit's parameters, its trace and its prefetch queue: four hooks a decoder layer
    a micro-batch, plus the autograd functions they wrap around each output. Those hooks (DeepSpeed's own lists,
    removed with DeepSpeed's own handles) go; what stays is everything that moves data or gradients: the
    start-of-forward reset, the per-layer gradient reduce-scatter hooks of stage 3's optimizer, the step's release
    and re-gather of the adapter, the external-parameter check of each parameter dict; added: one look before each
    forward for a weight a GatheredParameters block released (below). Nothing is removed while any parameter is
    partitioned, or under QLoRA (its GPU tests have not run with this). True where removed."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    hooks = [getattr(offload, "forward_hooks", None), getattr(offload, "backward_hooks", None)]
    if offload is None or any(not isinstance(h, list) for h in hooks):
        return False
    parameters = list(offload.module.parameters())
    if not parameters or not all(getattr(p, "ds_persist", False) for p in parameters):
        return False
    if any(hasattr(p, "quant_state") or type(p).__name__.startswith("Params4bit") for p in parameters):
        return False

    def gather_any_released(*_: Any) -> None:
        gather_released(parameters, getattr(engine, "lorakit_fixed_addresses", None))

    gather_any_released()
    # From here on, a released trainable weight (released and gathered at every step) is gathered back into the
    # memory it has now (a CUDA graph's addresses); a frozen one stays gathered, and is not held here should
    # anything partition it.
    engine.lorakit_fixed_addresses = {id(p): p.data for p in parameters if p.requires_grad}
    for handle in itertools.chain(*hooks):
        handle.remove()
    for handles in hooks:
        handles.clear()
    # A GatheredParameters block (lorakit's checkpoint save and load) partitions what it gathered on leaving, resident
    # or not; the removed hooks would have gathered those weights again. This does it before each forward, in one
    # collective where any is missing (a look at ~700 flags where none is): never inside a compiled layer, whose
    # trace would see the empty partition. The HF model inside PEFT's gets the look too (model_and_inner_model).
    gather_before_each_forward(engine, offload.module, gather_any_released)
    return True
