"""Launched by tests/engine/test_cuda_graphs.py as `torchrun --nproc_per_node N cuda_graphs_driver.py WORKDIR MODEL
DATA` on N CUDA GPUs (2 where the host has them).

The same training four ways, in one process group: compiled layers in torch.compile's default mode and with
reduce-overhead (CUDA graphs) asked for, each under ZeRO-2 and under ZeRO-3 with every weight kept whole (the tiny
model fits, so lorakit removes ZeRO-3's per-layer hooks; lorakit runs ZeRO-3 without the graphs, saying so). Two
micro-batches a step (a replay's outputs must not be overwritten while DeepSpeed still holds a LoRA gradient of the
previous micro-batch), packed rows of two lengths (128 and 256 tokens: one graph each, replayed many times), an
evaluation every 4 steps (graphs recorded without autograd), LoRA dropout off (the two modes draw different random
numbers), checkpoints saved under ZeRO-3 every 5 steps.
Rank 0 writes `metrics.json`: per run, inductor's count of graphs it declined to record, and the graphs recorded;
and, for the ZeRO-2 runs, `grads_step2.pt` in the run's folder: every LoRA gradient of step 2 (GradientCapture).
"""

import functools
import json
import sys
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


class GradientCapture:
    """Every trained parameter's gradient in step 2's backward (its two micro-batches summed), as the backward hands
    it over: a tensor hook on each, registered after step 1 (whose lora_A gradients are all zero: lora_B starts at
    zero) and removed after step 2. A replay that handed DeepSpeed a gradient from the wrong buffer shows here, tensor
    by tensor, where the loss and the norm average it away."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def __call__(self, info: lorakit.StepInfo) -> None:
        if info.step == 1:
            for name, param in info.model.engine.module.named_parameters():
                if param.requires_grad:
                    self.handles.append(param.register_hook(functools.partial(self.keep, name)))
        elif info.step == 2:
            for handle in self.handles:
                handle.remove()

    def keep(self, name: str, grad: torch.Tensor) -> None:
        self.grads[name] = self.grads.get(name, 0) + grad.detach().float().cpu()


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


results = {}
for name, flags in RUNS.items():
    torch._dynamo.reset()  # each run compiles and records afresh (and clears the graphs of the run before)
    counters.clear()
    capture = GradientCapture()
    config = lorakit.Config.from_flat({**common, **flags, "output_dir": str(workdir / name)})
    result = lorakit.train(config, on_step=capture if flags.get("zero_stage") == 2 else None)
    if capture.grads and torch.distributed.get_rank() == 0:
        torch.save(capture.grads, workdir / name / "grads_step2.pt")
    results[name] = result.metrics | {"cudagraph_skips": counters["inductor"]["cudagraph_skips"],
                                      "graphs": recorded_graphs()}  # fmt: skip
    del result
if torch.distributed.get_rank() == 0:
    (workdir / "metrics.json").write_text(json.dumps({"world_size": torch.distributed.get_world_size(), **results}))
lorakit.distributed.leave_distributed()
