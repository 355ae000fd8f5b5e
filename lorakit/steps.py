"""Step arithmetic, in one place: how many examples a step takes, how many steps an epoch and a run have, where
training stands, and which steps log, evaluate and save.

An optimizer step takes `per_device_train_batch_size x gradient_accumulation_steps x world_size` examples (the
global batch), as in the reference run. Every example is used exactly once per epoch: the epoch's order is cut
into steps and the last step takes what is left, so steps per epoch = ceil(examples / global batch). (HF Trainer
drops each epoch's partial accumulation window: 280 steps for the reference's 3,630 examples on 8 ranks; lorakit
runs 290.)

A run's position is counted in examples, not steps (`Position`): `offset` examples of epoch `epoch`'s order are
done. So a checkpoint resumes on any number of ranks: the rest of its epoch is cut by the new global batch, then
whole epochs follow (`total_steps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorakit.config import Config, pack_tokens_for
from lorakit.schedule import warmup_steps_for

if TYPE_CHECKING:  # lorakit.data.batching asks this module for its arithmetic
    from lorakit.data.batching import StepPlan


def global_batch(world_size: int, micro_batch: int, accumulation: int) -> int:
    """Examples per optimizer step, over every rank and micro-batch."""
    return world_size * micro_batch * accumulation


def steps_per_epoch(num_examples: int, world_size: int, micro_batch: int, accumulation: int) -> int:
    return math.ceil(num_examples / global_batch(world_size, micro_batch, accumulation))


@dataclass(frozen=True)
class Position:
    """Where training stands after `step` optimizer steps: `offset` examples of epoch `epoch`'s order are done."""

    step: int
    epoch: int
    offset: int

    def epochs_done(self, num_examples: int) -> float:
        return self.epoch + self.offset / num_examples

    def skip(self, epoch: int) -> int:
        """Examples at the start of `epoch`'s order that are already trained (only the current epoch has any)."""
        return self.offset if epoch == self.epoch else 0


def advance(position: Position, plan: StepPlan, num_examples: int) -> Position:
    """The position after `plan`'s step; the step that uses an epoch's last example starts the next epoch."""
    offset = position.offset + len(plan.examples())
    if offset >= num_examples:
        return Position(position.step + 1, position.epoch + 1, 0)
    return Position(position.step + 1, position.epoch, offset)


def due(step: int, every: int) -> bool:
    """Whether an every-N-steps action (log, eval, save) falls on `step`; every = 0 means never."""
    return every > 0 and step % every == 0


def total_steps(num_examples: int, world_size: int, micro_batch: int, accumulation: int, num_epochs: int,
                max_steps: int, start: Position) -> int:  # fmt: skip
    """The step count at which the run ends: from `start` (made on any world size), the rest of its epoch's order
    cut by this run's global batch, then whole epochs; at most --max_steps when that is set (> 0)."""
    per_step = global_batch(world_size, micro_batch, accumulation)
    # a run resumed at its end (epoch == num_epochs, offset 0) has no epoch left to finish
    rest_of_epoch = math.ceil((num_examples - start.offset) / per_step) if start.epoch < num_epochs else 0
    later_epochs = max(0, num_epochs - start.epoch - 1) * steps_per_epoch(num_examples, world_size, micro_batch,
                                                                          accumulation)  # fmt: skip
    total = start.step + rest_of_epoch + later_epochs
    return min(total, max_steps) if max_steps > 0 else total


@dataclass(frozen=True)
class StepMath:
    """A run's step counts, as the log prints them at start."""

    num_examples: int
    num_epochs: int
    micro_batch: int
    accumulation: int
    world_size: int
    steps_per_epoch: int
    total_steps: int  # after --max_steps
    warmup_steps: int
    pack_tokens: int = 0  # 0: padded micro-batches of micro_batch examples

    def grouping(self) -> str:
        if not self.pack_tokens:
            return f"padded micro-batches of {self.micro_batch} examples, {self.accumulation} per rank per step"
        return (f"packed: each rank's {self.micro_batch * self.accumulation} examples of a step (dealt by tokens) "
                f"in rows of at most {self.pack_tokens:,} tokens, one row per forward pass")  # fmt: skip

    @property
    def global_batch(self) -> int:
        return global_batch(self.world_size, self.micro_batch, self.accumulation)

    @property
    def last_step_examples(self) -> int:
        return self.num_examples - (self.steps_per_epoch - 1) * self.global_batch

    def lines(self, trainable: int, total: int) -> list[str]:
        return [
            "***** Running training *****",
            f"  Num examples = {self.num_examples:,}",
            f"  Num Epochs = {self.num_epochs:,}",
            f"  Instantaneous batch size per device = {self.micro_batch:,}",
            f"  Total train batch size (w. parallel, distributed & accumulation) = {self.global_batch:,}",
            f"  Gradient Accumulation steps = {self.accumulation:,}",
            f"  Total optimization steps = {self.total_steps:,} ({self.steps_per_epoch} per epoch; the last step of "
            f"an epoch takes the {self.last_step_examples} remaining examples)",
            f"  Warmup steps = {self.warmup_steps:,}",
            f"  Micro-batches = {self.grouping()}",
            f"  Number of trainable parameters = {trainable:,} ({100 * trainable / max(total, 1):.4f}% of {total:,})",
        ]


def step_math(config: Config, num_examples: int, world_size: int, start: Position) -> StepMath:
    """The run's step counts; a resumed run finishes its current epoch's order, then whole epochs."""
    train = config.train
    micro, accumulation = train.per_device_train_batch_size, train.gradient_accumulation_steps
    total = total_steps(num_examples, world_size, micro, accumulation, train.num_train_epochs, train.max_steps, start)
    warmup = warmup_steps_for(total, train.warmup_steps, train.warmup_ratio)
    return StepMath(num_examples, train.num_train_epochs, micro, accumulation, world_size,
                    steps_per_epoch(num_examples, world_size, micro, accumulation), total, warmup,
                    pack_tokens_for(config))  # fmt: skip
