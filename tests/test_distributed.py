"""lorakit.distributed in a process of its own (a process group, once made, lasts for the process)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lorakit.distributed import DistInfo

TAKEN_PORT = """
import os, socket
import lorakit.distributed as distributed

taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()  # another program listens on the port found free, before the store binds it
port = taken.getsockname()[1]
first, find = [port], distributed._free_port
distributed._free_port = lambda: first.pop() if first else find()
info = distributed.init_distributed()
print("joined", info.rank, info.world_size, os.environ["MASTER_PORT"] != str(port))
"""


def one_process_command(tiny_model: Path, tiny_data: Path, folder: Path) -> list[str]:
    """The process of the test below (conftest.one_process_runs starts it)."""
    return [sys.executable, "-c", TAKEN_PORT]


def test_a_single_process_takes_another_port_when_the_one_it_found_is_taken_meanwhile(one_process_runs: dict):
    process, folder = one_process_runs[__name__]  # one_process_command's, started beside the other modules' runs
    assert process.wait(timeout=300) == 0, (folder / "stderr").read_text()[-2000:]
    assert (folder / "stdout").read_text().strip().splitlines()[-1] == "joined 0 1 True"


@pytest.mark.parametrize(
    ("local_world_size", "world_size", "expected"),
    [(None, 4, True), ("4", 4, True), ("2", 4, False), ("1", 2, False), ("8", 8, True)],
    ids=["no-launcher", "one-host", "two-hosts", "two-nodes-of-one", "eight"],
)
def test_one_host_is_a_local_world_holding_every_rank(monkeypatch, local_world_size, world_size, expected):
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    info = DistInfo(rank=0, local_rank=0, world_size=world_size, device=torch.device("cpu"))
    assert info.on_one_host is expected


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA GPU"))],
)
def test_a_host_copy_reads_the_values_the_tensor_had_when_queued(device):
    """A step's flags are read a step later: the copy holds them as they were, whatever the tensor becomes after."""
    from lorakit.distributed import HostCopy

    tensor = torch.tensor([15.0, 0.0, 1.0], device=device)
    copy = HostCopy.queue(tensor)
    tensor.fill_(7.0)  # on the GPU queued after the copy; on the CPU the tensor itself is read
    assert copy.tolist() == ([15.0, 0.0, 1.0] if device == "cuda" else [7.0, 7.0, 7.0])
    assert (copy.copied is not None) == (device == "cuda") and not copy.values.is_cuda
