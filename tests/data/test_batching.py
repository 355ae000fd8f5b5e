import numpy as np
import pytest

from lorakit.data.batching import collate, mean_step_share, plan_epoch
from lorakit.data.encode import IGNORE_INDEX, TokenizedData
from lorakit.steps import steps_per_epoch


@pytest.mark.parametrize(
    "examples, world, micro, accumulation", [(3630, 8, 4, 4), (37, 2, 4, 2), (5, 8, 4, 4), (64, 2, 1, 1), (17, 3, 2, 3)]
)
def test_every_example_once_per_epoch_and_ranks_stay_in_step(examples, world, micro, accumulation):
    lengths = np.random.default_rng(0).integers(5, 300, size=examples)
    for epoch in range(2):
        plans = plan_epoch(lengths, epoch, seed=1, world_size=world, micro_batch=micro, accumulation=accumulation)
        assert len(plans) == steps_per_epoch(examples, world, micro, accumulation)
        seen = [i for plan in plans for i in plan.examples()]
        assert sorted(seen) == list(range(examples))  # no duplicates, no drops
        for plan in plans:
            assert len(plan.micro_batches) == world
            assert len({len(rank) for rank in plan.micro_batches}) == 1  # same number of micro-batches everywhere
            assert all(len(micro_batch) <= micro for rank in plan.micro_batches for micro_batch in rank)
            assert len(plan.micro_batches[0]) <= accumulation
            assert len(plan.examples()) <= world * micro * accumulation


def test_order_depends_on_seed_and_epoch_only():
    lengths = np.arange(1, 101)
    first = [p.examples() for p in plan_epoch(lengths, 0, 5, 2, 4, 2)]
    assert first == [p.examples() for p in plan_epoch(lengths, 0, 5, 2, 4, 2)]
    assert first != [p.examples() for p in plan_epoch(lengths, 1, 5, 2, 4, 2)]
    assert first != [p.examples() for p in plan_epoch(lengths, 0, 6, 2, 4, 2)]


