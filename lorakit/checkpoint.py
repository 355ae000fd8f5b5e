"""What a run writes: the adapter in PEFT format, the run files, and checkpoints that resume exactly.

Under ZeRO-3 each rank holds a slice of every LoRA matrix, and `save_pretrained` on the wrapped model would
write those slices: the classic empty or 40-byte adapter. Everything is gathered first (LoRA is small), then
rank 0 writes it, so `PeftModel.from_pretrained(base, output_dir)` works in a plain process.

A checkpoint `output_dir/checkpoint-N/` holds
- `adapter_model.safetensors` + `adapter_config.json`: the adapter, usable on its own;
- `trainer_state.safetensors`: per LoRA tensor, the fp32 master weight and AdamW's exp_avg / exp_avg_sq,
  unpartitioned, so a checkpoint made on one number of ranks resumes on any other;
- `rng_state_rank{R}.safetensors`: every rank's torch / CUDA / numpy / python RNG states (dropout, NEFTune), as
  tensors and JSON (lorakit.rng): nothing in a checkpoint is pickled, so loading one runs no code from it;
- `lorakit_config.json`: the resolved configuration;
- `lorakit_state.json`: step, data position (epoch and examples of its order consumed), the optimizer step
  counters, the fingerprint of data + model + LoRA, the running loss, and `files`: every other file of the
  checkpoint with its size and sha256, checked before a resume reads anything else (a copy that arrived
  truncated or altered is named, not loaded). It is written last, inside a folder named
  `.checkpoint-N.incomplete` that is renamed only when complete: a folder without it is never resumed.

Checkpoints written before this layout (pickled `rng_state_rank{R}.pt`, no `files`) are refused unless the user
passes --unpickle_legacy_checkpoint (lorakit.resume).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lorakit.distributed import DistInfo
from lorakit.files import file_record, follow_umask, save_safetensors
from lorakit.pissa import INITIAL_FOLDER, PissaStart, write_adapter
from lorakit.rng import legacy_rng_file, load_legacy_rng_state, load_rng_state, rng_file, save_rng_state
from lorakit.run_record import CONFIG_FILE
from lorakit.steps import Position

STATE_FILE = "lorakit_state.json"
TRAINER_STATE = "trainer_state.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's name for a default adapter's weights
REQUIRED = (ADAPTER_WEIGHTS, TRAINER_STATE, CONFIG_FILE)  # a file list without one of these is not lorakit's
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
OPTIMIZER_STATES = ("exp_avg", "exp_avg_sq")


def trainable_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def gather_adapter_state(model: Any, is_main: bool) -> dict[str, torch.Tensor]:
    """Full LoRA tensors (on the CPU) on the main rank; every rank must call this. A tied weight appears under
    each of its names (a tied output head's trained copy is the embedding's: PEFT saves it under both)."""
    import deepspeed

    trainable = trainable_parameters(model)
    with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
        if not is_main:
            return {}
        named = model.named_parameters(remove_duplicate=False)
        return {name: p.detach().to("cpu", copy=True) for name, p in named if p.requires_grad}


def save_adapter(model: Any, directory: Path, is_main: bool, pissa: PissaStart | None = None) -> None:
    """`adapter_model.safetensors` + `adapter_config.json` in `directory` (every rank must call this); a PiSSA
    adapter as --pissa_convert says (lorakit.pissa)."""
    state = gather_adapter_state(model, is_main)
    if is_main:
        write_adapter(model, directory, state, pissa)
        follow_umask(directory / ADAPTER_WEIGHTS)  # written by safetensors: 0600 otherwise (lorakit.files)
        if (directory / INITIAL_FOLDER).is_dir():
            follow_umask(directory / INITIAL_FOLDER / ADAPTER_WEIGHTS)


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)


def gather_trainer_state(engine: Any) -> dict[str, torch.Tensor]:
    """fp32 master weights and AdamW moments of every LoRA tensor, whole, on every rank (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    link_optimizer_states(engine.optimizer)
    state = {}
    for name, param in trainable_parameters(engine.module):
        master = safe_get_full_fp32_param(param)
        moments = {key: safe_get_full_optimizer_state(param, key) for key in OPTIMIZER_STATES}
        if master is None:  # no ZeRO partitioning: the torch optimizer holds the parameter itself
            master, opt_state = param.detach(), engine.optimizer.state[param]
            moments = {key: opt_state[key] for key in OPTIMIZER_STATES}
        state[f"{name}::master"] = master.reshape(_full_shape(param)).float().cpu()
        for key, value in moments.items():
            state[f"{name}::{key}"] = value.reshape(_full_shape(param)).float().cpu()
    return state


def optimizer_step_counters(engine: Any) -> list[float]:
    """AdamW's bias-correction step counters (per parameter group for fused Adam, per state for torch's)."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    counters = [float(g["step"]) for g in optimizer.param_groups if "step" in g]
    return counters + [float(s["step"]) for s in optimizer.state.values() if "step" in s]


def save_checkpoint(engine: Any, output_dir: Path, position: Position, extra: dict[str, Any], dist: DistInfo,
                    pissa: PissaStart | None = None) -> Path:  # fmt: skip
    """Write checkpoint-<step> atomically (every rank must call this); returns its path. Its adapter is saved as
    the final one is (`pissa`); the trainer state holds what resumes, PiSSA's unconverted A and B."""
    final = output_dir / f"checkpoint-{position.step}"
    incomplete = output_dir / f".{final.name}.incomplete"
    if dist.is_main:
        shutil.rmtree(incomplete, ignore_errors=True)
        incomplete.mkdir(parents=True)
    dist.barrier()
    save_rng_state(incomplete / rng_file(dist.rank))
    dist.barrier()  # every rank's file is in before rank 0 may rename the folder
    trainer_state = gather_trainer_state(engine)
    save_adapter(engine.module, incomplete, dist.is_main, pissa)
    if dist.is_main:
        save_safetensors(trainer_state, incomplete / TRAINER_STATE)
        shutil.copyfile(output_dir / CONFIG_FILE, incomplete / CONFIG_FILE)
        state = {"position": asdict(position), "world_size": dist.world_size,
                 "optimizer_steps": optimizer_step_counters(engine), **extra,
                 "files": file_list(incomplete)}  # fmt: skip
        (incomplete / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(incomplete, final)
    dist.barrier()
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def file_list(checkpoint: Path) -> dict[str, dict[str, Any]]:
    """Every file of a checkpoint folder but lorakit_state.json (which holds this list), with size and sha256."""
    files = sorted(p for p in checkpoint.iterdir() if p.is_file() and p.name != STATE_FILE)
    return {p.name: file_record(p) for p in files}


def is_legacy(state: dict[str, Any]) -> bool:
    """Written before checkpoints listed their files (and pickled their RNG states)."""
    return "files" not in state


def first_difference(checkpoint: Path, state: dict[str, Any]) -> str | None:
    """None when every file the checkpoint lists is there as written; else what differs about the first, in
    name order, that is not."""
    files = state["files"]
    unlisted = [name for name in REQUIRED if name not in files]
    if unlisted:
        return f"{unlisted[0]} is not in the file list of {STATE_FILE}"
    for name, expected in sorted(files.items()):
        path = checkpoint / name
        if Path(name).name != name or not path.is_file():  # the list names files of this folder only
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} when it was written"
        if file_record(path)["sha256"] != expected["sha256"]:
            return f"{name} differs from the file that was written (sha256)"
    return None


def load_checkpoint(engine: Any, checkpoint: Path, dist: DistInfo, unpickle_legacy: bool = False) -> None:
    """Put a checkpoint's weights, optimizer moments, step counters and (same world size) RNG states back.
    The checkpoint has been verified (lorakit.resume); a legacy one's pickled RNG files are read only when
    `unpickle_legacy` (--unpickle_legacy_checkpoint) says so."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    saved = load_file(checkpoint / TRAINER_STATE)
    _create_optimizer_state(engine.optimizer)
    link_optimizer_states(engine.optimizer)
    trainable = trainable_parameters(engine.module)
    with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=0):
        for name, param in trainable:  # the working copy the forward pass uses (bf16 or fp32)
            param.data.copy_(saved[f"{name}::master"].to(param.device, param.dtype))
    for name, param in trainable:
        master = saved[f"{name}::master"].to(dist.device)
        if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
            safe_set_full_fp32_param(param, master)
            for key in OPTIMIZER_STATES:
                safe_set_full_optimizer_state(param, saved[f"{name}::{key}"].to(dist.device), key)
        else:
            for key in OPTIMIZER_STATES:
                engine.optimizer.state[param][key].copy_(saved[f"{name}::{key}"].to(param.device))
    state = read_state(checkpoint)
    _set_step_counters(engine, state["optimizer_steps"])
    if state["world_size"] != dist.world_size:
        return  # other ranks, other streams: dropout starts anew (resume.plan_resume says so)
    if not is_legacy(state) and rng_file(dist.rank) in state["files"]:
        load_rng_state(checkpoint / rng_file(dist.rank))
    elif is_legacy(state) and unpickle_legacy and (checkpoint / legacy_rng_file(dist.rank)).is_file():
        load_legacy_rng_state(checkpoint / legacy_rng_file(dist.rank))


def _create_optimizer_state(zero_optimizer: Any) -> None:
    """AdamW creates its moments lazily at the first step; a resumed run needs them before, to fill them in.
    (ZeRO-3 hands its flat fp32 partitions to the inner optimizer only during a step, hence the second source.)"""
    optimizer = getattr(zero_optimizer, "optimizer", zero_optimizer)
    torch_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params + list(getattr(zero_optimizer, "fp32_partitioned_groups_flat", [])):
        state = optimizer.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32) if torch_adam else 0
            for key in OPTIMIZER_STATES:
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)


def link_optimizer_states(zero_optimizer: Any) -> None:
    """Point every parameter's view of its moments at the optimizer's state again (ZeRO-1/2). DeepSpeed 0.19 links
    them once, right after the first group's first step, when a second group (LoRA+'s lora_B) has no state yet: its
    moments would then be unreadable by parameter, and unsettable on resume."""
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def _set_step_counters(engine: Any, counters: list[float]) -> None:
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    slots = [g for g in optimizer.param_groups if "step" in g] + [s for s in optimizer.state.values() if "step" in s]
    value = counters[0] if counters else 0.0
    for slot in slots:
        if isinstance(slot["step"], torch.Tensor):
            slot["step"].fill_(value)
        else:
            slot["step"] = type(slot["step"])(value)


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """checkpoint-N folders, complete or not, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / STATE_FILE).is_file() and (checkpoint / TRAINER_STATE).is_file()


def prune_checkpoints(output_dir: Path, keep: int, saved: Path | None = None) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep = 0: delete none). `saved`, the one just written,
    counts as the newest whatever its step: a run resumed from an older checkpoint writes below the steps the earlier
    run left behind, and must not delete its own checkpoints (and the one it resumed from) while keeping those."""
    complete = [p for p in checkpoint_folders(output_dir) if is_complete(p) and p != saved]
    complete += [saved] if saved is not None else []
    for old in complete[: max(0, len(complete) - keep)] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
