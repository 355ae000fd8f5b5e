"""Deciding, before anything is loaded, whether and from where a run continues.

- Reference pitfall 3: a run started into an output_dir that holds checkpoints is an error unless
  --resume_from_checkpoint or --overwrite_output_dir says what to do.
- `--resume_from_checkpoint auto` takes the newest complete checkpoint in output_dir (incomplete ones are
  skipped with a warning; none at all starts afresh, so a preempted job can be relaunched with the same command).
- Before anything of a checkpoint is read, every file its lorakit_state.json lists is checked against its size
  and sha256: a checkpoint asked for by name must verify (the error names the first file that differs); `auto`
  falls back to the newest one that does, with a warning for each it passed over.
- A checkpoint of the earlier layout (pickled RNG files, no file list) is refused unless
  --unpickle_legacy_checkpoint: a checkpoint may come from anyone, and unpickling can run code.
- A checkpoint whose fingerprint (data, base model, LoRA settings, data-order seed) differs from this run is an
  error naming what differs; changed optimisation settings (learning rate, epochs, batch sizes, world size) are
  allowed and listed in a warning. The data position carries over in examples, so a different global batch
  continues the same epoch order from the same example.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.checkpoint import (
    ADAPTER_WEIGHTS,
    CHECKPOINT_NAME,
    STATE_FILE,
    checkpoint_folders,
    first_difference,
    is_complete,
    is_legacy,
    read_state,
)
from lorakit.config import Config
from lorakit.engine.model import weight_index
from lorakit.engine.quantization import describe
from lorakit.errors import LorakitError
from lorakit.run_record import read_run_flags
from lorakit.steps import Position

HYPERPARAMETERS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "max_grad_norm",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "neftune_noise_alpha",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
)


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: Path
    position: Position
    loss_sum: float  # sum of the step losses before the checkpoint, for the run's train_loss


def model_fingerprint(model_path: str) -> str:
    """The base model's config and the names and sizes of its weight files (cheap; no weights are read)."""
    index = weight_index(model_path)
    sizes = sorted((name, file.name, file.stat().st_size) for name, file in index.items())
    config_text = (Path(model_path) / "config.json").read_text()
    return hashlib.sha256(json.dumps([json.loads(config_text), sizes], sort_keys=True).encode()).hexdigest()[:24]


def run_fingerprint(config: Config, data_key: str, lora_targets: list[str]) -> dict[str, Any]:
    lora = config.lora
    return {
        "data": data_key,
        "model": model_fingerprint(config.model.model_name_or_path),
        "lora": {
            "r": lora.lora_rank,
            "alpha": lora.alpha,
            "dropout": lora.lora_dropout,
            "targets": sorted(lora_targets),
            **lora_variants(config),
        },
        "seed": config.train.seed,
        # only with --quantization_bit: a checkpoint written before the flag existed keeps its fingerprint
        **({"quantization": quantization(config)} if config.model.quantization_bit is not None else {}),
    }


def quantization(config: Config) -> str | None:
    """The base model's quantisation (None without --quantization_bit, as in checkpoints from before it)."""
    return describe(config.model) if config.model.quantization_bit is not None else None


def lora_variants(config: Config) -> dict[str, Any]:
    """The variant flags in use, none when off: a checkpoint written before they existed keeps its fingerprint."""
    lora = config.lora
    variants = {"use_rslora": lora.use_rslora, "use_dora": lora.use_dora, "loraplus_lr_ratio": lora.loraplus_lr_ratio,
                "pissa": lora.pissa_method, "additional_target": sorted(lora.additional_target)}  # fmt: skip
    return {key: value for key, value in variants.items() if value}


WHAT = {
    "data": "the data (files, --dataset, the mixture, --max_samples, --cutoff_len, template or tokenizer)",
    "model": "the base model (--model_name_or_path config or weight files)",
    "lora": "the LoRA settings",
    "seed": "--seed (the data order)",
    "quantization": "the base model's quantisation (--quantization_bit, --quantization_type, --double_quantization)",
}


