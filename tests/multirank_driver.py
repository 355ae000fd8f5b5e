"""Launched by tests/test_multirank.py as `torchrun --nproc_per_node 2 multirank_driver.py WORKDIR MODEL DATA`.

Three ZeRO-3 runs in one process group on the same data and global batch: `wide` (micro-batch 4 x accumulation 1)
and `deep` (micro-batch 1 x accumulation 4), both with lorakit's whole-layer gathering, and `per_module` (`wide`
with DeepSpeed's own per-module gathering: a granularity threshold of 0 in the DeepSpeed file), and
`checkpointed` (`wide` with gradient checkpointing: layers recomputed, and re-gathered, in backward), and
`zero2` (`wide` under ZeRO-2: nothing partitioned, the reference for ZeRO-3's machinery over many steps), and
`resident` (`wide` with every frozen weight kept whole: a persistence threshold above every parameter), and
`compiled` (`resident` with --torch_compile: each decoder layer's forward through torch.compile's inductor, saving a
checkpoint every 5 steps: a save partitions the adapter it gathered, and with every weight resident lorakit, not
DeepSpeed's removed hooks, gathers it again before the next compiled forward), and `first_resident` (`wide` with
the first decoder layer's frozen weights kept whole, as the memory plan chooses where room is left), and
`gathered` (`wide` with each layer fetched by DeepSpeed's all-gather and copy-out, not lorakit's all-reduce), and
`contiguous` (`wide` with the file's contiguous_gradients, which lorakit turns off for adapters), and `saving`
(`wide` saving a checkpoint every 5 steps: the saves release the adapter, which must come back in memory of its own),
and `view_saving` (`wide` with torch's own linear for the frozen layers, whose autograd keeps each released gathered
weight alive until backward: lorakit.engine.frozen_linear).
Every all-gather is counted, per run, to show how many collectives a ZeRO-3 step costs, and every weight a layer
needed after the first step: gathered ahead (DeepSpeed's prefetch) or only when the layer asked for it.
Rank 0 writes what the test compares: each run's metrics, and the
logits of the `wide` engine on a fixed input, computed through DeepSpeed after training.
"""

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed

import lorakit
from lorakit.engine.model import decoder_layers

all_gathers = [0]
gathered_elements = [0]
all_reduce_fetches = [0]  # of all_gathers, the layers fetched by an all-reduce
_all_gather_into_tensor = torch.distributed.all_gather_into_tensor


def counted_all_gather(*args, **kwargs):
    all_gathers[0] += 1
    gathered_elements[0] += (args[0] if args else kwargs["output_tensor"]).numel()
    return _all_gather_into_tensor(*args, **kwargs)


torch.distributed.all_gather_into_tensor = counted_all_gather


def count_all_reduce_fetches() -> None:
    """A layer fetched by DeepSpeed's all-reduce (lorakit's default: deepspeed_config.fetch_layers_by_all_reduce)
    counts as one gathering collective of its buffer's elements."""
    from deepspeed.runtime.zero import partition_parameters

    handle_class = partition_parameters.AllReduceCoalescedHandle
    init = handle_class.__init__

    def counted_init(self, handle, params):
        all_gathers[0] += 1
        all_reduce_fetches[0] += 1
        gathered_elements[0] += sum(p.ds_numel_aligned for p in params)
        init(self, handle, params)

    handle_class.__init__ = counted_init


count_all_reduce_fetches()
adapter_releases = [0]  # a trainable weight's gathered memory freed (DeepSpeed's release: it is gathered again later)


def count_adapter_releases() -> None:
    from deepspeed.runtime.zero import partition_parameters

    free_param = partition_parameters.free_param

    def counted_free_param(param):
        adapter_releases[0] += param.requires_grad
        return free_param(param)

    partition_parameters.free_param = counted_free_param


count_adapter_releases()
fetched = {"on_demand": 0, "prefetched": 0}  # weights a layer needed: gathered only then, or gathered ahead


def count_prefetches() -> None:
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordination
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    coordinator = coordination.PartitionedParameterCoordinator
    fetch = coordinator._fetch_sub_module_impl

    def counted_fetch(self, module, forward, is_leaf):
        in_flight = self._PartitionedParameterCoordinator__inflight_param_registry
        for param in set(coordination.iter_params(module, recurse=is_leaf)):
            if param in in_flight:
                fetched["prefetched"] += param.ds_numel
            elif param.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                fetched["on_demand"] += param.ds_numel
        return fetch(self, module, forward, is_leaf)

    coordinator._fetch_sub_module_impl = counted_fetch


count_prefetches()
held_after_forward = [None]  # the first forward's frozen weight storage still alive when the forward ends


