import math
import random
from pathlib import Path

import pytest
import torch

from lorakit.distributed import DistInfo
from lorakit.reporting import Reporter, smooth
from lorakit.steps import StepMath


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


def test_the_summary_says_this_runs_compile_not_an_earlier_runs_in_the_process(monkeypatch, tmp_path: Path):
    """torch's compile timers and cache counters count for the whole process: a second train() in it (research
    code) compiled 3 s, two graphs of them afresh."""
    timers, misses = iter([19.0, 22.0]), iter([3, 5])  # by the time the run starts, and by its end
    monkeypatch.setattr("lorakit.reporting.compile_seconds", lambda: next(timers))
    monkeypatch.setattr("lorakit.reporting.compile_cache_misses", lambda: next(misses))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 2**30)
    monkeypatch.setattr(DistInfo, "max", lambda self, values: values)  # one rank: no collective
    reporter = Reporter(tmp_path, StepMath(48, 1, 4, 2, 1, 6, 6, 0), DistInfo(0, 0, 1, torch.device("cuda")), 0, 0.0)
    reporter.step_done(torch.tensor(1.0), 100)
    summary = reporter.finish(1, 0.2, plot=False)
    assert summary["compile_seconds"] == 3.0 and summary["compile_cache_misses"] == 2
