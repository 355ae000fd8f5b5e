"""The training loop: batch -> forward -> backward -> step -> log -> save, in one function read top to bottom.

Step math (see lorakit.data.batching): an optimizer step takes micro x accumulation x world examples; the loss
of a step is the sum of token cross-entropies over every target token of the step, on every rank, divided by
that step's number of target tokens. The count is known before the step (every rank holds the whole plan),
so no collective is needed for it. DeepSpeed averages gradients over ranks, so each rank's loss is scaled by
world / step_targets to make the reduced gradient that of the per-token mean over the whole step.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.checkpoint import save_adapter, save_run_files
from lorakit.config import Config
from lorakit.data import StepPlan, TokenizedData, collate, plan_epoch, prepare_data, steps_per_epoch
from lorakit.distributed import DistInfo, init_distributed
from lorakit.engine import BuiltEngine, build_engine, load_tokenizer
from lorakit.loss import token_loss_sum
from lorakit.preview import example_record
from lorakit.reporting import Reporter, StepMath, say
from lorakit.schedule import learning_rate_at, warmup_steps_for
from lorakit.templates import get_template
from lorakit.validate import validate


@dataclass
class TrainResult:
    metrics: dict[str, float]  # train_runtime, train_samples_per_second, ..., train_loss, epoch
    engine: Any  # the DeepSpeed engine, still live: research code may evaluate engine.module
    output_dir: Path


def step_math(config: Config, num_examples: int, world_size: int) -> StepMath:
    train = config.train
    per_epoch = steps_per_epoch(
        num_examples, world_size, train.per_device_train_batch_size, train.gradient_accumulation_steps
    )
    total = per_epoch * train.num_train_epochs
    total = min(total, train.max_steps) if train.max_steps > 0 else total
    return StepMath(
        num_examples,
        train.num_train_epochs,
        train.per_device_train_batch_size,
        train.gradient_accumulation_steps,
        world_size,
        per_epoch,
        total,
        warmup_steps_for(total, train.warmup_steps, train.warmup_ratio),
    )


def run_step(engine: Any, data: TokenizedData, plan: StepPlan, dist: DistInfo, pad_id: int) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches, then one optimizer step; returns this rank's share
    of the step's mean token loss."""
    step_targets = int(data.target_counts[plan.examples()].sum())
    scale = dist.world_size / step_targets
    micro_batches = plan.micro_batches[dist.rank]
    local_loss = torch.zeros((), device=dist.device)
    for index, indices in enumerate(micro_batches):
        batch = {k: v.to(dist.device) for k, v in collate(data, indices, pad_id).items()}
        engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss_sum = token_loss_sum(logits, batch["labels"])
        engine.backward(loss_sum * scale, scale_wrt_gas=False)
        local_loss += loss_sum.detach().float()
    engine.step()
    return local_loss / step_targets


def set_learning_rate(engine: Any, learning_rate: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = learning_rate


def report_start(
    config: Config,
    built: BuiltEngine,
    data: TokenizedData,
    cache_note: str,
    math: StepMath,
    tokenizer: Any,
    is_main: bool,
) -> None:
    for note in built.notes:
        say(note, is_main)
    say(
        f"data: {len(data):,} examples, {int(data.lengths.sum()):,} tokens, {int(data.target_counts.sum()):,} "
        f"trained; {data.num_truncated} truncated to --cutoff_len {config.data.cutoff_len}, {data.num_dropped} left "
        f"out (no trained token left after truncation); {cache_note}",
        is_main,
    )
    say("first example: " + json.dumps(example_record(*data.example(0), tokenizer, 0), ensure_ascii=False), is_main)
    for line in math.lines(built.trainable_parameters, built.total_parameters):
        say(line, is_main)


def quiet_library_warnings() -> None:
    """torch.distributed and transformers deprecation notices, repeated on every rank at every step, bury the log."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*|transformers.*")


@dataclass
class Run:
    """Everything `train` sets up before its first step."""

    config: Config
    dist: DistInfo
    tokenizer: Any
    data: TokenizedData
    built: BuiltEngine
    math: StepMath
    output_dir: Path


def set_up(config: Config) -> Run:
    """Process group, tokenizer, data (cached), engine; then the output folder and the opening log."""
    dist = init_distributed()
    tokenizer = load_tokenizer(config.model.model_name_or_path)
    template = get_template(config.model.template, tokenizer)
    data, cache_path, was_cached = prepare_data(config.data, tokenizer, template, dist.local_rank == 0, dist.all_ok)
    built = build_engine(config, dist)
    math = step_math(config, len(data), dist.world_size)
    output_dir = Path(config.train.output_dir)
    if dist.is_main:
        save_run_files(output_dir, tokenizer, config, built.ds_config)
    cache_note = f"{'reused' if was_cached else 'wrote'} tokenised cache {cache_path}"
    report_start(config, built, data, cache_note, math, tokenizer, dist.is_main)
    return Run(config, dist, tokenizer, data, built, math, output_dir)


def step_plans(run: Run) -> Iterator[tuple[int, StepPlan]]:
    """(epoch, plan) for every optimizer step of the run, in order."""
    train_config, done = run.config.train, 0
    for epoch in range(train_config.num_train_epochs):
        for plan in plan_epoch(
            run.data.lengths,
            epoch,
            train_config.seed,
            run.dist.world_size,
            train_config.per_device_train_batch_size,
            train_config.gradient_accumulation_steps,
        ):
            if done == run.math.total_steps:
                return
            done += 1
            yield epoch, plan


def train(config: Config) -> TrainResult:
    quiet_library_warnings()
    validate(config)  # every bad-input error happens here, before anything is loaded or written
    run = set_up(config)
    engine, dist, math, train_config = run.built.engine, run.dist, run.math, config.train
    reporter = Reporter(run.output_dir, math, dist)
    engine.train()
    step = 0
    for _, plan in step_plans(run):
        learning_rate = learning_rate_at(
            step, math.total_steps, train_config.learning_rate, math.warmup_steps, train_config.lr_scheduler_type
        )
        set_learning_rate(engine, learning_rate)
        step_loss = run_step(engine, run.data, plan, dist, run.tokenizer.pad_token_id)
        step += 1
        reporter.step_done(step_loss, tokens=int(run.data.lengths[plan.examples()].sum()))
        if step % train_config.logging_steps == 0 or step == math.total_steps:
            reporter.log(step, learning_rate, engine.get_global_grad_norm())
        if train_config.save_steps and step % train_config.save_steps == 0 and step < math.total_steps:
            save_adapter(engine.module, run.output_dir / f"checkpoint-{step}", dist.is_main)
    save_adapter(engine.module, run.output_dir, dist.is_main)
    metrics = reporter.finish(step, train_config.plot_loss)
    say(f"adapter saved to {run.output_dir.resolve()}", dist.is_main)
    return TrainResult(metrics, engine, run.output_dir)
