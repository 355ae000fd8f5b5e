"""The training loop: batch -> forward -> backward -> step -> log -> save, in one function read top to bottom.

Step math (see lorakit.steps): an optimizer step takes micro x accumulation x world examples; the loss
of a step is the sum of token cross-entropies over every target token of the step, on every rank, divided by
that step's number of target tokens. The count is known before the step (every rank holds the whole plan),
so no collective is needed for it. DeepSpeed averages gradients over ranks, so each rank's loss is scaled by
world / step_targets to make the reduced gradient that of the per-token mean over the whole step.

After every step the ranks agree (one small all-reduce on the device, read one step late: lorakit.agreement) on
two things: whether a stop signal arrived on any of them, and whether the loss or gradient norm stopped being
finite. A signal ends the run after a checkpoint; a non-finite value ends it without one, so the last good
checkpoint stays the newest. Nothing in a step that neither logs nor saves makes the CPU wait for the GPU.
"""

from __future__ import annotations

import gc
import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.agreement import StepFlags, settle
from lorakit.checkpoint import (
    checkpoint_folders,
    load_checkpoint,
    prune_checkpoints,
    save_adapter,
    save_checkpoint,
)
from lorakit.config import Config, pack_tokens_for
from lorakit.data import (
    StepPlan,
    TokenizedData,
    collate,
    example_record,
    pack,
    plan_epoch,
    prepare_data,
    step_tokens_bound,
)
from lorakit.data.batching import GPU_ROW_MULTIPLE, mean_step_share
from lorakit.distributed import DistInfo, init_distributed, to_device
from lorakit.engine import BuiltEngine, build_engine, compile_warmup, plan_run_memory
from lorakit.engine.kernels import inductor_cache_beside_data
from lorakit.engine.plan import EnginePlan
from lorakit.engine.warmup import CompileSwitch, Warmup, start_warmup, stop_warmup
from lorakit.errors import TrainingInterrupted
from lorakit.evaluate import eval_data as split_eval_data
from lorakit.evaluate import evaluate
from lorakit.hooks import EvalHook, Hooks, LiveModel, StepHook
from lorakit.loss import model_loss_sum
from lorakit.plan import RunPlan
from lorakit.reporting import Reporter, say
from lorakit.resume import set_aside_later_checkpoints
from lorakit.run_record import resolved_config, save_run_files
from lorakit.schedule import learning_rate_at
from lorakit.signals import StopSignals
from lorakit.steps import Position, StepMath, advance, due, step_math
from lorakit.tracking import Tracker, start_trackers
from lorakit.validate import validate

# eager steps beside the compile warm-up only under plans at most this share of the free memory: eager layers peaked
# 8 % over the plan (the reference 7B on H100s: 40.9 GiB, 38 planned) and a warm-up process held up to 6.4 GiB (the
# 32B's layer on an H200), both beside the run (benchmarks/RESULTS.md, session 15)
EAGER_PEAK_SHARE = 0.6


@dataclass
class TrainResult:
    metrics: dict[str, float]  # train_runtime, train_samples_per_second, ..., train_loss, epoch
    engine: Any  # the DeepSpeed engine, still live: research code may evaluate engine.module
    output_dir: Path


def row_multiple(dist: DistInfo) -> int:
    """Packed rows on GPUs are padded to a multiple of 128 tokens (see lorakit.data.batching.pack)."""
    return GPU_ROW_MULTIPLE if dist.device.type == "cuda" else 1


def run_step(
    engine: Any, data: TokenizedData, plan: StepPlan, dist: DistInfo, pad_id: int, packing: bool
) -> tuple[torch.Tensor, Any]:
    """Forward and backward over this rank's micro-batches, then one optimizer step; returns this rank's share
    of the step's mean token loss and the gradients' global norm before clipping (a tensor, a float or None)."""
    step_targets = int(data.target_counts[plan.examples()].sum())
    scale = dist.world_size / step_targets
    micro_batches = plan.micro_batches[dist.rank]
    local_loss = torch.zeros((), device=dist.device)
    multiple = row_multiple(dist)
    for index, indices in enumerate(micro_batches):
        batch = pack(data, indices, pad_id, multiple) if packing else collate(data, indices, pad_id)
        labels = batch.pop("labels")  # stays on the host: lorakit.loss finds the target positions there
        inputs = {k: to_device(v, dist.device) for k, v in batch.items()}
        engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
        loss_sum = model_loss_sum(engine, inputs, labels)
        engine.backward(loss_sum * scale, scale_wrt_gas=False)
        local_loss += loss_sum.detach().float()
    own_norm = grad_norm_without_deepspeed(engine)  # before the step, which clears the gradients
    engine.step()
    return local_loss / step_targets, engine.get_global_grad_norm() if own_norm is None else own_norm