def check_output_dir(config: Config) -> None:
    """Nothing an earlier run left in output_dir is replaced unless a flag says so: its checkpoints, or its trained
    adapter where its checkpoints were deleted (or never saved). A run resumes only its own output_dir's
    checkpoints into it: a checkpoint from elsewhere goes into a folder holding no other run."""
    train = config.train
    output_dir = Path(train.output_dir)
    existing = checkpoint_folders(output_dir)
    adapter = output_dir / ADAPTER_WEIGHTS
    if train.overwrite_output_dir or not (existing or adapter.is_file()):
        return
    held = f"checkpoints ({', '.join(p.name for p in existing[-3:])})" if existing else f"a trained adapter ({adapter})"
    if not train.resume_from_checkpoint:
        resume = "--resume_from_checkpoint auto to continue it, " if existing else ""
        raise LorakitError(
            f"--output_dir {train.output_dir} already holds {held} from an earlier run; pass {resume}"
            "--overwrite_output_dir to start afresh (its checkpoints are deleted, its adapter replaced), or choose a "
            "new --output_dir"
        )
    if train.resume_from_checkpoint == "auto":
        if not existing:  # a finished run without checkpoints: "auto" would start afresh over its adapter
            raise LorakitError(
                f"--resume_from_checkpoint auto: --output_dir {train.output_dir} holds {held} and no checkpoint to "
                "continue; pass --overwrite_output_dir to start afresh over it, or choose a new --output_dir"
            )
        return
    checkpoint = Path(train.resume_from_checkpoint)
    if checkpoint.resolve().parent != output_dir.resolve():
        raise LorakitError(
            f"--output_dir {train.output_dir} holds {held} of another run, and --resume_from_checkpoint "
            f"{checkpoint} is not one of its checkpoints; resume into that checkpoint's own folder "
            f"({checkpoint.parent}) or into a new --output_dir"
        )


def set_aside_later_checkpoints(output_dir: Path, step: int) -> list[str]:
    """A run resumed from an older checkpoint of its output_dir branches off: the checkpoints past it belong to the
    run it branches from. They are renamed `checkpoint-N.abandoned` (kept, not deleted), so that neither
    `--resume_from_checkpoint auto` after a later interruption nor --save_total_limit mistakes them for this
    run's. Rank 0, before the first step; returns the log line."""
    later = [p for p in checkpoint_folders(output_dir) if int(CHECKPOINT_NAME.match(p.name).group(1)) > step]
    for folder in later:
        target, copy = folder.with_name(f"{folder.name}.abandoned"), 1
        while target.exists():
            copy += 1
            target = folder.with_name(f"{folder.name}.abandoned-{copy}")
        folder.rename(target)
    if not later:
        return []
    names = ", ".join(p.name for p in later)
    return [f"set aside {names} (past step {step}, of the run this one branches from) as checkpoint-N.abandoned: "
            "`auto` and --save_total_limit ignore them"]  # fmt: skip


def legacy_error(checkpoint: Path) -> LorakitError:
    return LorakitError(
        f"cannot resume {checkpoint}: it has lorakit's earlier checkpoint layout (pickled rng_state_rank*.pt files, "
        "no file list to verify), which lorakit no longer loads because unpickling a file can run any code hidden in "
        "it; if you wrote this checkpoint yourself, continue it with --unpickle_legacy_checkpoint, otherwise start "
        "afresh with --overwrite_output_dir or a new --output_dir"
    )


def checkpoint_problem(checkpoint: Path, unpickle_legacy: bool) -> str | None:
    """What differs in a complete checkpoint's files since they were written (None: nothing). A checkpoint of
    the earlier layout is an error, unless --unpickle_legacy_checkpoint lets it through unverified."""
    try:
        state = read_state(checkpoint)
        _read_fields(state)
        if not is_legacy(state):
            return first_difference(checkpoint, state)
    except OSError as err:  # the state file or a listed one (permissions, a vanished mount)
        return f"{Path(err.filename or STATE_FILE).name} cannot be read ({err.strerror})"
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not the JSON lorakit writes
        return f"{STATE_FILE} is not the JSON lorakit wrote"
    if not unpickle_legacy:
        raise legacy_error(checkpoint)
    return None


def _read_fields(state: dict[str, Any]) -> None:
    """Every field a resume reads, read once here (lorakit_state.json is not in its own file list, so an edited one
    verifies): a missing or mistyped one raises here, not mid-resume."""
    Position(**state["position"])
    dict(state["fingerprint"]), float(state["loss_sum"]), int(state["world_size"])
    [float(count) for count in state["optimizer_steps"]]


