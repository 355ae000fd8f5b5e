"""How fast a ZeRO-3 layer gather runs beside compute: one Qwen2.5-32B decoder layer's weights (487,605,248 bf16
elements) all-gathered over the GPUs of one host, alone and while the compute stream runs that layer's matmuls.

The 32B's profile (benchmarks/RESULTS.md, session 13) shows 6.2 ms of NCCL kernel time per layer gather, about
a third of what an all-reduce's measured bus bandwidth on these hosts would allow, and its forward bound by those
gathers. This tells apart the two readings: a slow collective (alone it is slow too), or one slowed by the
matmuls beside it (alone it is fast), and whether a high-priority NCCL stream (TORCH_NCCL_HIGH_PRIORITY=1) helps,
or leaving SMs to NCCL: CARVEOUT=k asks cuBLASLt's matmuls to use all but k SMs (torch's experimental
`_set_sm_carveout_experimental`), BLAS=cublaslt routes torch's matmuls through cuBLASLt.

    [TORCH_NCCL_HIGH_PRIORITY=1] [BLAS=cublaslt] [CARVEOUT=16] torchrun --nproc_per_node 4 \
        benchmarks/allgather_contention.py [OUT.json]
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

LAYER = 487_605_248  # Qwen2.5-32B: one decoder layer's weights
TOKENS, HIDDEN, INTERMEDIATE = 2944, 5120, 27648  # a 32B pass: one rank's largest share of a step
REPEATS = 20


def timed(fn, repeats: int = REPEATS) -> float:
    """Seconds per call of fn, after two warm-up calls, every rank in step."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    if os.environ.get("BLAS"):
        torch.backends.cuda.preferred_blas_library(os.environ["BLAS"])
    if os.environ.get("CARVEOUT"):
        torch._C._set_sm_carveout_experimental(int(os.environ["CARVEOUT"]))
    shard = torch.randn(LAYER // world, dtype=torch.bfloat16, device="cuda")
    gathered = torch.empty(shard.numel() * world, dtype=shard.dtype, device="cuda")
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.bfloat16, device="cuda")
    up = torch.randn(HIDDEN, 2 * INTERMEDIATE, dtype=torch.bfloat16, device="cuda")
    down = torch.randn(INTERMEDIATE, HIDDEN, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()

    def gather() -> None:
        with torch.cuda.stream(side):
            dist.all_gather_into_tensor(gathered, shard)
        torch.cuda.current_stream().wait_stream(side)

    def compute() -> None:  # an MLP's matmuls at the 32B's widths: about one layer's forward work
        for _ in range(2):
            h = x @ up
            h[:, :INTERMEDIATE] @ down

    def both() -> None:  # the gather on its own stream while the compute stream multiplies (DeepSpeed's prefetch)
        with torch.cuda.stream(side):
            dist.all_gather_into_tensor(gathered, shard)
        compute()
        torch.cuda.current_stream().wait_stream(side)

    alone, matmuls, overlapped = timed(gather), timed(compute), timed(both)
    gib = gathered.numel() * gathered.element_size()
    result = {
        "gpus": world, "card": torch.cuda.get_device_name(), "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "high_priority": os.environ.get("TORCH_NCCL_HIGH_PRIORITY", "0"), "blas": os.environ.get("BLAS", ""),
        "carveout": int(os.environ.get("CARVEOUT", "0")),
        "gather_ms": round(1e3 * alone, 3), "gather_bus_gb_per_s": round(gib * (world - 1) / world / alone / 1e9, 1),
        "compute_ms": round(1e3 * matmuls, 3), "both_ms": round(1e3 * overlapped, 3),
        "hidden_share": round((alone + matmuls - overlapped) / min(alone, matmuls), 3),
    }  # fmt: skip
    if rank == 0:
        print(json.dumps(result), flush=True)
        if len(sys.argv) > 1:
            with open(sys.argv[1], "a") as out:
                out.write(json.dumps(result) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
