"""Launched by tests/engine/test_cuda_graphs.py as `torchrun --nproc_per_node N cuda_graphs_driver.py WORKDIR MODEL
DATA` on N CUDA GPUs (2 where the host has them).

The same training four ways, in one process group: compiled layers in torch.compile's default mode and with CUDA
graphs (reduce-overhead, asked for: the default of both where a pass is short), each under ZeRO-2 and under ZeRO-3 with
every weight kept whole (the tiny model fits, so lorakit removes ZeRO-3's per-layer hooks, and reduces the gradients
on the compute stream under graphs). Two micro-batches a step (a replay's outputs must not be overwritten while
DeepSpeed still holds a LoRA gradient of the previous micro-batch), packed rows of two lengths (128 and 256 tokens:
one graph each, replayed many times), an evaluation every 4 steps (graphs recorded without autograd), LoRA dropout
off (the two modes draw different random numbers), checkpoints saved under ZeRO-3 every 5 steps, and every trained
tensor written afresh after each step, the same values in every run (SameWeightsEachStep says why). Rank 0 writes
`metrics.json`: per run, inductor's count of graphs it declined to record, and the graphs recorded; and
`grads_stepN.pt` in the run's folder: every LoRA gradient of the CAPTURED_STEPS.
"""

import functools
import json
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed
from torch._dynamo.utils import counters

import lorakit

workdir, model, data = (Path(p) for p in sys.argv[1:4])
common = {
    "model_name_or_path": str(model),
    "template": "qwen",
    "dataset_dir": str(data),
    "dataset": ("tiny",),
    "cutoff_len": 256,
    "bf16": True,
    "enable_liger_kernel": False,
    "learning_rate": 1e-2,
    "num_train_epochs": 4,
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "lora_target": ("all",),
    "lora_rank": 8,
    "lora_dropout": 0.0,
    "seed": 7,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "val_size": 8,
    "eval_steps": 4,
}
RUNS = {
    "zero2_default": {"zero_stage": 2, "torch_compile_mode": "default"},
    "zero2_graphs": {"zero_stage": 2, "torch_compile_mode": "reduce-overhead"},
    "zero3_default": {"torch_compile_mode": "default", "save_steps": 5},
    "zero3_graphs": {"torch_compile_mode": "reduce-overhead", "save_steps": 5},
}


CAPTURED_STEPS = (2, 6)  # the first step that replays recorded graphs, and one after an evaluation's graphs


def same_values(name: str, step: int, like: torch.Tensor) -> torch.Tensor:
    """Values for a trained tensor before `step`: the same in every run and on every rank (seeded by both)."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1_000_003 * step)
    return torch.randn(like.shape, generator=generator).mul_(0.02).to(like.device, like.dtype)


class SameWeightsEachStep:
    """The hook that makes the runs comparable step by step: after each step it writes every trained tensor afresh
    (same_values), in place, so the next step's forward, loss, gradients and any evaluation start from the same
    weights with and without graphs, and a difference is the graphs' own. Training freely, the runs drift apart for
    a reason of their own (measured on 2 H100s, session 17): Adam's first step moves each element by the learning
    rate whatever its gradient's size, so a bf16 rounding of a near-zero lora_B gradient to the other sign became a
    2e-2 difference of that weight, step 2's k_proj lora_A gradients were 11 % apart, and a gradient spike at step 8
    (norm 8-9) put the losses 0.4 % apart (ZeRO-3 and ZeRO-2 without graphs: 0.9 %). DeepSpeed's optimizer keeps
    its own fp32 copy, so a write lasts one step: the update still comes from the gradients.

    It also keeps, for CAPTURED_STEPS, every trained tensor's gradient as the backward hands it over (its two
    micro-batches summed; a tensor hook on each, registered the step before): a replay that handed DeepSpeed a
    gradient from the wrong buffer shows here, tensor by tensor, where the loss and the norm average it away."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, torch.Tensor]] = {step: {} for step in CAPTURED_STEPS}
        self.handles: list = []

    def __call__(self, info: lorakit.StepInfo) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        trained = [(n, p) for n, p in info.model.engine.module.named_parameters() if p.requires_grad]
        with torch.no_grad():
            for name, param in trained:  # whole under ZeRO-3 too (the tiny model's weights all stay gathered)
                assert param.numel() == getattr(param, "ds_numel", param.numel()), f"{name} is partitioned"
                values = same_values(name, info.step + 1, param)
                param.copy_(values)
                write_own_partition(param, values)
        if info.step + 1 in CAPTURED_STEPS:
            for name, param in trained:
                self.handles.append(param.register_hook(functools.partial(self.keep, info.step + 1, name)))

    def keep(self, step: int, name: str, grad: torch.Tensor) -> None:
        self.grads[step][name] = self.grads[step].get(name, 0) + grad.detach().float().cpu()


def write_own_partition(param: torch.nn.Parameter, values: torch.Tensor) -> None:
    """Under ZeRO-3, `values` into this rank's partition of `param` as well (DeepSpeed's `ds_tensor`: the weight's
    flat elements from rank x its size on, the last rank's padded). A checkpoint save releases the adapter and the
    next forward gathers it back from the partitions: without this, the step after each save ran on DeepSpeed's own
    weights, which drift apart between runs (session 18: step 6's gradients and step 11's norm 4 % apart, the
    steps after the saves at 5 and 10)."""
    partition = getattr(param, "ds_tensor", None)
    if partition is None:
        return
    size = partition.numel()
    start = torch.distributed.get_rank(getattr(param, "ds_process_group", None)) * size
    piece = values.reshape(-1)[start : start + size]
    partition.view(-1)[: piece.numel()].copy_(piece)


def recorded_graphs() -> int:
    """The CUDA graphs inductor's graph trees hold on this GPU (recorded, not merely warmed up)."""
    from torch._inductor.cudagraph_trees import get_manager

    manager = get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    nodes = [node for roots in manager.roots.values() for node in roots] if manager is not None else []
    count = 0
    while nodes:
        node = nodes.pop()
        count += 1
        nodes += [child for children in node.children.values() for child in children]
    return count


# No compile warm-up process: beside one, these short runs of a tiny model would take their steps eager until it ended
# (lorakit.engine.warmup), and the compiled layers, the graphs' or not, would go untested; each run compiles at its
# first step instead, as one without a warm-up does
sys.modules["lorakit.train"].start_compile_warmup = lambda *args: (None, [])  # the module (lorakit.train: train())

results = {}
for name, flags in RUNS.items():
    torch._dynamo.reset()  # each run compiles and records afresh (and clears the graphs of the run before)
    counters.clear()
    hook = SameWeightsEachStep()
    config = lorakit.Config.from_flat({**common, **flags, "output_dir": str(workdir / name)})
    result = lorakit.train(config, on_step=hook)
    if torch.distributed.get_rank() == 0:
        for step, grads in hook.grads.items():
            torch.save(grads, workdir / name / f"grads_step{step}.pt")
    results[name] = result.metrics | {"cudagraph_skips": counters["inductor"]["cudagraph_skips"],
                                      "graphs": recorded_graphs()}  # fmt: skip
    del result
if torch.distributed.get_rank() == 0:
    (workdir / "metrics.json").write_text(json.dumps({"world_size": torch.distributed.get_world_size(), **results}))
lorakit.distributed.leave_distributed()