def find_checkpoint(config: Config) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None: start afresh), verified, and warnings about those passed over."""
    requested = config.train.resume_from_checkpoint
    if not requested:
        return None, []
    if requested == "auto":
        return _newest_verified(Path(config.train.output_dir), config.train.unpickle_legacy_checkpoint)
    path = Path(requested)
    if not is_complete(path):
        raise LorakitError(
            f"--resume_from_checkpoint {requested} is not a complete lorakit checkpoint (no lorakit_state.json "
            "or trainer_state.safetensors); pass another checkpoint folder or `auto`"
        )
    problem = checkpoint_problem(path, config.train.unpickle_legacy_checkpoint)
    if problem:
        raise LorakitError(
            f"cannot resume {requested}: {problem} (an interrupted or altered copy?); nothing was loaded; copy "
            "the checkpoint again, or pass another checkpoint folder or `auto`"
        )
    return path, []


def _newest_verified(output_dir: Path, unpickle_legacy: bool) -> tuple[Path | None, list[str]]:
    folders = checkpoint_folders(output_dir)
    complete = [p for p in folders if is_complete(p)]
    newest = int(CHECKPOINT_NAME.match(complete[-1].name).group(1)) if complete else -1
    skipped = [p for p in folders if not is_complete(p) and int(CHECKPOINT_NAME.match(p.name).group(1)) > newest]
    notes = [f"skipped incomplete checkpoint {p} (a save was interrupted); it is ignored" for p in skipped]
    if not complete:
        return None, notes + [f"--resume_from_checkpoint auto: no checkpoint in {output_dir}; starting afresh"]
    problems = []
    for checkpoint in reversed(complete):
        problem = checkpoint_problem(checkpoint, unpickle_legacy)
        if problem is None:
            return checkpoint, notes
        problems.append(problem)
        notes.append(f"warning: {checkpoint} does not verify: {problem}; trying the next older checkpoint")
    raise LorakitError(
        f"--resume_from_checkpoint auto: no checkpoint in {output_dir} verifies (the newest, {complete[-1].name}: "
        f"{problems[0]}); copy them again, or start afresh with --overwrite_output_dir or a new --output_dir"
    )


def plan_resume(config: Config, fingerprint: dict[str, Any], world_size: int) -> tuple[ResumePlan | None, list[str]]:
    """What to resume (None: start afresh) and the lines to log about it."""
    checkpoint, notes = find_checkpoint(config)
    if checkpoint is None:
        return None, notes
    state = read_state(checkpoint)
    step, max_steps = state["position"]["step"], config.train.max_steps
    if 0 < max_steps < step:  # the loop counts up to --max_steps: from past it, it would train every epoch left
        raise LorakitError(
            f"cannot resume {checkpoint} with --max_steps {max_steps}: it is at step {step} already; pass "
            f"--max_steps {step} or more (or -1), or resume an earlier checkpoint"
        )
    epoch, epochs = state["position"]["epoch"], config.train.num_train_epochs
    if max_steps <= 0 and (epoch > epochs or (epoch == epochs and state["position"]["offset"] > 0)):
        raise LorakitError(  # past the last epoch asked for: it would train nothing and report success
            f"cannot resume {checkpoint} with --num_train_epochs {epochs}: it is in epoch {epoch + 1} already; "
            f"pass --num_train_epochs {epoch + 1} or more, or resume an earlier checkpoint"
        )
    if is_legacy(state):
        notes.append(f"warning: resuming {checkpoint.name} of lorakit's earlier layout (--unpickle_legacy_checkpoint): "
                     "its files are not verified and its RNG files are unpickled")  # fmt: skip
    differs = [key for key in WHAT if state["fingerprint"].get(key) != fingerprint.get(key)]
    if differs:
        what = "; ".join(WHAT[key] for key in differs)
        detail = f" (was {state['fingerprint'].get('lora')}, now {fingerprint['lora']})" if "lora" in differs else ""
        raise LorakitError(
            f"cannot resume {checkpoint}: {what} changed since the run that wrote it{detail}; resume with the same "
            "inputs, or start afresh with --overwrite_output_dir or a new --output_dir"
        )
    saved = read_run_flags(checkpoint)
    now = config.to_flat()
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in HYPERPARAMETERS if k in saved and saved[k] != now[k]]
    if changed:
        notes.append(f"warning: resuming {checkpoint.name} with changed settings: {', '.join(changed)}")
    if state["world_size"] != world_size:
        notes.append(
            f"warning: resuming {checkpoint.name} (written by {state['world_size']} ranks) on {world_size}: "
            "the data continues from the same example; dropout RNG streams start anew"
        )
    position = Position(**state["position"])
    notes.append(f"resuming from {checkpoint}: step {position.step}, epoch {position.epoch}, example {position.offset}")
    return ResumePlan(checkpoint, position, float(state["loss_sum"])), notes
