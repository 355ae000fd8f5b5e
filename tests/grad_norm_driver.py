"""Launched by tests/test_grad_norm.py as one process: `python grad_norm_driver.py WORKDIR MODEL`.

lorakit under --zero_stage 0 in fp32 (DeepSpeed's stage-0 path with the optimizer as given, which clips inside its
step and keeps no norm), with DeepSpeed's engine watched here:

- `clipped`: 3 steps clipped to --max_grad_norm 0.1; at each optimizer step, the norm of the gradients the engine
  is about to step with, computed here from every parameter's .grad (before DeepSpeed clips them);
- `poisoned`: one gradient made infinite after step 2's backward (its loss stays finite): the run must stop there.

What it saw goes to WORKDIR/seen.json.
"""

import json
import math
import sys
from pathlib import Path

import tiny
from deepspeed.runtime.engine import DeepSpeedEngine

import lorakit
from lorakit.errors import LorakitError

workdir, model = Path(sys.argv[1]), Path(sys.argv[2])
norms: list[float] = []
poison_at: list[int] = []  # the engine's step count (steps done) whose last backward is poisoned
step, backward = DeepSpeedEngine.step, DeepSpeedEngine.backward


def watched_step(engine: DeepSpeedEngine, *args, **kwargs):
    grads = [p.grad.double() for p in engine.module.parameters() if p.grad is not None]
    norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))
    return step(engine, *args, **kwargs)


def poisoning_backward(engine: DeepSpeedEngine, *args, **kwargs):
    result = backward(engine, *args, **kwargs)
    if engine.global_steps in poison_at and engine.is_gradient_accumulation_boundary():
        next(p for p in engine.module.parameters() if p.grad is not None).grad.view(-1)[0] = math.inf
    return result


DeepSpeedEngine.step, DeepSpeedEngine.backward = watched_step, poisoning_backward


def run(name: str) -> dict:
    config = lorakit.Config.from_flat(
        {
            "model_name_or_path": str(model),
            "template": "qwen",
            "output_dir": str(workdir / name),
            "cutoff_len": 256,
            "learning_rate": 2e-2,
            "max_steps": 3,
            "logging_steps": 1,
            "max_grad_norm": 0.1,  # below the norms: DeepSpeed clips every step
            "zero_stage": 0,
            "seed": 7,
            "per_device_train_batch_size": 4,
        }  # fmt: skip
    )
    norms.clear()
    try:
        lorakit.train(config, train_data=tiny.alpaca_records(48))
        error = None
    except LorakitError as err:
        error = str(err)
    log = [json.loads(line) for line in (workdir / name / "trainer_log.jsonl").read_text().splitlines()]
    return {"norms": list(norms), "logged": [e["grad_norm"] for e in log if "grad_norm" in e], "error": error}


seen = {"clipped": run("clipped")}
poison_at.append(1)
seen["poisoned"] = run("poisoned")
(workdir / "seen.json").write_text(json.dumps(seen))
lorakit.distributed.leave_distributed()