def measured_loss_sum(model, inputs, labels):
    """lorakit's loss, the bytes of storage the forward's saved frozen weights (or views of them) keep alive
    noted once the forward has returned: by then ZeRO-3 has released every partitioned weight it gathered."""
    saved = []

    def pack(tensor):
        weight = tensor if isinstance(tensor, torch.nn.Parameter) else tensor._base
        if isinstance(weight, torch.nn.Parameter) and not weight.requires_grad:
            saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model_loss_sum(model, inputs, labels)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    if held_after_forward[0] is None:  # the first step's: later ones keep what DeepSpeed's trace gathers ahead
        held_after_forward[0] = sum(storages.values())
    return loss


TORCH_LINEAR = torch.nn.functional.linear  # DeepSpeed's zero.Init may replace it process-wide


def forward_past_peft_after_save(model) -> dict:
    """The base (HF) model's logits and greedy tokens, called directly (as PEFT's `generate` does) right after a
    checkpoint's GatheredParameters block partitioned the adapter, against the PEFT model's own forward."""
    from lorakit.checkpoint import gather_adapter_state

    probe, found = torch.arange(3, 40).reshape(1, -1), {}
    model.eval()
    with torch.no_grad():
        for key, call in (
            ("base_logits", lambda: model.get_base_model()(input_ids=probe, use_cache=False).logits),
            ("generated", lambda: model.generate(input_ids=probe, max_new_tokens=3, do_sample=False)),
        ):
            gather_adapter_state(model, torch.distributed.get_rank() == 0)  # as save_checkpoint does
            try:
                found[key] = call()
            except RuntimeError as error:  # a partitioned (empty) weight met in a forward
                found[key] = str(error)[:200]
        logits = model(input_ids=probe, use_cache=False).logits
    model.train()
    base = found["base_logits"]
    return {
        "base_logits_error": base if isinstance(base, str) else float((base - logits).abs().max()),
        "generated": found["generated"] if isinstance(found["generated"], str) else found["generated"].tolist(),
    }


workdir, model, data = (Path(p) for p in sys.argv[1:4])
common = {
    "model_name_or_path": str(model),
    "template": "qwen",
    "dataset_dir": str(data),
    "dataset": ("tiny",),
    "cutoff_len": 256,
    "learning_rate": 2e-2,
    "num_train_epochs": 2,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 1,
    "logging_steps": 1,
    "lora_target": ("all",),
    "lora_rank": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "max_grad_norm": 1.0,
    "seed": 7,
    "deepspeed": sys.argv[4],
    "packing": False,  # padded micro-batches: how examples are grouped is what these two runs compare
}
per_module = json.loads(Path(sys.argv[4]).read_text())
per_module["zero_optimization"]["stage3_module_granularity_threshold"] = 0
(workdir / "ds_per_module.json").write_text(json.dumps(per_module))
gathered = json.loads(Path(sys.argv[4]).read_text())  # the layers fetched by all-gathers, DeepSpeed's default
gathered["zero_optimization"]["stage3_use_all_reduce_for_fetch_params"] = False
(workdir / "ds_gathered.json").write_text(json.dumps(gathered))
resident = json.loads(Path(sys.argv[4]).read_text())  # every frozen weight kept whole, as the memory plan may choose
resident["zero_optimization"]["stage3_param_persistence_threshold"] = 10**12
(workdir / "ds_resident.json").write_text(json.dumps(resident))
results = {}
runs = (("wide", 4, 1), ("deep", 1, 4), ("per_module", 4, 1), ("checkpointed", 4, 1), ("zero2", 4, 1),
        ("resident", 4, 1), ("compiled", 4, 1), ("first_resident", 4, 1), ("gathered", 4, 1),
        ("contiguous", 4, 1), ("saving", 4, 1), ("view_saving", 4, 1))  # fmt: skip
train_module = importlib.import_module("lorakit.train")  # the module: `lorakit.train` is the function
plan_run_memory, model_loss_sum = train_module.plan_run_memory, train_module.model_loss_sum
train_module.model_loss_sum = measured_loss_sum
engine_module = importlib.import_module("lorakit.engine")
save_by_reference = engine_module.save_frozen_weights_by_reference


def with_first_layer_resident(*args, **kwargs):
    """What the memory plan chooses on GPUs with room left beside partitioned weights (the CPU plans nothing)."""
    config, engine_plan, lines = plan_run_memory(*args, **kwargs)
    return config, dataclasses.replace(engine_plan, resident_layers=1), lines


plan_module = importlib.import_module("lorakit.engine.plan")
reduce_in_place = plan_module.reduce_adapter_gradients_in_place


def as_the_file_says(ds_config, *_):
    """The DeepSpeed file's contiguous_gradients (true), not lorakit's choice for adapters."""
    return ds_config, []


