"""Where a step's time goes: lorakit's own set-up and `run_step`, a few steps under torch.profiler.

    torchrun --nproc_per_node 2 benchmarks/profile_steps.py OUT.txt FLAGS...   (the flags of examples/sft.py)
Rank 0 writes the wall time per step and the top operators by CUDA time and by CPU time.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lorakit.cli import parse_config
from lorakit.engine.warmup import wait_for_warmup
from lorakit.train import run_step, set_learning_rate, set_up, step_plans
from lorakit.validate import validate

out, config = sys.argv[1], parse_config(sys.argv[2:])
run = set_up(checked := validate(config))
wait_for_warmup(run.warmup)  # the compile warm-up (GPU only), as train() waits for it
engine, dist = run.built.engine, run.dist
COMPILE_MODE = os.environ.get("LORAKIT_BENCH_COMPILE", "")  # an experiment: decoder layers through torch.compile
if COMPILE_MODE:  # "default", or "reduce-overhead" (CUDA graphs, one per row shape: rows are multiples of 128)
    torch._dynamo.config.cache_size_limit = 64  # one graph per row length
    for module in engine.module.modules():
        if module.__class__.__name__.endswith("DecoderLayer"):  # forward only: ZeRO-3's module hooks stay eager
            # default mode: one compile whatever the row length (rows differ step to step); CUDA graphs: per shape
            dynamic = None if COMPILE_MODE == "default" else False
            module.forward = torch.compile(module.forward, mode=COMPILE_MODE, dynamic=dynamic)
set_learning_rate(engine, config.train.learning_rate)
plans = step_plans(run)
engine.train()


def steps(count: int) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(count):
        run_step(engine, run.data, next(plans), dist, checked.tokenizer.pad_token_id, config.train.packing)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / count


warm = steps(8)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    profiled = steps(5)
plain = steps(10)
python_profile = cProfile.Profile()  # where the CPU's Python time goes (DeepSpeed's hooks, PEFT, lorakit)
python_profile.enable()
python_steps = steps(5)
python_profile.disable()
if dist.is_main:
    table = prof.key_averages()
    summary = (f"seconds per step: warm-up {warm:.3f}, profiled {profiled:.3f}, plain {plain:.3f}, "
               f"under cProfile {python_steps:.3f}")  # fmt: skip
    with open(out, "w") as handle:
        handle.write(summary + "\n\n")
        handle.write(table.table(sort_by="cuda_time_total", row_limit=25) + "\n\n")
        handle.write(table.table(sort_by="cpu_time_total", row_limit=25) + "\n\n")
        for order in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(python_profile, stream=text).sort_stats(order).print_stats(40)
            handle.write(text.getvalue() + "\n")
    print(summary)