def grad_norm_without_deepspeed(engine: Any) -> torch.Tensor | None:
    """The gradients' global norm where DeepSpeed keeps none, else None. Its optimizer wrappers (ZeRO stages 1-3,
    bf16, fp16) keep the norm they clip with; with the optimizer as given (ZeRO stage 0 in fp32) DeepSpeed clips
    inside its step and drops the norm: `get_global_grad_norm()` is None, which logged as NaN and escaped the
    non-finite stop. Read after the last backward, which averaged the gradients over the ranks (DeepSpeed's
    stage-0 all-reduce at the accumulation boundary), so it is every rank's; a tensor, so nothing waits here."""
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer

    if isinstance(engine.optimizer, DeepSpeedOptimizer):
        return None
    return torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None])


def cache_line(folder: Path, was_cached: bool) -> str:
    if was_cached:
        return f"reused tokenised cache {folder}"
    meta = json.loads((folder / "meta.json").read_text())
    return f"wrote tokenised cache {folder} ({meta['seconds']:.1f} s, {meta['workers']} processes)"


def set_learning_rate(engine: Any, learning_rate: float) -> None:
    """The schedule's rate on every parameter group, times the group's own multiplier (LoRA+'s ratio on lora_B)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = learning_rate * group.get("lr_multiplier", 1.0)


def quiet_library_warnings() -> None:
    """torch.distributed and transformers deprecation notices, repeated on every rank at every step, bury the log."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*|transformers.*")


@dataclass
class Run:
    """Everything `train` sets up before its first step."""

    config: Config  # the plan's, with the memory plan's rows and checkpointing settled
    checked: RunPlan
    dist: DistInfo
    data: TokenizedData
    eval_data: TokenizedData | None
    built: BuiltEngine
    counts: StepMath
    start: Position
    output_dir: Path
    trackers: list[Tracker]  # --report_to's, on rank 0; the Reporter logs to them and closes them
    warmup: Warmup | None = None  # the compile warm-up process (lorakit.engine.warmup)
    eager_first: bool = False  # the steps run eager until every rank's warm-up has ended (eager_while_compiling)


def set_up(checked: RunPlan) -> Run:
    """Process group, data (cached), engine, the resumed state; then the output folder and the opening log. All
    from the plan: only the free GPU memory (hence the rows and checkpointing) is new here. The data is tokenised
    before the memory plan, which plans no row longer than a rank's largest share of a step."""
    dist = init_distributed()
    config = checked.config  # the flags; the memory plan settles rows and checkpointing below
    output_dir, tokenizer = Path(config.train.output_dir), checked.tokenizer
    if dist.is_main and config.train.overwrite_output_dir:
        for old in checkpoint_folders(output_dir):
            shutil.rmtree(old)
    set_aside = []
    if dist.is_main and checked.resume is not None:  # before any save of this run
        set_aside = set_aside_later_checkpoints(output_dir, checked.resume.position.step)
    data, cache_path, was_cached = prepare_data(config.data, tokenizer, checked.template, source=checked.train_data)
    data, held_out = split_eval_data(checked, data)
    share = pass_bound(checked, data, held_out, dist.world_size)
    train = config.train
    mean_share = (mean_step_share(data.lengths, dist.world_size, train.per_device_train_batch_size,
                                  train.gradient_accumulation_steps) if train.packing else 0)  # fmt: skip
    config, engine_plan, memory_lines = plan_run_memory(config, dist, checked.engine, share, mean_share)
    warmup, warmup_lines = start_compile_warmup(config, dist, engine_plan, share, held_out is not None)
    try:  # a failure here would leave the warm-up compiling on the rank's GPU, behind the error
        built = build_engine(config, dist, engine_plan)
        start, counts, trackers = resume_and_record(checked, config, dist, built, len(data))
    except BaseException:
        stop_warmup(warmup)
        raise
    for note in checked.notes + set_aside + built.notes + memory_lines + warmup_lines:
        say(note, dist.is_main)
    say(f"data: {len(data):,} examples, {int(data.lengths.sum()):,} tokens, {int(data.target_counts.sum()):,} "
        f"trained; {data.num_truncated} truncated to --cutoff_len {config.data.cutoff_len}, {data.num_dropped} left "
        f"out (no trained token left after truncation); {cache_line(cache_path, was_cached)}",
        dist.is_main)  # fmt: skip
    first = json.dumps(example_record(*data.example(0), tokenizer, 0), ensure_ascii=False)
    say(f"first example: {first}", dist.is_main)
    for line in counts.lines(built.trainable_parameters, built.total_parameters):
        say(line, dist.is_main)
    if counts.total_steps < config.train.max_steps:  # a cap here, where HF's Trainer would train on past the epochs
        say(f"note: --max_steps {config.train.max_steps} is past the end of --num_train_epochs "
            f"{config.train.num_train_epochs} ({counts.total_steps} steps): the run ends with the epochs; raise "
            "--num_train_epochs to train longer", dist.is_main)  # fmt: skip
    if held_out is not None:
        say(
            f"evaluation: {len(held_out):,} examples, {int(held_out.target_counts.sum()):,} trained tokens",
            dist.is_main,
        )
    return Run(config, checked, dist, data, held_out, built, counts, start, output_dir, trackers, warmup,
               eager_while_compiling(built, engine_plan))  # fmt: skip