def test_collate_pads_right_and_masks_padding():
    ids = np.array([5, 6, 7, 8, 9], np.int32)
    labels = np.array([IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX], np.int32)
    data = TokenizedData(ids, labels, np.array([0, 3, 5]), 0, 0)
    batch = collate(data, [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    filler = collate(data, [], pad_id=0)
    assert (filler["labels"] == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    "examples, world, micro, accumulation, budget",
    [(3630, 8, 4, 4, 1024), (37, 2, 4, 2, 300), (5, 8, 4, 4, 512), (64, 3, 2, 2, 400)],
)
def test_packed_plans_use_every_example_once_in_rows_within_budget(examples, world, micro, accumulation, budget):
    lengths = np.random.default_rng(1).integers(5, 300, size=examples)
    plans = plan_epoch(lengths, 0, seed=2, world_size=world, micro_batch=micro, accumulation=accumulation,
                       pack_tokens=budget)  # fmt: skip
    assert len(plans) == steps_per_epoch(examples, world, micro, accumulation)
    assert sorted(i for plan in plans for i in plan.examples()) == list(range(examples))
    for plan in plans:
        assert len({len(rank) for rank in plan.micro_batches}) == 1
        for rank in plan.micro_batches:
            assert all(sum(int(lengths[i]) for i in row) <= budget for row in rank)
        tokens = [sum(int(lengths[i]) for row in rank for i in row) for rank in plan.micro_batches]
        assert max(tokens) - min(tokens) <= lengths.max()  # balanced to within one example


def test_pack_restarts_positions_and_never_targets_an_examples_first_token():
    from lorakit.data.batching import pack

    ids = np.array([5, 6, 7, 8, 9], np.int32)
    labels = np.array([IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9], np.int32)
    data = TokenizedData(ids, labels, np.array([0, 3, 5]), 0, 0)
    row = pack(data, [1, 0], pad_id=0)
    assert row["input_ids"].tolist() == [[8, 9, 5, 6, 7]]
    assert row["position_ids"].tolist() == [[0, 1, 0, 1, 2]]
    assert row["labels"].tolist() == [[IGNORE_INDEX, 9, IGNORE_INDEX, 6, 7]]


def test_pack_pads_to_a_multiple_with_a_segment_of_its_own():
    from lorakit.data.batching import pack

    data = TokenizedData(np.arange(5, dtype=np.int32), np.arange(5, dtype=np.int32), np.array([0, 3, 5]), 0, 0)
    row = pack(data, [0, 1], pad_id=0, multiple=4)
    assert row["input_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 0, 0]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert row["labels"][0, 5:].tolist() == [IGNORE_INDEX] * 3


def test_the_step_tokens_bound_holds_every_epochs_largest_share():
    """The memory plan sizes a pass from step_tokens_bound: every epoch's largest share stays within it, though
    later epochs deal other orders whose largest shares exceed the first's by more than the longest example."""
    from lorakit.data.batching import step_tokens_bound

    lengths = np.random.default_rng(3).integers(20, 900, size=301)
    whole = int(lengths.sum()) + 1
    for world, micro, accumulation in ((1, 4, 4), (2, 4, 4), (3, 2, 1)):
        largest = [max(int(lengths[row].sum()) for plan in plan_epoch(lengths, epoch, 5, world, micro, accumulation,
                                                                        pack_tokens=whole)
                       for rank in plan.micro_batches for row in rank if row) for epoch in range(20)]  # fmt: skip
        bound = step_tokens_bound(lengths, 5, world, micro, accumulation, 20)
        assert max(largest) <= bound <= max(largest) + int(lengths.max())  # a bound, and a tight one
        if world == 2:  # the first epoch's largest share plus the longest example is no bound
            assert max(largest) > largest[0] + int(lengths.max())  # largest[0]: the first epoch's


@pytest.mark.parametrize("skip", [1, 3, 4, 7])
def test_the_step_tokens_bound_holds_a_resumed_epochs_shifted_steps(skip):
    """A run resumed `skip` examples into an epoch (on another number of ranks: not a whole step) steps that epoch
    from there, in chunks across the uninterrupted run's steps: the bound must count those chunks."""
    from lorakit.data.batching import step_tokens_bound

    rng = np.random.default_rng(14)  # long and short examples; skipping 4 shifts two long ones into one step
    lengths = np.where(rng.random(64) < 0.5, rng.integers(1500, 2000, 64), rng.integers(1, 50, 64))
    whole = int(lengths.sum()) + 1
    largest = max(int(lengths[row].sum()) for plan in plan_epoch(lengths, 0, 5, 2, 2, 2, skip, pack_tokens=whole)
                  for rank in plan.micro_batches for row in rank if row)  # fmt: skip
    assert largest <= step_tokens_bound(lengths, 5, 2, 2, 2, 1, start_epoch=0, skip=skip)


@pytest.mark.parametrize(
    "examples, world_size, micro_batch, accumulation", [(10, 2, 2, 1), (9, 2, 2, 1), (48, 4, 2, 3), (3, 4, 1, 1)]
)
def test_mean_step_share_is_what_the_planned_steps_give_a_rank_on_average(examples, world_size, micro_batch,
                                                                          accumulation):  # fmt: skip
    """The mean over the epoch's planned steps and ranks of a rank's packed tokens (a short last step included)."""
    lengths = np.random.default_rng(examples).integers(20, 400, examples)
    steps = plan_epoch(lengths, 0, 0, world_size, micro_batch, accumulation, pack_tokens=4096)
    shares = [sum(int(lengths[i]) for micro in rank for i in micro) for step in steps for rank in step.micro_batches]
    assert len(shares) == len(steps) * world_size
    assert mean_step_share(lengths, world_size, micro_batch, accumulation) == sum(shares) // len(shares)
