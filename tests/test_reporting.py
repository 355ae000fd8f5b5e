import math
import random

import pytest

from lorakit.reporting import smooth


def _reference_run() -> tuple[list[float], list[float]]:
    """The reference job's shape: 300 steps logged every 5, a loss falling fast in the first epochs, with noise."""
    rng = random.Random(0)
    truth = [2 + 10 * math.exp(-step / 40) for step in range(5, 301, 5)]
    return truth, [value + rng.uniform(-0.3, 0.3) for value in truth]


def test_the_smoothed_loss_follows_the_raw_loss_without_lagging():
    truth, raw = _reference_run()
    smoothed = smooth(raw)
    assert len(smoothed) == len(raw)
    assert max(abs(s - t) for s, t in zip(smoothed, truth)) < 0.6
    early = [s - t for s, t in zip(smoothed[:12], truth[:12])]  # the first two epochs, where a lag shows most
    assert abs(sum(early) / len(early)) < 0.3


@pytest.mark.parametrize(
    "values, expected",
    [
        ([], []),
        ([3.0], [3.0]),
        ([3.0, 1.0], [3.0, 1.0]),
        ([5.0] * 7, [5.0] * 7),
        ([float(i) for i in range(30)], [float(i) for i in range(30)]),
    ],  # the last: a line stays a line
)
def test_short_flat_and_straight_series(values, expected):
    assert smooth(values) == pytest.approx(expected)
