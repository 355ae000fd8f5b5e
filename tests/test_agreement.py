"""The ranks' agreement after each step, read one step late (one gloo rank in this process).

Table-driven: each case is a run of steps as (signal number, loss, acts this step); the outcome is the step at
which the run stops and why, or that it ran through."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as torch_dist
from launch import free_port

from lorakit.agreement import StepFlags, settle
from lorakit.errors import LorakitError


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    """A gloo group of this process alone, gone after this module. Its address is given to the group, not put in
    os.environ: a MASTER_PORT left there would be inherited by the ranks later tests launch, whose own group
    would then find this group's port taken (EADDRINUSE)."""
    if torch_dist.is_initialized():
        yield
        return
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    torch_dist.destroy_process_group()


NAN = math.nan


@pytest.mark.parametrize(
    "steps, outcome",
    [
        ([(0, 1.0, False), (0, 1.0, False), (0, 1.0, True)], "ran through"),
        ([(0, 1.0, False), (0, NAN, False), (0, 1.0, False)], "error at step 2"),  # found one step late
        ([(0, NAN, True)], "error at step 1"),  # a step that acts reads its own flags first
        ([(0, 1.0, False), (0, NAN, True)], "error at step 2"),
        ([(15, 1.0, False), (0, 1.0, False)], "signal 15 at step 2"),  # a signal ends the run one step later
        ([(15, 1.0, True)], "signal 15 at step 1"),
        ([(2, 1.0, False), (0, NAN, False)], "error at step 2"),  # no checkpoint after a non-finite step
    ],
)
def test_a_step_is_acted_on_by_the_next_step_or_at_once_when_it_acts(steps, outcome, tmp_path):
    unread = None
    for step, (signal_number, loss, acts) in enumerate(steps, start=1):
        flags = StepFlags.post(step, signal_number, torch.tensor(loss), torch.tensor(0.5))
        try:
            received, _, unread = settle(unread, flags, acts, tmp_path)
        except LorakitError as err:
            assert outcome == f"error at step {str(err).split(':')[0].removeprefix('step ')}"
            assert "not finite; stopped without saving, no checkpoint was written" in str(err)
            return
        if received:
            assert outcome == f"signal {received} at step {step}"
            return
    assert outcome == "ran through"


def test_a_non_finite_gradient_norm_counts_as_well(tmp_path):
    flags = StepFlags.post(3, 0, torch.tensor(2.0), torch.tensor(math.inf))
    with pytest.raises(LorakitError, match=r"^step 3: the loss \(2 on this rank\) or gradient norm \(inf\)"):
        settle(None, flags, True, tmp_path)
    assert settle(None, StepFlags.post(4, 0, torch.tensor(2.0), None), True, tmp_path) == (0, False, None)


@pytest.mark.parametrize("acts, stops_at", [(False, 2), (True, 1)])
def test_a_hooks_stop_is_read_at_its_step_when_it_acts_else_one_step_later(tmp_path, acts, stops_at):
    unread, stopped = None, []
    for step, stop in ((1, True), (2, False), (3, False)):
        flags = StepFlags.post(step, 0, torch.tensor(1.0), torch.tensor(0.5), stop=stop)
        signal_number, stopping, unread = settle(unread, flags, acts and step == 1, tmp_path)
        assert signal_number == 0
        stopped += [step] if stopping else []
    assert stopped[0] == stops_at
