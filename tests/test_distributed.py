"""lorakit.distributed in a process of its own (a process group, once made, lasts for the process)."""

from __future__ import annotations

import sys

from launch import run

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


def test_a_single_process_takes_another_port_when_the_one_it_found_is_taken_meanwhile():
    done = run([sys.executable, "-c", TAKEN_PORT])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "joined 0 1 True"
