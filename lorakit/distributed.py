"""Process-group set-up and the few collectives the loop needs.

Works under `deepspeed`, `torchrun` (which set RANK/LOCAL_RANK/WORLD_SIZE) and in a plain single process
(research code calling `lorakit.train`), for which a one-rank group on a free local port is made up.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_one_host(self) -> bool:
        """Every rank on this rank's machine: the launchers' LOCAL_WORLD_SIZE (torchrun and deepspeed set it) holds
        the whole world; a plain process (no launcher) is one host."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)) >= self.world_size

    def all_ok(self, ok: bool) -> bool:
        """True when every rank passes True (a collective: every rank must call it)."""
        flag = torch.tensor([1 if ok else 0], device=self.device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
        return bool(flag.item())

    def barrier(self) -> None:
        torch_dist.barrier()

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return tensor.tolist()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on its way to the GPU without stalling the CPU: a plain `.to("cuda")` waits until the GPU has
    finished all queued work (PyTorch synchronises the stream after a blocking copy), so the next forward could
    not be queued behind the last backward. A non-blocking copy from pageable memory is staged by the driver and
    returns at once, without waiting for the GPU."""
    return tensor.to(device, non_blocking=True)


@dataclass
class HostCopy:
    """A small device tensor's values on their way to the host, for reading a step later without draining the GPU's
    queue: a plain `.tolist()` of a CUDA tensor copies on the current stream and so waits for everything queued
    before it (by then the whole next step); this copy is queued right after the tensor is made, into pinned memory,
    and reading waits only for it. On the CPU the tensor itself."""

    values: torch.Tensor
    copied: torch.cuda.Event | None = None

    @classmethod
    def queue(cls, tensor: torch.Tensor) -> HostCopy:
        if not tensor.is_cuda:
            return cls(tensor)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(host, copied)

    def tolist(self) -> Any:
        if self.copied is not None:
            self.copied.synchronize()
        return self.values.tolist()


def launch_world_size() -> int:
    """World size as the launcher announced it, readable before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launch_local_rank() -> int:
    """This process's rank on its node, as the launcher announced it (0 in a plain single process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def notice_after(seconds: float, line: str) -> Iterator[None]:
    """Around a wait on another process: `line` on stderr if the wait lasts `seconds`, so nothing waits silently."""
    timer = threading.Timer(seconds, lambda: print(line, file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join (or create) the process group: NCCL on GPUs, gloo on the CPU."""
    import deepspeed  # deferred: importing deepspeed costs seconds, and config errors should not wait for it

    made_up_port = "RANK" not in os.environ and "MASTER_PORT" not in os.environ
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch_dist.is_initialized():
        join = _join_group_on_its_own_port if made_up_port else _join_group
        join(deepspeed, device)
    return DistInfo(torch_dist.get_rank(), local_rank, torch_dist.get_world_size(), device)


def _join_group_on_its_own_port(deepspeed: Any, device: torch.device, tries: int = 3) -> None:
    """A single process's made-up group: the port found free may be taken before the store binds it (torch's
    DistNetworkError, EADDRINUSE); this process chose it, so it may choose another."""
    for attempt in range(tries):
        try:
            return _join_group(deepspeed, device)
        except RuntimeError as err:
            if attempt == tries - 1 or "EADDRINUSE" not in str(err):
                raise
            os.environ["MASTER_PORT"] = str(_free_port())


def leave_distributed() -> None:
    """Wait for every rank, then tear the process group down before the interpreter does. Left to interpreter exit,
    the group's threads meet torch.compile's worker pool and DeepSpeed's globals in whatever order finalisation picks;
    one such exit aborted a rank ("terminate called without an active exception") after a finished run."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def _join_group(deepspeed: Any, device: torch.device) -> None:
    """deepspeed.init_distributed, which waits for every rank and, on a first run, builds DeepSpeed's CPU
    communication op (a JIT build behind a lock file): stale locks cleared first, and no wait silent past 60 s."""
    from lorakit.engine.jit import WAIT_NOTICE_S, clear_stale_build_locks, watch_build_locks

    for line in clear_stale_build_locks():
        print(f"lorakit: {line}", file=sys.stderr, flush=True)
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    joining = (f"lorakit: rank {os.environ['RANK']}: {WAIT_NOTICE_S:.0f} s in DeepSpeed's process-group set-up "
               f"(joining {os.environ['WORLD_SIZE']} ranks at {where}; on a first run also building its CPU "
               "communication op); a rank that failed or never started keeps the others here: check every rank's "
               "log")  # fmt: skip
    with watch_build_locks(), notice_after(WAIT_NOTICE_S, joining):
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
