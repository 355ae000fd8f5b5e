"""An experiment, not lorakit's code path: examples/sft.py with DeepSpeed's per-step host synchronisations replaced
by waits on the device, to measure what they cost before building the lever into lorakit (issue 11).

    torchrun --nproc_per_node 4 benchmarks/device_wait.py FLAGS...    (bench.py: the `*-devicewait` runs)

Where DeepSpeed 0.19 blocks the CPU until the GPU catches up, once or twice a step in both ZeRO stages:
- the end of each micro-batch's backward with `overlap_comm` (`independent_gradient_partition_epilogue`): stage 3
  synchronises its reduction stream, stage 2 the whole device, so that the optimizer step reads finished
  gradient partitions. Here the current stream waits for the reduction stream instead: the same order on the GPU,
  and the CPU goes on queueing the optimizer step;
- the gradient norm's validity, read on the host as a bool (stage 3's `step`, stage 2's `unscale_and_clip_grads`).
  Here a norm on the GPU counts as valid: a non-finite step is then applied rather than skipped, and lorakit's own
  check (lorakit.agreement, on the device, read a step late) stops the run without saving it. bf16/fp32 only: fp16's
  loss scaling needs DeepSpeed's skip.
What the CPU cannot run ahead of: lorakit's one-step-late read of each step's flags, and its logging steps.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def norm_read_on_device(original: Any) -> Any:
    def is_invalid_grad_norm(norm: Any) -> bool:
        if torch.is_tensor(norm) and norm.is_cuda:
            return False
        return original(norm)

    return is_invalid_grad_norm


def epilogue_waiting_on_device(original: Any, stream_of: Any) -> Any:
    """DeepSpeed's epilogue with the accelerator's synchronisations (device-wide or one stream's) turned into the
    current stream waiting for the reduction stream."""
    from deepspeed.accelerator import get_accelerator

    def epilogue(self: Any) -> Any:
        accelerator, stream = get_accelerator(), stream_of(self)
        if stream is None or not torch.cuda.is_available():
            return original(self)

        def wait(*_: Any) -> None:
            torch.cuda.current_stream().wait_stream(stream)

        saved_sync, saved_stream_sync = accelerator.synchronize, stream.synchronize
        accelerator.synchronize, stream.synchronize = wait, wait
        try:
            return original(self)
        finally:
            accelerator.synchronize, stream.synchronize = saved_sync, saved_stream_sync

    return epilogue


def patch_deepspeed() -> None:
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    stage3.is_invalid_grad_norm = norm_read_on_device(stage3.is_invalid_grad_norm)
    stage_1_and_2.is_invalid_grad_norm = norm_read_on_device(stage_1_and_2.is_invalid_grad_norm)
    three, two = stage3.DeepSpeedZeroOptimizer_Stage3, stage_1_and_2.DeepSpeedZeroOptimizer
    three.independent_gradient_partition_epilogue = epilogue_waiting_on_device(
        three.independent_gradient_partition_epilogue, lambda self: self.reduce_and_partition_stream
    )
    two.independent_gradient_partition_epilogue = epilogue_waiting_on_device(
        two.independent_gradient_partition_epilogue, lambda self: self.reduction_stream
    )


if __name__ == "__main__":
    from lorakit.cli import main

    patch_deepspeed()
    sys.exit(main(sys.argv[1:], prog="benchmarks/device_wait.py"))
