"""Launched by tests/test_resume.py as `torchrun --nproc_per_node 2 resume_driver.py WORKDIR MODEL DATA`.

In one process group: the uninterrupted run `full` (6 epochs of 3 steps, a checkpoint every step, dropout and
NEFTune on so RNG state matters), then `mid` resumed from checkpoint-4 (mid-epoch) and `boundary` from
checkpoint-3 (an epoch boundary), then `diverge`, whose huge learning rate must stop it at a non-finite loss.
"""

import sys
from pathlib import Path

import torch

import lorakit
from lorakit.cli import parse_config

workdir, model, data = sys.argv[1:4]
base = ["--model_name_or_path", model, "--template", "qwen", "--dataset_dir", data, "--dataset", "tiny",
        "--cutoff_len", "256", "--learning_rate", "1e-2", "--num_train_epochs", "6", "--per_device_train_batch_size",
        "4", "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--save_steps", "1", "--lora_rank", "4",
        "--lora_dropout", "0.1", "--neftune_noise_alpha", "5", "--seed", "11", "--warmup_steps", "2"]  # fmt: skip
runs = [("full", []), ("mid", ["--resume_from_checkpoint", f"{workdir}/full/checkpoint-4"]),
        ("boundary", ["--resume_from_checkpoint", f"{workdir}/full/checkpoint-3"])]  # fmt: skip
for name, extra in runs:
    lorakit.train(parse_config([*base, *extra, "--output_dir", f"{workdir}/{name}"]))
try:
    lorakit.train(parse_config([*base, "--learning_rate", "1e30", "--output_dir", f"{workdir}/diverge"]))
    message = "no error"
except lorakit.LorakitError as err:
    message = str(err)
if torch.distributed.get_rank() == 0:
    Path(workdir, "diverge_error.txt").write_text(message)