def eager_while_compiling(built: BuiltEngine, engine_plan: EnginePlan) -> bool:
    """Whether the first steps may run the layers eager while the compile warm-up finishes
    (lorakit.engine.warmup.CompileSwitch): only where every weight stays gathered between steps (eager layers
    otherwise hold what ZeRO-3 releases in compiled ones' place: lorakit.engine.frozen_linear leaves compiled layers
    alone) and the memory plan leaves room for eager activations and the warm-up's own process."""
    return built.weights_stay_gathered and engine_plan.peak_share <= EAGER_PEAK_SHARE


def pass_bound(checked: RunPlan, data: TokenizedData, held_out: TokenizedData | None, world_size: int) -> int:
    """The most tokens a rank's packed forward pass can hold, training (from where the run resumes) or evaluating
    (micro-batch examples a pass): the memory plan sizes a pass's activations by it. 0 without packing."""
    train = checked.config.train
    if not train.packing:
        return 0
    start = checked.resume.position if checked.resume is not None else Position(0, 0, 0)
    bound = step_tokens_bound(data.lengths, train.seed, world_size, train.per_device_train_batch_size,
                              train.gradient_accumulation_steps, train.num_train_epochs, start.epoch,
                              start.offset)  # fmt: skip
    if held_out is not None:
        bound = max(bound, step_tokens_bound(held_out.lengths, train.seed, world_size,
                                             train.per_device_train_batch_size, 1, 1))  # fmt: skip
    return bound


def resume_and_record(
    checked: RunPlan, config: Config, dist: DistInfo, built: BuiltEngine, examples: int
) -> tuple[Position, StepMath, list[Tracker]]:
    """The resumed state loaded into the engine, the step counts, and (on rank 0) the run's files and trackers."""
    start = Position(0, 0, 0)
    if checked.resume is not None:
        load_checkpoint(built.engine, checked.resume.checkpoint, dist, config.train.unpickle_legacy_checkpoint)
        start = checked.resume.position
    counts = step_math(config, examples, dist.world_size, start)
    trackers: list[Tracker] = []  # rank 0's only, as the logs are
    if dist.is_main:
        output_dir = Path(config.train.output_dir)
        save_run_files(output_dir, checked.tokenizer, config, built.ds_config)
        trackers = start_trackers(config.train.trackers, output_dir, config.train.run_name,
                                  resolved_config(config, built.ds_config), start.step)  # fmt: skip
    return start, counts, trackers


def start_compile_warmup(
    config: Config, dist: DistInfo, engine_plan: EnginePlan, step_tokens: int, evaluates: bool
) -> tuple[Warmup | None, list[str]]:
    """The compile warm-up process (lorakit.engine.warmup), started where the layers will be compiled while the
    model loads, and the cache line; the run waits for it before its first step."""
    spec = compile_warmup(config, engine_plan, dist.device, step_tokens, evaluates)
    if spec is None:
        return None, []
    lines = inductor_cache_beside_data()  # the process must write where the run will read
    return start_warmup(spec), lines


def step_plans(run: Run) -> Iterator[StepPlan]:
    """The plan of every remaining optimizer step, in order, from the run's start position."""
    train, start, steps = run.config.train, run.start, run.start.step
    for epoch in range(start.epoch, train.num_train_epochs):
        for plan in plan_epoch(run.data.lengths, epoch, train.seed, run.dist.world_size,
                               train.per_device_train_batch_size, train.gradient_accumulation_steps, start.skip(epoch),
                               pack_tokens_for(run.config)):  # fmt: skip
            if steps == run.counts.total_steps:
                return
            steps += 1
            yield plan


