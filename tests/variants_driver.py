"""Launched by tests/test_variants.py as
`torchrun --nproc_per_node 2 variants_driver.py WORKDIR MODEL DATA DS_FILE TIED_MODEL`.

Each LoRA variant (rsLoRA, LoRA+, DoRA, PiSSA, modules trained in full on MODEL and on TIED_MODEL, whose output
head is its embedding) trained under ZeRO-3 and under ZeRO-2 (nothing partitioned: the reference) on the same
data, in one process group; ZeRO-2's PiSSA run saves its adapter unconverted (--pissa_convert false). Before
training, DoRA's magnitude vectors and PiSSA's (exact-SVD) residual base and adapter as a ZeRO-3 engine
initialises them (from base weights partitioned at birth) are gathered and saved. Rank 0 writes what the test
compares: each run's trainer_log.jsonl (in its output_dir; LoRA+, DoRA, PiSSA and full-module runs resumed from
checkpoint-3 beside them; DoRA, PiSSA and full modules again under ZeRO-3 with every weight kept whole),
`dora_magnitudes.pt`, `pissa_start.pt`, `logits.pt` (every trained model's logits on PROBE, the live engine's) and
`metrics.json` with every run's final per-group learning rates.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed

import lorakit
from lorakit.distributed import init_distributed

workdir, model, data = (Path(p) for p in sys.argv[1:4])
PROBE = torch.arange(40).reshape(2, 20) % 300
common = {
    "model_name_or_path": str(model),
    "template": "qwen",
    "dataset_dir": str(data),
    "dataset": ("tiny",),
    "cutoff_len": 256,
    "learning_rate": 1e-2,
    "num_train_epochs": 1,
    "lr_scheduler_type": "constant",  # the last step's group rates are then the configured ones
    "logging_steps": 1,
    "lora_target": ("all",),
    "lora_rank": 4,
    "lora_alpha": 8,
    "max_grad_norm": 1.0,
    "seed": 7,
    "deepspeed": sys.argv[4],
    "packing": False,
    "per_device_train_batch_size": 4,
    "save_steps": 3,
}
FULL = {"additional_target": ("embed_tokens", "lm_head")}
VARIANTS = {
    "rslora": {"use_rslora": True},
    "loraplus": {"loraplus_lr_ratio": 16.0},
    "dora": {"use_dora": True},
    "pissa": {"pissa_init": True},
    "full": FULL,
    "tied": {**FULL, "model_name_or_path": sys.argv[5]},
}
STAGE_FLAGS = {"pissa_zero2": {"pissa_convert": False}}


def gathered(engine, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in engine.module.named_parameters() if any(part in n for part in names)}
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: param.detach().float().clone() for name, param in params.items()}


def probe_logits(engine) -> torch.Tensor:
    with torch.no_grad():
        return engine.module(input_ids=PROBE).logits.float()


dora = lorakit.Config.from_flat({**common, **VARIANTS["dora"], "output_dir": str(workdir / "probe")})
engine = lorakit.build_engine(dora, init_distributed()).engine
saved = gathered(engine, ("lora_magnitude_vector",))
if torch.distributed.get_rank() == 0:
    torch.save(saved, workdir / "dora_magnitudes.pt")
pissa = lorakit.Config.from_flat({**common, "pissa_init": True, "pissa_iter": -1, "output_dir": str(workdir / "probe")})
engine = lorakit.build_engine(pissa, init_distributed()).engine
saved = gathered(engine, ("base_layer.weight", "lora_A", "lora_B"))
if torch.distributed.get_rank() == 0:
    torch.save(saved, workdir / "pissa_start.pt")
del engine

results, logits = {}, {}
for variant, flags in VARIANTS.items():
    for stage in (3, 2):
        name = f"{variant}_zero{stage}"
        run = {**common, **flags, **STAGE_FLAGS.get(name, {}), "zero_stage": stage, "output_dir": str(workdir / name)}
        result = lorakit.train(lorakit.Config.from_flat(run))
        results[name] = {"lrs": [group["lr"] for group in result.engine.optimizer.param_groups]}
        logits[name] = probe_logits(result.engine)
# exact resume from checkpoint-3: LoRA+'s second optimizer group, DoRA's magnitude, PiSSA's residual base (the
# same decomposition again), the modules trained in full, restored by parameter
for name in ("loraplus_zero2", "loraplus_zero3", "dora_zero3", "pissa_zero3", "full_zero3"):
    variant, stage = name.split("_zero")
    resumed = {**common, **VARIANTS[variant], "zero_stage": int(stage), "output_dir": str(workdir / f"{name}_resumed")}
    lorakit.train(lorakit.Config.from_flat({**resumed, "resume_from_checkpoint": str(workdir / name / "checkpoint-3")}))
# DoRA under DeepSpeed's own per-module gathering (no whole layers): its forward reads the base weight outside the
# base layer's own forward, where DeepSpeed has released it again
per_module = json.loads(Path(sys.argv[4]).read_text())
per_module["zero_optimization"]["stage3_module_granularity_threshold"] = 0
(workdir / "ds_per_module.json").write_text(json.dumps(per_module))
flags = {**common, **VARIANTS["dora"], "deepspeed": str(workdir / "ds_per_module.json")}
lorakit.train(lorakit.Config.from_flat({**flags, "output_dir": str(workdir / "dora_per_module")}))
# every weight kept whole (as the memory plan does where they fit): ZeRO-3's per-unit hooks are removed, and the
# checkpoints saved every 3 steps partition the adapter, which must be gathered again before the next forward
resident = json.loads(Path(sys.argv[4]).read_text())
resident["zero_optimization"]["stage3_param_persistence_threshold"] = 10**12
(workdir / "ds_resident.json").write_text(json.dumps(resident))
for variant in ("dora", "pissa", "full"):
    flags = {**common, **VARIANTS[variant], "deepspeed": str(workdir / "ds_resident.json")}
    result = lorakit.train(lorakit.Config.from_flat({**flags, "output_dir": str(workdir / f"{variant}_resident")}))
    offload = result.engine.optimizer.parameter_offload
    results[f"{variant}_resident"] = {"unit_hooks": len(offload.forward_hooks) + len(offload.backward_hooks)}
if torch.distributed.get_rank() == 0:
    (workdir / "metrics.json").write_text(json.dumps(results))
    torch.save(logits, workdir / "logits.pt")
lorakit.distributed.leave_distributed()  # every rank done before the interpreter tears the group down
