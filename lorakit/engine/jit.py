"""The environment DeepSpeed's just-in-time op builds need, settled before the engine is made.

DeepSpeed compiles some ops on first use (fused Adam when a DeepSpeed file asks for it with
`"torch_adam": false`, DeepCompile's native op, the CPU communication op). Its builder reads
TORCH_CUDA_ARCH_LIST and parses every entry as numbers, so an architecture with a feature suffix such as
"9.0a" (Hopper's wgmma variant, which some CUDA images set) fails the build with
"invalid literal for int() with base 10: '0a'". None of DeepSpeed's ops needs the suffixed variant, so lorakit
drops the suffix for this process and says so; torch extensions built later in the process see the same list.

A build also takes a lock file, on which every other process waits without a word; a killed build leaves it
behind. `clear_stale_build_locks` removes one whose owner is provably gone and `watch_build_locks` says, after a
minute, which lock a process waits on and which file to delete (the rule: below).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ARCH = re.compile(r"^(\d+\.\d+)[a-z]+(\+PTX)?$")


def settle_cuda_arch_list(environ: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """Rewrite suffixed architectures in TORCH_CUDA_ARCH_LIST ("9.0a" -> "9.0"); returns the log line, if any."""
    current = environ.get("TORCH_CUDA_ARCH_LIST", "")
    entries = current.replace(" ", ";").split(";")
    fixed = [ARCH.sub(r"\1\2", entry.strip()) for entry in entries if entry.strip()]
    if ";".join(fixed) == ";".join(e.strip() for e in entries if e.strip()):
        return []
    environ["TORCH_CUDA_ARCH_LIST"] = ";".join(dict.fromkeys(fixed))
    return [f"TORCH_CUDA_ARCH_LIST={current!r} has architectures DeepSpeed's op builder cannot parse; using "
            f"{environ['TORCH_CUDA_ARCH_LIST']!r} for this run (lorakit.engine.jit)"]  # fmt: skip


# A JIT build takes a lock file in its extensions folder (torch.utils.file_baton: created with O_EXCL and held open
# by the building process until it removes it); every other process waits, silently and without end, while the
# file exists. A build killed mid-way leaves the file behind, and every later run waits forever.
# lorakit's rule for a lock whose owner is provably gone: no process on this machine has the file open (every
# process's /proc/<pid>/fd listed, or, where that is refused, the process is not a Python one); still so a moment
# later (a finishing build closes the file just before removing it); and the folder is not on a network filesystem
# (where a build on another machine holds it invisibly). Such a lock is removed and the log says so; any other lock
# that keeps a process waiting gets one line after WAIT_NOTICE_S seconds naming the file to delete.
WAIT_NOTICE_S = 60.0
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                       "fuse", "9p", "afs")  # fmt: skip


def extensions_root(environ: dict[str, str] | os._Environ = os.environ) -> Path:
    """Where torch builds JIT extensions (as torch.utils.cpp_extension._get_build_directory, without creating it)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def build_locks(root: Path) -> list[Path]:
    """Lock files of builds under `root`: root/NAME/lock with TORCH_EXTENSIONS_DIR, root/pyXY_ACC/NAME/lock else."""
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}) if root.is_dir() else []


def lock_holders(lock: Path) -> list[int] | None:
    """Pids of the processes on this machine that have `lock` open; None when a process that could hold it cannot
    be inspected."""
    target, holders = os.path.realpath(lock), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                holders.append(int(proc.name))
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process ended meanwhile
        except PermissionError:
            if _may_be_python(proc):
                return None
    return holders if Path("/proc/self/fd").is_dir() else None


def _may_be_python(proc: Path) -> bool:
    """Whether a process whose files cannot be listed may hold a build lock. Only the Python process that runs the
    build can: torch opens the lock with os.open, whose descriptors are not inherited across exec (PEP 446), so
    the compiler and ninja processes it starts never hold it. Unknown counts as may."""
    try:
        names = [(proc / "comm").read_text().strip(), (proc / "cmdline").read_bytes().split(b"\0")[0].decode()]
    except (OSError, UnicodeDecodeError):
        return True
    return any("python" in Path(name).name or name.startswith("pt_") for name in names)


def on_network_filesystem(path: Path) -> bool:
    """Whether `path` lies on a filesystem other machines may share (unknown counts as shared)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return True
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")), key=lambda m: len(m[0]),
               default=None)  # fmt: skip
    return best is None or best[1].split(".")[0] in NETWORK_FILESYSTEMS


def clear_stale_build_locks(root: Path | None = None, recheck_s: float = 1.0) -> list[str]:
    """Remove every build lock under `root` (default: torch's extensions folder) whose owner is provably gone (the
    rule above); the log lines saying so."""
    root = root or extensions_root()
    suspects = [lock for lock in build_locks(root) if lock_holders(lock) == [] and not on_network_filesystem(lock)]
    if not suspects:
        return []
    time.sleep(recheck_s)
    lines = []
    for lock in suspects:
        try:
            if lock_holders(lock) == []:
                lock.unlink()
                lines.append(f"removed the stale torch extension build lock {lock}: no process holds it (a build "
                             "was killed mid-way); the op is built or loaded now")  # fmt: skip
        except FileNotFoundError:
            pass  # its build finished, or another rank removed it
    return lines


def waiting_line(lock: Path, waited_s: float) -> str:
    holders = lock_holders(lock)
    owner = (f"held by process {', '.join(map(str, holders))}" if holders else "held by no process on this machine "
             "(a build on another machine sharing the folder, or one that was killed)")  # fmt: skip
    return (f"lorakit: waiting {waited_s:.0f} s for the torch extension build lock {lock} ({owner}); if no build is "
            f"running, delete {lock} and this run continues")  # fmt: skip


@contextlib.contextmanager
def watch_build_locks(root: Path | None = None, notice_s: float = WAIT_NOTICE_S, poll_s: float = 1.0) -> Iterator[None]:
    """Around code that may build or load a JIT op: a line on stderr for each lock that stays in place for
    `notice_s` seconds while this process is not the one holding it."""
    root, stop, seen = root or extensions_root(), threading.Event(), {}

    def watch() -> None:
        while not stop.wait(poll_s):
            now = time.monotonic()
            for lock in build_locks(root):
                first = seen.setdefault(lock, now)
                if first is not None and now - first >= notice_s and os.getpid() not in (lock_holders(lock) or []):
                    print(waiting_line(lock, now - first), file=sys.stderr, flush=True)
                    seen[lock] = None  # once per lock

    thread = threading.Thread(target=watch, name="lorakit-build-lock-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
