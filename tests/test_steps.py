"""Step arithmetic (lorakit.steps), table by table: the global batch, steps per epoch and the short last step, the
run's total with --max_steps and after a resume on another world size, the position and what falls due."""

import numpy as np
import pytest

from lorakit.config import Config
from lorakit.data.batching import plan_epoch
from lorakit.steps import Position, StepMath, advance, due, global_batch, step_math, steps_per_epoch, total_steps


def test_reference_step_math():
    """3,630 examples, 8 ranks, micro-batch 4, accumulation 4, 10 epochs: 29 steps an epoch, 290 in all
    (HF Trainer reports 280 and stops at epoch 9.82 because it drops each epoch's partial window)."""
    per_epoch = steps_per_epoch(3630, world_size=8, micro_batch=4, accumulation=4)
    math = StepMath(3630, 10, 4, 4, 8, per_epoch, per_epoch * 10, 0)
    assert (per_epoch, math.total_steps, math.global_batch, math.last_step_examples) == (29, 290, 128, 46)
    lines = "\n".join(math.lines(trainable=20_185_088, total=7_635_801_600))
    assert "Total optimization steps = 290" in lines and "Total train batch size" in lines and "= 128" in lines
    assert "Micro-batches = padded micro-batches of 4 examples, 4 per rank per step" in lines


# examples, world, micro, accumulation -> global batch, steps per epoch, examples in an epoch's last step
EPOCHS = [
    (3630, 8, 4, 4, 128, 29, 46),  # the reference: a short last step
    (48, 2, 4, 2, 16, 3, 16),  # even: the last step is whole
    (37, 2, 4, 2, 16, 3, 5),  # uneven
    (64, 2, 1, 1, 2, 32, 2),  # accumulation 1, micro-batch 1
    (17, 3, 2, 3, 18, 1, 17),  # one step an epoch, shorter than a global batch
    (100, 1, 1, 16, 16, 7, 4),  # accumulation many, one rank
]


@pytest.mark.parametrize("examples, world, micro, accumulation, batch, per_epoch, last", EPOCHS)
def test_global_batch_steps_per_epoch_and_the_last_step(examples, world, micro, accumulation, batch, per_epoch, last):
    assert global_batch(world, micro, accumulation) == batch
    assert steps_per_epoch(examples, world, micro, accumulation) == per_epoch
    math = StepMath(examples, 1, micro, accumulation, world, per_epoch, per_epoch, 0)
    assert (math.global_batch, math.last_step_examples) == (batch, last)
    plans = plan_epoch(np.full(examples, 10), 0, 1, world, micro, accumulation)  # what training really runs
    assert len(plans) == per_epoch and len(plans[-1].examples()) == last


# examples, world, micro, accumulation, epochs, max_steps, start -> total steps
TOTALS = [
    (48, 2, 4, 2, 6, -1, Position(0, 0, 0), 18),  # tests/test_resume.py's run: 3 steps an epoch
    (37, 2, 4, 2, 2, -1, Position(0, 0, 0), 6),  # uneven: 3 an epoch, the third of 5 examples
    (3630, 8, 4, 4, 10, 100, Position(0, 0, 0), 100),  # --max_steps cuts the run
    (3630, 8, 4, 4, 10, 1000, Position(0, 0, 0), 290),  # --max_steps past the end changes nothing
    (48, 2, 4, 2, 6, -1, Position(4, 1, 16), 18),  # resumed mid-epoch on the same world size
    (48, 2, 4, 2, 6, -1, Position(3, 1, 0), 18),  # resumed at an epoch boundary
    (48, 1, 4, 2, 6, -1, Position(4, 1, 16), 32),  # 2 ranks' checkpoint on 1: 4 + 32/8 + 4 epochs x 6
    (48, 4, 4, 2, 6, -1, Position(4, 1, 16), 13),  # on 4 ranks (batch 32): 4 + 1 + 4 epochs x 2
    (37, 3, 2, 3, 2, -1, Position(1, 0, 18), 6),  # uneven: 19 examples left (2 steps), then an epoch of 3
    (48, 1, 4, 2, 6, 20, Position(4, 1, 16), 20),  # resumed, then cut by --max_steps
    (48, 2, 4, 2, 6, -1, Position(18, 6, 0), 18),  # a finished run resumed (relaunched with `auto`): none left
]


@pytest.mark.parametrize("examples, world, micro, accumulation, epochs, max_steps, start, total", TOTALS)
def test_total_steps_from_any_start(examples, world, micro, accumulation, epochs, max_steps, start, total):
    assert total_steps(examples, world, micro, accumulation, epochs, max_steps, start) == total


@pytest.mark.parametrize("examples, world, micro, accumulation, epochs, max_steps, start, total", TOTALS)
def test_the_epoch_plans_walked_from_a_start_end_where_the_total_says(examples, world, micro, accumulation, epochs,
                                                                     max_steps, start, total):  # fmt: skip
    """The plans training runs from `start` (the loop's own walk: plan_epoch with Position.skip, advance) take
    exactly `total` steps, and a run that is not cut ends after its last epoch with every example used."""
    lengths, position, used = np.random.default_rng(0).integers(5, 50, size=examples), start, []
    for epoch in range(start.epoch, epochs):
        for plan in plan_epoch(lengths, epoch, 3, world, micro, accumulation, start.skip(epoch)):
            if position.step == total:
                break
            used += plan.examples() if epoch == start.epoch else []
            position = advance(position, plan, examples)
    assert position.step == total
    if max_steps < 0:
        assert (position.epoch, position.offset, position.epochs_done(examples)) == (epochs, 0, float(epochs))
        order = np.random.default_rng([3, start.epoch]).permutation(examples)[start.offset :]
        left = sorted(order.tolist()) if start.epoch < epochs else []  # a finished run resumed has none left
        assert sorted(used) == left  # the same examples, whatever the world size


def test_step_math_from_flags_and_a_resumed_position():
    config = Config.from_flat({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                               "num_train_epochs": 6, "warmup_ratio": 0.1, "packing": False})  # fmt: skip
    math = step_math(config, 48, 1, Position(4, 1, 16))
    assert (math.global_batch, math.steps_per_epoch, math.total_steps, math.warmup_steps) == (8, 6, 32, 4)
    assert math.pack_tokens == 0
    packed = step_math(Config.from_flat({"cutoff_len": 512}), 48, 2, Position(0, 0, 0))
    assert packed.pack_tokens == 4096 and "rows of at most 4,096 tokens" in packed.grouping()


@pytest.mark.parametrize(
    "position, examples, taken, after",
    [
        (Position(0, 0, 0), 48, 16, Position(1, 0, 16)),
        (Position(2, 0, 32), 48, 16, Position(3, 1, 0)),  # the epoch's last step starts the next epoch
        (Position(2, 0, 32), 37, 5, Position(3, 1, 0)),  # a short last step does too
        (Position(7, 3, 8), 48, 8, Position(8, 3, 16)),
    ],
)
def test_advance(position, examples, taken, after):
    plan = plan_epoch(np.full(examples, 10), 0, 1, 1, taken, 1)[0]
    assert len(plan.examples()) == taken
    assert advance(position, plan, examples) == after


@pytest.mark.parametrize(
    "step, every, expected", [(10, 10, True), (20, 10, True), (5, 10, False), (3, 0, False), (1, 1, True)]
)
def test_due(step, every, expected):
    assert due(step, every) is expected
