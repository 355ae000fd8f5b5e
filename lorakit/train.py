"""The training loop: batch -> forward -> backward -> step -> log -> save, in one function read top to bottom.

Step math (see lorakit.data.batching): an optimizer step takes micro x accumulation x world examples; the loss
of a step is the sum of token cross-entropies over every target token of the step, on every rank, divided by
that step's number of target tokens. The count is known before the step (every rank holds the whole plan),
so no collective is needed for it. DeepSpeed averages gradients over ranks, so each rank's loss is scaled by
world / step_targets to make the reduced gradient that of the per-token mean over the whole step.

After every step the ranks agree (one small all-reduce) on two things: whether a stop signal arrived on any of
them, and whether the loss or gradient norm stopped being finite. A signal ends the run after a checkpoint; a
non-finite value ends it without one, so the last good checkpoint stays the newest.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.checkpoint import (
    Position,
    checkpoint_folders,
    load_checkpoint,
    prune_checkpoints,
    save_adapter,
    save_checkpoint,
    save_run_files,
)
from lorakit.config import Config, pack_tokens_for
from lorakit.data import StepPlan, TokenizedData, collate, pack, plan_epoch, prepare_data, steps_per_epoch
from lorakit.distributed import DistInfo, init_distributed
from lorakit.engine import BuiltEngine, build_engine, plan_run_memory
from lorakit.errors import LorakitError, TrainingInterrupted
from lorakit.evaluate import eval_data, evaluate
from lorakit.loss import model_loss_sum
from lorakit.preview import example_record
from lorakit.reporting import Reporter, StepMath, say
from lorakit.schedule import learning_rate_at, warmup_steps_for
from lorakit.signals import StopSignals
from lorakit.validate import Checked, validate


@dataclass
class TrainResult:
    metrics: dict[str, float]  # train_runtime, train_samples_per_second, ..., train_loss, epoch
    engine: Any  # the DeepSpeed engine, still live: research code may evaluate engine.module
    output_dir: Path


def step_math(config: Config, num_examples: int, world_size: int, start: Position) -> StepMath:
    """The run's step counts; a resumed run finishes its current epoch's order, then whole epochs."""
    train = config.train
    global_batch = world_size * train.per_device_train_batch_size * train.gradient_accumulation_steps
    per_epoch = steps_per_epoch(num_examples, world_size, train.per_device_train_batch_size,
                                train.gradient_accumulation_steps)  # fmt: skip
    remaining_epochs = max(0, train.num_train_epochs - start.epoch - 1)
    total = start.step + math.ceil((num_examples - start.offset) / global_batch) + remaining_epochs * per_epoch
    total = min(total, train.max_steps) if train.max_steps > 0 else total
    warmup = warmup_steps_for(total, train.warmup_steps, train.warmup_ratio)
    return StepMath(num_examples, train.num_train_epochs, train.per_device_train_batch_size,
                    train.gradient_accumulation_steps, world_size, per_epoch, total, warmup,
                    pack_tokens_for(config))  # fmt: skip


def row_multiple(dist: DistInfo) -> int:
    """Packed rows on GPUs are padded to a multiple of 128 tokens (see lorakit.data.batching.pack)."""
    return 128 if dist.device.type == "cuda" else 1


def run_step(
    engine: Any, data: TokenizedData, plan: StepPlan, dist: DistInfo, pad_id: int, packing: bool
) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches, then one optimizer step; returns this rank's share
    of the step's mean token loss."""
    step_targets = int(data.target_counts[plan.examples()].sum())
    scale = dist.world_size / step_targets
    micro_batches = plan.micro_batches[dist.rank]
    local_loss = torch.zeros((), device=dist.device)
    multiple = row_multiple(dist)
    for index, indices in enumerate(micro_batches):
        batch = pack(data, indices, pad_id, multiple) if packing else collate(data, indices, pad_id)
        inputs = {k: v.to(dist.device) for k, v in batch.items()}
        labels = inputs.pop("labels")
        engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
        loss_sum = model_loss_sum(engine, inputs, labels)
        engine.backward(loss_sum * scale, scale_wrt_gas=False)
        local_loss += loss_sum.detach().float()
    engine.step()
    return local_loss / step_targets


