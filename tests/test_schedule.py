import math

import pytest

from lorakit.schedule import learning_rate_at, warmup_steps_for


@pytest.mark.parametrize(
    "step, total, warmup, kind, expected",
    [
        (0, 100, 0, "cosine", 1.0),
        (50, 100, 0, "cosine", 0.5),
        (99, 100, 0, "cosine", 0.5 * (1 + math.cos(math.pi * 0.99))),
        (0, 100, 10, "cosine", 0.1),
        (9, 100, 10, "cosine", 1.0),
        (10, 100, 10, "cosine", 1.0),
        (55, 100, 10, "cosine", 0.5),
        (0, 100, 0, "linear", 1.0),
        (75, 100, 0, "linear", 0.25),
        (20, 100, 10, "linear", 80 / 90),
        (4, 100, 10, "constant", 0.5),
        (99, 100, 10, "constant", 1.0),
    ],
)
def test_learning_rate_matches_the_closed_form(step, total, warmup, kind, expected):
    assert learning_rate_at(step, total, peak=1.0, warmup=warmup, kind=kind) == pytest.approx(expected, rel=1e-12)


def test_cosine_decays_monotonically_towards_zero():
    rates = [learning_rate_at(s, 280, 5e-4, 0, "cosine") for s in range(280)]
    assert rates[0] == 5e-4 and all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] < 1e-7


@pytest.mark.parametrize(
    "steps, ratio, total, expected", [(5, 0.5, 100, 5), (0, 0.1, 290, 29), (0, 0.0, 290, 0), (0, 0.01, 290, 3)]
)
def test_warmup_steps_take_the_explicit_count_first(steps, ratio, total, expected):
    assert warmup_steps_for(total, steps, ratio) == expected
