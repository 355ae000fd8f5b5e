"""benchmarks/bench.py's steady-state windows: a run that began eager beside its compile warm-up is measured after
its switch to the compiled layers, and one that never switched says so."""

import pytest

from benchmarks.bench import eager_steps_of, steady_windows

SWITCHED = (
    "torch.compile: the steps run the layers eager while any rank's warm-up process compiles (15 s from its start "
    "here), then ...\ntorch.compile: 12 steps ran the layers eager (5 s) while the warm-up compiled"
)
NEVER = "torch.compile: the steps run the layers eager while any rank's warm-up process compiles (10 s from its start"


@pytest.mark.parametrize(
    "log, eager, first_steady_window",
    [
        ("no eager phase", 0, 10),  # the first window (allocations) left out, as before
        (SWITCHED, 12, 20),  # windows 11-15 (the switch's compile at step 13) and before left out
        (NEVER, 30, 10),  # never switched: the eager windows after the first, eager_steps saying so
    ],
)
def test_steady_windows_start_after_the_first_compiled_step(log: str, eager: int, first_steady_window: int):
    records = [{"step": step} for step in range(5, 31, 5)]
    assert eager_steps_of(log, total_steps=30) == eager
    assert steady_windows(records, eager)[0]["step"] == first_steady_window
