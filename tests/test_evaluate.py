import numpy as np
import pytest

from lorakit.config import DataConfig
from lorakit.data.checks import split_key
from lorakit.data.encode import TokenizedData
from lorakit.data.mixing import mixture_order
from lorakit.errors import LorakitError
from lorakit.evaluate import held_out_count, split_train_eval


def _data(count: int) -> TokenizedData:
    lengths = np.arange(2, count + 2)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)])
    return TokenizedData(ids, ids.copy(), offsets, 0, 0)


@pytest.mark.parametrize("val_size, count", [(0.0, 0), (0.1, 5), (0.05, 3), (7, 7), (7.0, 7)])
def test_held_out_count(val_size, count):
    assert held_out_count(val_size, 50) == count


def test_too_large_a_split_is_an_error():
    with pytest.raises(LorakitError, match="leaves no training examples"):
        held_out_count(50, 50)


def test_split_is_reproducible_disjoint_and_complete():
    data = _data(40)
    train, held_out = split_train_eval(data, 0.25, seed=3)
    again, _ = split_train_eval(data, 0.25, seed=3)
    other, _ = split_train_eval(data, 0.25, seed=4)
    firsts = lambda d: [int(d.example(i)[0][0]) for i in range(len(d))]  # noqa: E731 - each example's own id
    assert (len(train), len(held_out)) == (30, 10)
    assert sorted(firsts(train) + firsts(held_out)) == list(range(40))
    assert firsts(train) == firsts(again) and firsts(train) != firsts(other)
    assert np.array_equal(held_out.lengths, [int(data.lengths[i]) for i in firsts(held_out)])


def test_a_mixture_without_repeats_splits_its_examples_as_before():
    """Where no record repeats, holding out records is the example split lorakit always made (a permutation of the
    examples seeded by --seed): the same flags hold out the same examples as before."""
    data = _data(40).subset(mixture_order([30, 10], "interleave_under", (), 0))  # interleaved: 20 records, once each
    train, held_out = split_train_eval(data, 0.25, seed=3)
    order = np.random.default_rng([3, 0x5EED]).permutation(len(data))
    assert np.array_equal(held_out.index, data.index[np.sort(order[:5])])
    assert np.array_equal(train.index, data.index[np.sort(order[5:])])


def test_repeated_records_stay_on_one_side_and_training_still_oversamples():
    """interleave_over repeats the smaller dataset's records: a record (its dataset and index: the record index in
    the datasets' concatenation) is held out with every copy, evaluated once, and the rest train as mixed."""
    sizes = [30, 10]
    data = _data(40).subset(mixture_order(sizes, "interleave_over", (0.6, 0.4), 5))
    train, held_out = split_train_eval(data, 0.25, seed=3)
    assert not set(train.index.tolist()) & set(held_out.index.tolist())
    assert len(held_out) == len(set(held_out.index.tolist())) == 10  # a quarter of the 40 records, each once
    assert set(train.index.tolist()) | set(held_out.index.tolist()) == set(range(40))
    small = train.index[train.index >= sizes[0]]
    assert len(small) > len(set(small.tolist())) and len(train) > 30  # the small dataset still repeats
    kept = ~np.isin(data.index, held_out.index)
    assert np.array_equal(train.index, data.index[kept])  # every copy of a training record, in the mixture's order


@pytest.mark.parametrize(
    "flags, key",
    [
        ({"val_size": 0.1}, "k:val_size=0.1"),  # as checkpoints written before the split by records hold it
        ({"val_size": 0.1, "mix_strategy": "interleave_under"}, "k:val_size=0.1"),
        ({"val_size": 0.1, "mix_strategy": "interleave_over", "dataset": ("a",)}, "k:val_size=0.1"),
        ({"mix_strategy": "interleave_over"}, "k:val_size=0.0"),
        ({"val_size": 0.1, "mix_strategy": "interleave_over"}, "k:val_size=0.1:split=records"),
    ],
)
def test_the_fingerprint_changes_only_where_the_split_by_records_changed_it(flags, key):
    assert split_key(DataConfig(**{"dataset": ("a", "b"), **flags}), "k") == key
