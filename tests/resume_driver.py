"""Launched by tests/test_resume.py as `torchrun --nproc_per_node 2 resume_driver.py WORKDIR MODEL DATA`.

In one process group: the uninterrupted run `full` (3 epochs of 3 steps, a checkpoint every step, dropout and
NEFTune on so RNG state matters), then `mid` resumed from checkpoint-4 (mid-epoch) and `boundary` from
checkpoint-3 (an epoch boundary), then `legacy` from checkpoint-4 rewritten in lorakit's earlier layout (pickled
RNG files, no file list) with --unpickle_legacy_checkpoint, then `diverge`, whose huge learning rate must stop it
at a non-finite loss. Last, `compiled_full` (2 epochs, the decoder layers through torch.compile's inductor, whose
dropout draws its seeds from torch's generator each time a graph runs) and `compiled_mid` resumed from its
checkpoint-4.
"""

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import lorakit
from lorakit.cli import parse_config
from lorakit.rng import load_rng_state


def write_legacy_copy(checkpoint: Path, copy: Path, world_size: int) -> None:
    """The checkpoint as lorakit wrote it before issue 16: torch.save'd RNG dicts, no `files` in the state."""
    shutil.copytree(checkpoint, copy)
    for rank in range(world_size):
        load_rng_state(copy / f"rng_state_rank{rank}.safetensors")  # the saved states, in this process's RNGs
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        torch.save(state, copy / f"rng_state_rank{rank}.pt")
        (copy / f"rng_state_rank{rank}.safetensors").unlink()
    state = json.loads((copy / "lorakit_state.json").read_text())
    del state["files"]
    (copy / "lorakit_state.json").write_text(json.dumps(state))


workdir, model, data = sys.argv[1:4]
base = ["--model_name_or_path", model, "--template", "qwen", "--dataset_dir", data, "--dataset", "tiny",
        "--cutoff_len", "256", "--learning_rate", "1e-2", "--num_train_epochs", "3", "--per_device_train_batch_size",
        "4", "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--save_steps", "1", "--lora_rank", "4",
        "--lora_dropout", "0.1", "--neftune_noise_alpha", "5", "--seed", "11", "--warmup_steps", "2"]  # fmt: skip
runs = [("full", []), ("mid", ["--resume_from_checkpoint", f"{workdir}/full/checkpoint-4"]),
        ("boundary", ["--resume_from_checkpoint", f"{workdir}/full/checkpoint-3"])]  # fmt: skip
for name, extra in runs:
    lorakit.train(parse_config([*base, *extra, "--output_dir", f"{workdir}/{name}"]))
legacy = Path(workdir, "old", "checkpoint-4")
if torch.distributed.get_rank() == 0:
    write_legacy_copy(Path(workdir, "full", "checkpoint-4"), legacy, torch.distributed.get_world_size())
torch.distributed.barrier()
lorakit.train(parse_config([*base, "--resume_from_checkpoint", str(legacy), "--unpickle_legacy_checkpoint",
                            "--output_dir", f"{workdir}/legacy"]))  # fmt: skip
try:
    lorakit.train(parse_config([*base, "--learning_rate", "1e30", "--output_dir", f"{workdir}/diverge"]))
    message = "no error"
except lorakit.LorakitError as err:
    message = str(err)
if torch.distributed.get_rank() == 0:
    Path(workdir, "diverge_error.txt").write_text(message)
compiled = [*base, "--torch_compile", "true", "--num_train_epochs", "2"]
lorakit.train(parse_config([*compiled, "--output_dir", f"{workdir}/compiled_full"]))
# A resumed process compiles anew: static shapes at its first step, where the uninterrupted run was already on its
# dynamic-shape graphs. Dropping dynamo's graphs does the same here (inductor's on-disk cache keeps it quick).
torch._dynamo.reset()
lorakit.train(parse_config([*compiled, "--resume_from_checkpoint", f"{workdir}/compiled_full/checkpoint-4",
                            "--output_dir", f"{workdir}/compiled_mid"]))  # fmt: skip
lorakit.distributed.leave_distributed()  # every rank done before the interpreter tears the group down