def set_learning_rate(engine: Any, learning_rate: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = learning_rate


def quiet_library_warnings() -> None:
    """torch.distributed and transformers deprecation notices, repeated on every rank at every step, bury the log."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*|transformers.*")


@dataclass
class Run:
    """Everything `train` sets up before its first step."""

    config: Config
    checked: Checked
    dist: DistInfo
    data: TokenizedData
    eval_data: TokenizedData | None
    built: BuiltEngine
    counts: StepMath
    start: Position
    output_dir: Path


def set_up(config: Config, checked: Checked) -> Run:
    """Process group, data (cached), engine, the resumed state; then the output folder and the opening log."""
    dist = init_distributed()
    config, memory_lines = plan_run_memory(config, dist)  # rows and checkpointing, from free GPU memory
    output_dir, tokenizer = Path(config.train.output_dir), checked.tokenizer
    if dist.is_main and config.train.overwrite_output_dir:
        for old in checkpoint_folders(output_dir):
            shutil.rmtree(old)
    data, cache_path, was_cached = prepare_data(config.data, tokenizer, checked.template, dist.local_rank == 0,
                                                dist.all_ok, checked.data_key)  # fmt: skip
    data, held_out = eval_data(config, tokenizer, checked.template, dist, data)
    built = build_engine(config, dist)
    start = Position(0, 0, 0)
    if checked.resume is not None:
        load_checkpoint(built.engine, checked.resume.checkpoint, dist, config.train.unpickle_legacy_checkpoint)
        start = checked.resume.position
    counts = step_math(config, len(data), dist.world_size, start)
    if dist.is_main:
        save_run_files(output_dir, tokenizer, config, built.ds_config)
    for note in checked.notes + built.notes + memory_lines:
        say(note, dist.is_main)
    say(f"data: {len(data):,} examples, {int(data.lengths.sum()):,} tokens, {int(data.target_counts.sum()):,} "
        f"trained; {data.num_truncated} truncated to --cutoff_len {config.data.cutoff_len}, {data.num_dropped} left "
        f"out (no trained token left after truncation); {'reused' if was_cached else 'wrote'} tokenised cache "
        f"{cache_path}", dist.is_main)  # fmt: skip
    first = json.dumps(example_record(*data.example(0), tokenizer, 0), ensure_ascii=False)
    say(f"first example: {first}", dist.is_main)
    for line in counts.lines(built.trainable_parameters, built.total_parameters):
        say(line, dist.is_main)
    if held_out is not None:
        say(
            f"evaluation: {len(held_out):,} examples, {int(held_out.target_counts.sum()):,} trained tokens",
            dist.is_main,
        )
    return Run(config, checked, dist, data, held_out, built, counts, start, output_dir)


def step_plans(run: Run) -> Iterator[StepPlan]:
    """The plan of every remaining optimizer step, in order, from the run's start position."""
    train, start, steps = run.config.train, run.start, run.start.step
    for epoch in range(start.epoch, train.num_train_epochs):
        skip = start.offset if epoch == start.epoch else 0
        for plan in plan_epoch(run.data.lengths, epoch, train.seed, run.dist.world_size,
                               train.per_device_train_batch_size, train.gradient_accumulation_steps, skip,
                               pack_tokens_for(run.config)):  # fmt: skip
            if steps == run.counts.total_steps:
                return
            steps += 1
            yield plan


def advance(position: Position, plan: StepPlan, num_examples: int) -> Position:
    offset = position.offset + len(plan.examples())
    if offset >= num_examples:
        return Position(position.step + 1, position.epoch + 1, 0)
    return Position(position.step + 1, position.epoch, offset)


def due(step: int, every: int) -> bool:
    """Whether an every-N-steps action (log, eval, save) falls on `step`; every = 0 means never."""
    return every > 0 and step % every == 0


def check_finite(step: int, diverged: bool, loss: float, grad_norm: Any, output_dir: Path) -> None:
    if diverged:
        saved = [p.name for p in checkpoint_folders(output_dir)]
        last = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written"
        raise LorakitError(
            f"step {step}: the loss ({loss:.4g} on rank 0) or gradient norm ({grad_norm}) is not finite; stopped "
            f"without saving, {last}; lower --learning_rate or check the data"
        )


def train(config: Config) -> TrainResult:
    quiet_library_warnings()
    checked = validate(config)  # every bad-input error happens here, before anything is loaded or written
    run = set_up(config, checked)
    config = run.config  # with the memory plan's rows and checkpointing settled
    engine, dist, counts, train_config = run.built.engine, run.dist, run.counts, config.train
    pad_id, position = checked.tokenizer.pad_token_id, run.start
    loss_sum = checked.resume.loss_sum if checked.resume else 0.0
    reporter = Reporter(run.output_dir, counts, dist, position.step, loss_sum)
    engine.train()
    with StopSignals() as signals:
        for plan in step_plans(run):
            learning_rate = learning_rate_at(position.step, counts.total_steps, train_config.learning_rate,
                                             counts.warmup_steps, train_config.lr_scheduler_type)  # fmt: skip
            set_learning_rate(engine, learning_rate)
            step_loss = run_step(engine, run.data, plan, dist, pad_id, train_config.packing)
            position = advance(position, plan, len(run.data))
            grad_norm, local_loss = engine.get_global_grad_norm(), float(step_loss)
            finite = math.isfinite(local_loss) and (grad_norm is None or math.isfinite(float(grad_norm)))
            signal_number, diverged = dist.max([signals.received, 0.0 if finite else 1.0])
            check_finite(position.step, bool(diverged), local_loss, grad_norm, run.output_dir)
            reporter.step_done(step_loss, tokens=int(run.data.lengths[plan.examples()].sum()))
            last, epoch = position.step == counts.total_steps, position.epochs_done(len(run.data))
            if due(position.step, train_config.logging_steps) or last or signal_number:
                reporter.log(position.step, learning_rate, grad_norm, epoch)
            if run.eval_data is not None and (due(position.step, train_config.eval_steps) or last):
                eval_loss = evaluate(engine, run.eval_data, dist, config, pad_id, row_multiple(dist))
                reporter.log_eval(position.step, eval_loss, epoch)
            if due(position.step, train_config.save_steps) or last or signal_number:
                extra = {"fingerprint": checked.fingerprint, "loss_sum": reporter.loss_sum()}
                saved = save_checkpoint(engine, run.output_dir, position, extra, dist)
                if dist.is_main:
                    prune_checkpoints(run.output_dir, train_config.save_total_limit)
            if signal_number:
                raise TrainingInterrupted(int(signal_number), position.step, saved)
    save_adapter(engine.module, run.output_dir, dist.is_main)
    metrics = reporter.finish(position.step, position.epochs_done(len(run.data)), train_config.plot_loss)
    say(f"adapter saved to {run.output_dir.resolve()}", dist.is_main)
    return TrainResult(metrics, engine, run.output_dir)
