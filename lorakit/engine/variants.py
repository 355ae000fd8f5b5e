"""PiSSA's initialisation and the modules trained in full (--additional_target), made correct under ZeRO-3.

PiSSA (PEFT's init_lora_weights="pissa" / "pissa_niter_N") takes an SVD of each adapted base weight, starts the
adapter from its top singular vectors and REWRITES the base weight to the residual W - scale * B @ A. PEFT gathers
the weight for this only through transformers' global DeepSpeed config, which lorakit does not use: under ZeRO-3
each rank would decompose its empty partition. Here each adapted layer's weight is gathered whole, one layer at a
time; one rank (layers dealt round-robin, so ranks share the work) runs PEFT's own pissa_init, and its residual,
A and B are broadcast, so every rank holds the same adapter and the same partitioned residual. The fast SVD starts
from a random matrix: each layer's draw is seeded from --seed and the layer's index, so the same run (a resume, or
ZeRO-2 against ZeRO-3, or another number of ranks) decomposes every weight the same way.

PEFT's modules_to_save copies each named module (a ModulesToSaveWrapper keeps the frozen original beside a
trained copy). Under ZeRO-3 PEFT gathers the original itself while it deep-copies it, and a deep-copied parameter
is a plain one (torch copies the data, not DeepSpeed's attributes), so DeepSpeed partitions the copy as a new
trainable parameter when the engine is built: nothing to do here but name the modules (tests/test_variants.py
trains them under ZeRO-3 as under ZeRO-2).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.lora_settings import LoraSettings


def weighted_module_names(model: Any) -> list[str]:
    """The last name component of every module that owns a weight, the names --additional_target may use."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if name and any(True for _ in m.parameters(recurse=False))})  # fmt: skip


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")


def additional_targets(model: Any, settings: LoraSettings, lora_targets: list[str]) -> list[str]:
    """The full names of the modules --additional_target trains in full: every module with a weight whose name
    ends in a given name (whole components: `norm` is the final norm, not input_layernorm). An unknown name, or a
    module LoRA adapts (or one holding such a module), or one inside another named one, is a LorakitError."""
    modules = [(name, m) for name, m in model.named_modules() if name]
    found: list[tuple[str, str]] = []  # (the name given, a module's full name)
    for target in settings.additional_target:
        hits = [name for name, m in modules if _matches(name, target) and any(True for _ in m.parameters())]
        if not hits:
            raise LorakitError(f"--additional_target {target} matches no module of the model; modules with "
                               f"weights are named {', '.join(weighted_module_names(model))}")  # fmt: skip
        adapted = [name for h in hits for name, _ in modules if name.rsplit(".", 1)[-1] in lora_targets
                   and (name == h or name.startswith(f"{h}."))]  # fmt: skip
        if adapted:
            raise LorakitError(f"--additional_target {target} is (or holds) a module LoRA adapts ({adapted[0]}); a "
                               "module is either adapted or trained in full: drop it from --lora_target or from "
                               "--additional_target")  # fmt: skip
        found += [(target, h) for h in hits if h not in [name for _, name in found]]
    _check_not_nested(found)
    return [name for _, name in found]


def _check_not_nested(found: list[tuple[str, str]]) -> None:
    """PEFT wraps each named module in a ModulesToSaveWrapper: one inside another trains a copy of a copy, and its
    state dict then has no key for the inner one, so no adapter could be saved (a KeyError at the first save)."""
    for target, name in found:
        outer = next(((t, n) for t, n in found if name.startswith(f"{n}.")), None)
        if outer is not None:
            raise LorakitError(f"--additional_target {target} is inside {outer[1]}, which --additional_target "
                               f"{outer[0]} trains in full already; drop --additional_target {target}")  # fmt: skip


def check_pissa_rank(model: Any, rank: int, lora_targets: list[str]) -> None:
    """PiSSA takes --lora_rank singular vectors of each adapted weight, which has min(out, in) of them: PEFT
    silently builds a smaller adapter there, whose shapes then contradict the rank in adapter_config.json (PEFT
    cannot load the saved adapter)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora_targets:
            side = min(module.in_features, module.out_features)
            if side < rank:
                raise LorakitError(f"--lora_rank {rank} with --pissa_init: {name} has {side} singular vectors (its "
                                   f"weight is {module.out_features} x {module.in_features}); use --lora_rank {side} "
                                   f"or less, or leave {name.rsplit('.', 1)[-1]} out of --lora_target")  # fmt: skip


def full_parameters(model: Any, names: list[str]) -> int:
    """Weights of the named modules, a tied one counted once (the trained copies --additional_target makes)."""
    modules = dict(model.named_modules())
    unique = {id(p): p for name in names for p in modules[name].parameters()}
    return sum(p.numel() for p in unique.values())


def ties_embeddings(model: Any) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False))


@contextlib.contextmanager
def pissa_gathered(seed: int, device: torch.device, zero3: bool) -> Iterator[None]:
    """PEFT's pissa_init, while this context is open, runs as the module docstring says."""
    from peft.tuners.lora.layer import LoraLayer

    original = LoraLayer.__dict__["pissa_init"]
    counter = itertools.count()
    ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if ranks > 1 else 0

    def pissa_init(layer: Any, adapter_name: str, init_lora_weights: str) -> None:
        index = next(counter)
        owner = index % ranks
        weight = layer.get_base_layer().weight
        gathered = _gathered(weight, owner) if zero3 else contextlib.nullcontext()
        with gathered:
            home = weight.data.device
            where = home if zero3 else device  # ZeRO-2 builds on the CPU: decompose on the accelerator
            weight.data = weight.data.to(where)
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if rank == owner:
                with torch.random.fork_rng(devices=[where] if where.type == "cuda" else []):
                    torch.manual_seed((seed + index) % 2**63)
                    original(layer, adapter_name, init_lora_weights)
            else:  # PEFT's results' shapes and dtype (fp32), filled by the broadcast below
                a.data = torch.empty(a.shape, dtype=torch.float32, device=where)
                b.data = torch.empty(b.shape, dtype=torch.float32, device=where)
            if ranks > 1:
                shared = [a.data, b.data] if zero3 else [a.data, b.data, weight.data]
                for tensor in shared:  # under ZeRO-3 the gather's exit sends the residual from `owner`
                    torch.distributed.broadcast(tensor, src=owner)
            if not zero3:
                weight.data = weight.data.to(home)

    LoraLayer.pissa_init = pissa_init
    try:
        yield
    finally:
        LoraLayer.pissa_init = original


def _gathered(weight: torch.nn.Parameter, owner: int) -> Any:
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=owner)


def initial_adapter(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA matrices as initialised (on the CPU), before the engine partitions them: PiSSA's starting point,
    which converting its trained adapter to plain LoRA subtracts."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()
            if ".lora_A." in name or ".lora_B." in name}  # fmt: skip
