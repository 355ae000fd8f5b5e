"""Launching ranks from a test: the repository root, a free port, torchrun, and a launch that keeps its log.

Every multi-rank test (tests/test_multirank.py, tests/test_resume.py) starts its processes through here, with
the working tree on PYTHONPATH (so the launched ranks run this checkout, not an installed copy) and one thread
per rank (two ranks share a small CPU).
"""

from __future__ import annotations

import contextlib
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


def _env(changes: dict[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment for a launch, with `changes` (a variable set, or removed where None)."""
    environ = {**os.environ, **(changes or {})}
    # this checkout first; what the caller's PYTHONPATH held after it (e.g. packages installed with --target)
    path = os.pathsep.join(p for p in (str(REPO), environ.get("PYTHONPATH") or "") if p)
    # one inductor compile thread: no compile worker pool beside each rank on a 2-core machine (a GPU host's run
    # may set more: its compiled-layer tests compile afresh in every case)
    threads = environ.get("TORCHINDUCTOR_COMPILE_THREADS")
    threads = "1" if threads is None else threads
    environ.update(PYTHONPATH=path, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS=threads)
    return {name: value for name, value in environ.items() if value is not None}


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


def start(command: list[str], log: Path, errors: Path | None = None,
          env: dict[str, str | None] | None = None) -> subprocess.Popen:  # fmt: skip
    """Start `command` without waiting (to signal or kill it mid-run, or to read it in a later test: a fixture starts
    it early, so that it runs beside the tests before that one); its output goes to `log`, its standard error there
    too or to `errors`, never to pytest's capture of whatever test runs meanwhile. `env`: variables set for it alone
    (None: removed), as monkeypatch would set them around a `run`."""
    out, err = open(log, "w"), open(errors, "w") if errors else None
    try:
        return subprocess.Popen(command, cwd=REPO, env=_env(env), stdout=out, stderr=err or subprocess.STDOUT)
    finally:  # the child holds its own copies
        out.close()
        if err:
            err.close()


def finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    """Wait for a command `start` began, its output in `log`, as `launch` runs one: that output, or the test fails
    with its last lines."""
    code = process.wait(timeout=timeout)
    output = log.read_text()
    assert code == 0, f"launch failed ({code}); last lines:\n{output[-3000:]}"
    return output


def stop_unread(processes: list[subprocess.Popen]) -> None:
    """At a fixture's teardown: end the processes it started early that no test read (one failed before reading
    its process, or the session stopped), so none outlives the session."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def yield_to_pytest(pid: int) -> None:
    """Let process `pid` (one a fixture started early, to be read by a later test) and what it starts run only where
    the tests meanwhile leave a core idle: at normal priority, a few of them at once slowed pytest's own work as much
    as they saved (the machine has 2 cores, and pytest keeps one busy)."""
    with contextlib.suppress(ProcessLookupError):  # one that has ended already
        os.setpriority(os.PRIO_PROCESS, pid, 10)
