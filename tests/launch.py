"""Launching ranks from a test: the repository root, a free port, torchrun, and a launch that keeps its log.

Every multi-rank test (tests/test_multirank.py, tests/test_resume.py) starts its processes through here, with
the working tree on PYTHONPATH (so the launched ranks run this checkout, not an installed copy) and one thread
per rank (two ranks share a small CPU).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(nproc: int = 2, port: int | None = None) -> list[str]:
    """The torchrun command prefix for `nproc` ranks on this machine (a free port unless one is given)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(port or free_port())]  # fmt: skip


def _env() -> dict[str, str]:
    # this checkout first; what the caller's PYTHONPATH held after it (e.g. packages installed with --target)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    # one inductor compile thread: no compile worker pool beside each rank on a 2-core machine (a GPU host's run
    # may set more: its compiled-layer tests compile afresh in every case)
    threads = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "1")
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": threads}


def launch(command: list[str], log: Path) -> str:
    """Run `command` to the end from the repository root; its output goes to `log` and is returned. A failure
    fails the test with the last lines of that output."""
    done = subprocess.run(
        command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    log.write_text(done.stdout)
    assert done.returncode == 0, f"launch failed ({done.returncode}); last lines:\n{done.stdout[-3000:]}"
    return done.stdout


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `command` to the end from the repository root, its output captured, whatever its exit status (for a
    command that is to fail, or in-process state that must not outlive it)."""
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def start(command: list[str], log: Path) -> subprocess.Popen:
    """Start `command` without waiting (to signal or kill it mid-run); its output goes to `log`."""
    return subprocess.Popen(command, cwd=REPO, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
