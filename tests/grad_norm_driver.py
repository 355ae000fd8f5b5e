"""Launched by tests/test_grad_norm.py as one process: `python grad_norm_driver.py WORKDIR MODEL`.

lorakit under --zero_stage 0 in fp32 (DeepSpeed's stage-0 path with the optimizer as given, which clips inside its
step and keeps no norm), with DeepSpeed's engine watched here:

- `clipped`: 3 steps clipped to --max_grad_norm 0.1; at each optimizer step, the norm of the gradients the engine
  is about to step with, computed here from every parameter's .grad (before DeepSpeed clips them);
- `poisoned`: one gradient made infinite after step 2's backward (its loss stays finite): the run must stop there;
- `bf16_*`: ZeRO-2 in bf16, where lorakit turns DeepSpeed's per-gradient overflow check off
  (lorakit.engine.deepspeed_config.leave_overflow_check_to_lorakit): `bf16_checked` with the check kept on by a
  DeepSpeed file, `bf16_unchecked` with lorakit's default, `bf16_poisoned` as `poisoned` with that default.

What it saw goes to WORKDIR/seen.json.
"""

import hashlib
import json
import math
import sys
from pathlib import Path

import tiny
from deepspeed.runtime.engine import DeepSpeedEngine
from safetensors.torch import load_file

import lorakit
from lorakit.errors import LorakitError

workdir, model = Path(sys.argv[1]), Path(sys.argv[2])
norms: list[float] = []
checks: list[bool] = []  # at each step, whether DeepSpeed's optimizer checks the gradients for overflow
poison_at: list[int] = []  # the engine's step count (steps done) whose last backward is poisoned
step, backward = DeepSpeedEngine.step, DeepSpeedEngine.backward


def watched_step(engine: DeepSpeedEngine, *args, **kwargs):
    grads = [p.grad.double() for p in engine.module.parameters() if p.grad is not None]
    norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))
    checks.append(bool(getattr(engine.optimizer, "check_grad_overflow", False)))
    return step(engine, *args, **kwargs)


def poisoning_backward(engine: DeepSpeedEngine, *args, **kwargs):
    """On a poisoned step, one trained parameter's gradient gets an infinite element as the backward produces it
    (a tensor hook: under ZeRO-2 the gradient moves into DeepSpeed's partitions, not .grad)."""
    if not (engine.global_steps in poison_at and engine.is_gradient_accumulation_boundary()):
        return backward(engine, *args, **kwargs)

    def poison(grad):
        grad = grad.clone()
        grad.view(-1)[0] = math.inf
        return grad

    handle = next(p for p in engine.module.parameters() if p.requires_grad).register_hook(poison)
    try:
        return backward(engine, *args, **kwargs)
    finally:
        handle.remove()


DeepSpeedEngine.step, DeepSpeedEngine.backward = watched_step, poisoning_backward
# bf16 on the CPU: lorakit refuses it for users (fp32 is what the CPU trains in, lorakit.validate), but DeepSpeed's
# bf16 ZeRO-2 runs here, and its overflow check is what the bf16 runs compare
lorakit.validate.validate_precision = lambda config: None


def run(name: str, zero_stage: int = 0, bf16: bool = False, deepspeed: dict | None = None) -> dict:
    ds_file = None
    if deepspeed is not None:
        ds_file = workdir / f"{name}.json"
        ds_file.write_text(json.dumps(deepspeed))
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
            "zero_stage": zero_stage,
            "bf16": bf16,
            "deepspeed": str(ds_file) if ds_file else None,
            "seed": 7,
            "per_device_train_batch_size": 4,
        }  # fmt: skip
    )
    norms.clear(), checks.clear()
    try:
        lorakit.train(config, train_data=tiny.alpaca_records(48))
        error = None
    except LorakitError as err:
        error = str(err)
    log = [json.loads(line) for line in (workdir / name / "trainer_log.jsonl").read_text().splitlines()]
    logged = [e["grad_norm"] for e in log if "grad_norm" in e]
    adapter = workdir / name / "adapter_model.safetensors"
    digest = hashlib.sha256()
    for key, tensor in sorted(load_file(adapter).items()) if adapter.exists() else ():
        digest.update(key.encode() + tensor.float().numpy().tobytes())
    losses = [e["loss"] for e in log if "loss" in e]
    saved = digest.hexdigest() if adapter.exists() else None
    return {"norms": list(norms), "logged": logged, "losses": losses, "checks": list(checks), "adapter": saved,
            "error": error}  # fmt: skip


seen = {"clipped": run("clipped")}
poison_at.append(1)
seen["poisoned"] = run("poisoned")
poison_at.clear()
checked = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto", "check_grad_overflow": True}}
seen["bf16_checked"] = run("bf16_checked", zero_stage=2, bf16=True, deepspeed=checked)
seen["bf16_unchecked"] = run("bf16_unchecked", zero_stage=2, bf16=True)
poison_at.append(1)
seen["bf16_poisoned"] = run("bf16_poisoned", zero_stage=2, bf16=True)
(workdir / "seen.json").write_text(json.dumps(seen))
lorakit.distributed.leave_distributed()
