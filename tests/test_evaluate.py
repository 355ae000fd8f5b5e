import numpy as np
import pytest

from lorakit.data.encode import TokenizedData
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
