"""What the ranks agree on after every optimizer step, without making the CPU wait for the GPU each step.

Three facts must be the same on every rank before a rank acts on them: whether a stop signal (SIGTERM, Ctrl-C)
arrived on any rank, whether the loss or gradient norm stopped being finite on any rank, and whether a hook
(lorakit.hooks) on any rank asked the run to stop. Reading them on the host (`float(loss)`, `.tolist()` of an
all-reduce) blocks the CPU until the GPU has finished the step, so the next step's kernels cannot be queued
behind it: on 4 H100s that idle gap was 23 % of a ZeRO-2 step (benchmarks/RESULTS.md). So each step's flags are
computed and all-reduced on the device, where nothing waits, copied to pinned host memory as soon as they are
done (lorakit.distributed.HostCopy: a `.tolist()` a step later would wait for the next step's whole work), and read
one step late, after the next step's work is queued.

A step that logs, evaluates, saves a checkpoint or ends the run reads its own flags before doing so: a
checkpoint is never written after a non-finite step, and the error names the first step that was not finite.
A stop signal, or a hook's stop, therefore ends the run one step later than it arrived at most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from lorakit.checkpoint import checkpoint_folders
from lorakit.distributed import HostCopy
from lorakit.errors import LorakitError


@dataclass
class StepFlags:
    """One step's agreement, still on the device until `read`."""

    step: int
    flags: HostCopy  # [signal number, 1 if not finite, 1 if a hook asked to stop], the maximum over ranks
    loss: torch.Tensor  # this rank's share of the step's loss, for the error message
    grad_norm: Any  # the global gradient norm before clipping (lorakit.train.run_step): a tensor, a float or None

    @classmethod
    def post(cls, step: int, signal_number: int, loss: torch.Tensor, grad_norm: Any, stop: bool = False) -> StepFlags:
        """Queue the step's flags and their all-reduce; nothing here waits for the GPU."""
        finite = torch.isfinite(loss.detach().float())
        if torch.is_tensor(grad_norm):
            finite = finite & torch.isfinite(grad_norm.detach().float().to(loss.device))
        elif grad_norm is not None:
            finite = finite & math.isfinite(float(grad_norm))
        signal = torch.full_like(loss, float(signal_number), dtype=torch.float32)
        flags = torch.stack([signal, (~finite).float(), torch.full_like(signal, float(stop))])
        torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX)
        return cls(step, HostCopy.queue(flags), loss, grad_norm)

    def read(self, output_dir: Path) -> tuple[int, bool]:
        """The signal number any rank received (0: none) and whether a hook on any rank asked to stop; a non-finite
        step on any rank stops the run here."""
        signal_number, not_finite, stop = self.flags.tolist()
        if not_finite:
            saved = [p.name for p in checkpoint_folders(output_dir)]
            last = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written"
            raise LorakitError(
                f"step {self.step}: the loss ({float(self.loss):.4g} on this rank) or gradient norm "
                f"({self.grad_norm_value()}) is not finite; stopped without saving, {last}; lower --learning_rate or "
                "check the data"
            )
        return int(signal_number), bool(stop)

    def grad_norm_value(self) -> float | None:
        return None if self.grad_norm is None else float(self.grad_norm)


def settle(earlier: StepFlags | None, current: StepFlags, must_read_current: bool, output_dir: Path) -> tuple[
        int, bool, StepFlags | None]:  # fmt: skip
    """Read the earlier step's flags (done by now) and, when this step acts or a stop came, this step's too.
    Returns the signal to act on now, whether a hook asked to stop, and the flags left to read after the next
    step."""
    signal_number, stop = earlier.read(output_dir) if earlier is not None else (0, False)
    if must_read_current or signal_number or stop:
        current_signal, current_stop = current.read(output_dir)
        return max(signal_number, current_signal), stop or current_stop, None
    return 0, False, current
