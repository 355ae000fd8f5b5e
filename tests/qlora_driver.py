"""Launched by tests/engine/test_qlora_gpu.py as `torchrun --nproc_per_node N qlora_driver.py WORKDIR MODEL DATA`
on N CUDA GPUs (2 where the host has them).

QLoRA (--quantization_bit 4, bf16) trained three ways on the same data, in one process group: ZeRO-2 (nothing
partitioned: the reference); ZeRO-3 with a persistence threshold of 0, so every packed 4-bit weight, norm and
LoRA matrix is partitioned and gathered a decoder layer at a time; and ZeRO-3 with lorakit's automatic threshold
(the tiny model's weights fit, so they are kept whole, as a 7B's are on 80 GB cards). Then DoRA on the 4-bit
layers under ZeRO-2 and partitioned ZeRO-3, and 8 bits under ZeRO-2. After the partitioned run,
its model's logits on a fixed batch (every rank in the forward, as ZeRO-3 needs). Rank 0 writes `metrics.json`
(world size, the batch, and where the logits are) and `logits.pt`; each run's output_dir has its
trainer_log.jsonl and adapter.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed

import lorakit
from lorakit.engine.deepspeed_config import default_deepspeed_config

workdir, model, data = (Path(p) for p in sys.argv[1:4])
partitioned = default_deepspeed_config()
partitioned["zero_optimization"]["stage3_param_persistence_threshold"] = 0
(workdir / "ds_partitioned.json").write_text(json.dumps(partitioned))
common = {
    "model_name_or_path": str(model),
    "template": "qwen",
    "dataset_dir": str(data),
    "dataset": ("tiny",),
    "cutoff_len": 256,
    "bf16": True,
    "quantization_bit": 4,
    "enable_liger_kernel": False,  # the same kernels in every run, installed or not
    "learning_rate": 1e-2,
    "num_train_epochs": 2,  # 12 steps on 2 ranks
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "lora_target": ("all",),
    "lora_rank": 8,
    "seed": 7,
    "packing": False,
    "per_device_train_batch_size": 4,
}
RUNS = {
    "zero2": {"zero_stage": 2},
    "zero3": {"deepspeed": str(workdir / "ds_partitioned.json")},
    "zero3_kept": {},  # lorakit's default config: ZeRO-3, frozen weights kept whole when they fit
    "dora_zero2": {"zero_stage": 2, "use_dora": True},
    "dora_zero3": {"deepspeed": str(workdir / "ds_partitioned.json"), "use_dora": True},
    "int8_zero2": {"zero_stage": 2, "quantization_bit": 8},
}
logits = None
for name, flags in RUNS.items():
    result = lorakit.train(lorakit.Config.from_flat({**common, **flags, "output_dir": str(workdir / name)}))
    if name == "zero3":
        batch = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
        module = result.engine.module.eval()
        with torch.no_grad():
            logits = module(input_ids=batch.to(result.engine.device)).logits.float().cpu()
    del result
if torch.distributed.get_rank() == 0:
    torch.save({"input_ids": batch, "logits": logits}, workdir / "logits.pt")
    (workdir / "metrics.json").write_text(json.dumps({"world_size": torch.distributed.get_world_size()}))
lorakit.distributed.leave_distributed()  # every rank done before the interpreter tears the group down
