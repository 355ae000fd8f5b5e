"""The training loop: batch -> forward -> backward -> step -> log -> save, in one function read top to bottom.

Step math (see lorakit.data.batching): an optimizer step takes micro x accumulation x world examples; the loss
of a step is the sum of token cross-entropies over every target token of the step, on every rank, divided by
that step's number of target tokens. The count is known before the step (every rank holds the whole plan),
so no collective is needed for it. DeepSpeed averages gradients over ranks, so each rank's loss is scaled by
world / step_targets to make the reduced gradient that of the per-token mean over the whole step.
"""

from __future__ import annotations

import json
import time
import warnings
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


def train(config: Config) -> TrainResult:
    quiet_library_warnings()
    validate(config)  # every bad-input error happens here, before anything is loaded or written
    dist = init_distributed()
    tokenizer = load_tokenizer(config.model.model_name_or_path)
    template = get_template(config.model.template, tokenizer)
    data, cache_path, was_cached = prepare_data(config.data, tokenizer, template, dist.local_rank == 0, dist.all_ok)
    built = build_engine(config, dist)
    engine, train_config, output_dir = built.engine, config.train, Path(config.train.output_dir)
    math = step_math(config, len(data), dist.world_size)
    if dist.is_main:
        save_run_files(output_dir, tokenizer, config, built.ds_config)
    cache_note = f"{'reused' if was_cached else 'wrote'} tokenised cache {cache_path}"
    report_start(config, built, data, cache_note, math, tokenizer, dist.is_main)
    reporter = Reporter(output_dir, math.total_steps, dist.is_main)
    lengths, step, epoch = data.lengths, 0, 0
    window_loss, window_steps, window_tokens, total_loss, total_tokens = 0.0, 0, 0, 0.0, 0
    start = window_start = time.perf_counter()
    engine.train()
    while step < math.total_steps:
        for plan in plan_epoch(
            lengths,
            epoch,
            train_config.seed,
            dist.world_size,
            train_config.per_device_train_batch_size,
            train_config.gradient_accumulation_steps,
        ):
            learning_rate = learning_rate_at(
                step, math.total_steps, train_config.learning_rate, math.warmup_steps, train_config.lr_scheduler_type
            )
            set_learning_rate(engine, learning_rate)
            step_loss = run_step(engine, data, plan, dist, tokenizer.pad_token_id)
            step += 1
            step_tokens = int(lengths[plan.examples()].sum())
            window_loss, window_steps, window_tokens = (
                window_loss + step_loss,
                window_steps + 1,
                window_tokens + step_tokens,
            )
            total_tokens += step_tokens
            reporter.step_done()
            if step % train_config.logging_steps == 0 or step == math.total_steps:
                mean_loss = dist.sum([float(window_loss)])[0] / window_steps
                total_loss += mean_loss * window_steps
                grad_norm = engine.get_global_grad_norm()
                elapsed = time.perf_counter() - window_start
                reporter.log(
                    step,
                    mean_loss,
                    float("nan") if grad_norm is None else float(grad_norm),
                    learning_rate,
                    step / math.steps_per_epoch,
                    window_tokens / elapsed,
                )
                window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            if train_config.save_steps and step % train_config.save_steps == 0 and step < math.total_steps:
                save_adapter(engine.module, output_dir / f"checkpoint-{step}", dist.is_main)
            if step == math.total_steps:
                break
        epoch += 1
    save_adapter(engine.module, output_dir, dist.is_main)
    runtime = time.perf_counter() - start
    metrics = {
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(math.num_examples * step / math.steps_per_epoch / runtime, 3),
        "train_steps_per_second": round(step / runtime, 3),
        "train_tokens_per_second": round(total_tokens / runtime, 1),
        "train_loss": round(total_loss / step, 4),
        "epoch": round(step / math.steps_per_epoch, 2),
    }
    reporter.finish(metrics, output_dir, train_config.plot_loss)
    say(f"adapter saved to {output_dir.resolve()}", dist.is_main)
    return TrainResult(metrics, engine, output_dir)