for name, micro, accumulation in runs:
    train_module.plan_run_memory = with_first_layer_resident if name == "first_resident" else plan_run_memory
    plan_module.reduce_adapter_gradients_in_place = as_the_file_says if name == "contiguous" else reduce_in_place
    engine_module.save_frozen_weights_by_reference = (lambda *_: []) if name == "view_saving" else save_by_reference
    held_after_forward[0] = None
    config = lorakit.Config.from_flat(
        {
            **common,
            "output_dir": str(workdir / name),
            "per_device_train_batch_size": micro,
            "gradient_accumulation_steps": accumulation,
            **({"deepspeed": str(workdir / "ds_per_module.json")} if name == "per_module" else {}),
            **({"deepspeed": str(workdir / "ds_resident.json")} if name in ("resident", "compiled") else {}),
            **({"deepspeed": str(workdir / "ds_gathered.json")} if name == "gathered" else {}),
            **({"torch_compile": True} if name == "compiled" else {}),
            # checkpoints mid-run: saving partitions the adapter it gathered, which the next forward must gather again
            **({"save_steps": 5} if name in ("compiled", "saving") else {}),
            **({"gradient_checkpointing": True} if name == "checkpointed" else {}),
            **({"zero_stage": 2} if name == "zero2" else {}),
        }
    )
    gathers_before, after_first_step, addresses, moved = all_gathers[0], [], {}, [0]
    all_reduces_before, adapter_storage = all_reduce_fetches[0], [0]

    def note_first_step(info, noted=after_first_step, seen=addresses, moved=moved, held=adapter_storage):
        lora = [(n, p.data_ptr()) for n, p in info.model.engine.module.named_parameters() if p.requires_grad]
        storages = {p.data.untyped_storage().data_ptr(): p.data.untyped_storage().nbytes()
                    for p in info.model.engine.module.parameters() if p.requires_grad and p.data.numel()}  # fmt: skip
        held[0] = max(held[0], sum(storages.values()))  # the memory the adapter's weights keep alive
        if info.step == 1:
            noted.append(gathered_elements[0])
            noted.append(adapter_releases[0])
            fetched.update(on_demand=0, prefetched=0)  # the first step records DeepSpeed's trace: nothing ahead
            seen.update(lora)
        else:  # a save (after this hook) may have released the adapter: 0 until the next forward gathers it
            moved[0] += sum(pointer not in (0, seen[n]) for n, pointer in lora)
        noted[2:] = [adapter_releases[0]]  # as of this step's end (the final save, after the last, releases it)

    result = lorakit.train(config, on_step=note_first_step)
    parameters = list(result.engine.module.parameters())
    offload = getattr(result.engine.optimizer, "parameter_offload", None)  # ZeRO-3's fetch/release hooks, if any
    results[name] = result.metrics | {
        "unit_hooks": None if offload is None else len(offload.forward_hooks) + len(offload.backward_hooks),
        "recomputes": result.engine.module.get_base_model().is_gradient_checkpointing,
        "all_gathers": all_gathers[0] - gathers_before,
        "all_reduce_fetches": all_reduce_fetches[0] - all_reduces_before,
        "contiguous_gradients": getattr(result.engine.optimizer, "contiguous_gradients", None),
        "elements_gathered_a_step": (gathered_elements[0] - after_first_step[0]) / 11,  # steps 2-12
        "frozen_elements": sum(getattr(p, "ds_numel", p.numel()) for p in parameters if not p.requires_grad),
        "torch_linear": torch.nn.functional.linear is TORCH_LINEAR,
        "frozen_weight_bytes": sum(
            getattr(p, "ds_numel", p.numel()) * p.element_size() for p in parameters if not p.requires_grad
        ),  # fmt: skip
        "held_after_forward": held_after_forward[0],
        # LoRA matrices now at another address than after step 1 (released and gathered at every step, and by saves)
        "adapter_moved": moved[0],
        "adapter_storage_bytes": adapter_storage[0],  # the most, after any step
        "resident_bytes": sum(
            getattr(p, "ds_numel_aligned", p.numel()) * p.element_size()
            for p in parameters
            if getattr(p, "ds_persist", False)
        ),  # fmt: skip
        "adapter_releases_after_step_1": after_first_step[2] - after_first_step[1],
        "fetched_after_step_1": dict(fetched),
        "layer0_partitioned": sum(  # ZeRO-2 partitions no weight
            p.ds_numel for p in decoder_layers(result.engine.module)[0].parameters() if not getattr(p, "ds_persist", 1)
        ),
    }
    if name in ("wide", "resident"):  # after a save, which partitioned the adapter: the HF model called directly
        results[name] |= forward_past_peft_after_save(result.engine.module)
    if name == "wide":
        probe = torch.arange(3, 40).reshape(1, -1)
        result.engine.module.eval()
        with torch.no_grad():
            logits = result.engine(input_ids=probe, use_cache=False).logits
        if torch.distributed.get_rank() == 0:
            torch.save({"input_ids": probe, "logits": logits.cpu()}, workdir / "wide_logits.pt")
if torch.distributed.get_rank() == 0:
    (workdir / "metrics.json").write_text(json.dumps(results))
lorakit.distributed.leave_distributed()  # every rank done before the interpreter tears the group down