@contextmanager
def setup_left_to_refcounts() -> Iterator[None]:
    """The objects alive when the loop starts (the model's modules and parameters, DeepSpeed's bookkeeping of each,
    the tokeniser, dynamo's caches once compiled) are left out of Python's cyclic collections for the loop
    (`gc.freeze`): each of the collector's full passes walked them all, a pause on the CPU while the GPU waits for
    the next step. Reference counting still frees any of them released; garbage made in the loop is collected as
    before. Given back to the collector when the loop ends, for research code that goes on in the process. Where
    the caller has frozen objects itself (gc.get_freeze_count), lorakit leaves that state as it is: gc cannot
    unfreeze only what lorakit froze."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def train(
    config: Config,
    train_data: Any = None,
    eval_data: Any = None,
    on_step: StepHook | None = None,
    on_eval: EvalHook | None = None,
) -> TrainResult:
    """Train a LoRA adapter as `config` says. `train_data` / `eval_data`: conversations or records from Python (a
    list or a datasets.Dataset, lorakit.data.inmemory) instead of --dataset / --eval_dataset. `on_step(StepInfo)`
    and `on_eval(EvalContext)` are called on every rank after each step and evaluation; returning True from either
    ends the run as a finished one ends (lorakit.hooks)."""
    quiet_library_warnings()
    checked = validate(config, train_data, eval_data)  # every bad-input error is raised here, before any load
    run = set_up(checked)
    config = run.config  # with the memory plan's rows and checkpointing settled
    engine, dist, counts, train_config = run.built.engine, run.dist, run.counts, config.train
    pad_id, position = checked.tokenizer.pad_token_id, run.start
    loss_sum = checked.resume.loss_sum if checked.resume else 0.0
    reporter = Reporter(run.output_dir, counts, dist, position.step, loss_sum, run.trackers)
    hooks = Hooks(on_step, on_eval, LiveModel(engine, checked.tokenizer, checked.template), counts.total_steps)
    engine.train()
    unread: StepFlags | None = None  # the previous step's agreement, read once this step is queued
    stop_asked = False  # by a hook on this rank; agreed with the other ranks through the step's flags
    compiling = CompileSwitch(run.warmup, dist.device, run.eager_first)
    with StopSignals() as signals, setup_left_to_refcounts(), compiling:
        for line in compiling.begin():  # eager steps while a warm-up still compiles (lorakit.engine.warmup)
            say(line, dist.is_main)
        for plan in step_plans(run):
            learning_rate = learning_rate_at(position.step, counts.total_steps, train_config.learning_rate,
                                             counts.warmup_steps, train_config.lr_scheduler_type)  # fmt: skip
            set_learning_rate(engine, learning_rate)
            step_loss, grad_norm = run_step(engine, run.data, plan, dist, pad_id, train_config.packing)
            for line in compiling.after_step():  # the layers compiled from the next step, on every rank alike
                say(line, dist.is_main)
            run.data.release()  # the token pages this step read leave this rank's resident memory (lorakit.data.tokens)
            position = advance(position, plan, len(run.data))
            tokens = int(run.data.lengths[plan.examples()].sum())
            last, epoch = position.step == counts.total_steps, position.epochs_done(len(run.data))
            stop_asked |= hooks.step(position.step, epoch, step_loss, grad_norm, learning_rate, tokens)
            flags = StepFlags.post(position.step, signals.received, step_loss, grad_norm, stop_asked)
            reporter.step_done(step_loss, tokens)
            log_now = due(position.step, train_config.logging_steps) or last
            eval_now = run.eval_data is not None and (due(position.step, train_config.eval_steps) or last)
            save_now = due(position.step, train_config.save_steps) or last
            signal_number, stopping, unread = settle(unread, flags, log_now or eval_now or save_now, run.output_dir)
            eval_now = eval_now or (stopping and run.eval_data is not None)  # a stop ends the run as its last step
            if log_now or signal_number or stopping:
                reporter.log(position.step, learning_rate, grad_norm, epoch)
            if eval_now:
                eval_loss = evaluate(engine, run.eval_data, dist, config, pad_id, row_multiple(dist))
                reporter.log_eval(position.step, eval_loss, epoch)
                stop_asked |= hooks.eval(position.step, epoch, eval_loss)
            if save_now or signal_number or stopping:
                extra = {"fingerprint": checked.fingerprint, "loss_sum": reporter.loss_sum()}
                saved = save_checkpoint(engine, run.output_dir, position, extra, dist, run.built.pissa)
                if dist.is_main:
                    prune_checkpoints(run.output_dir, train_config.save_total_limit, saved)
            if signal_number:
                raise TrainingInterrupted(signal_number, position.step, saved)
            if stopping:
                say(f"stopped at step {position.step}: a hook asked to", dist.is_main)
                break
    save_adapter(engine.module, run.output_dir, dist.is_main, run.built.pissa)
    metrics = reporter.finish(position.step, position.epochs_done(len(run.data)), train_config.plot_loss)
    say(f"adapter saved to {run.output_dir.resolve()}", dist.is_main)
    return TrainResult(metrics, engine, run.output_dir)
