import os
import subprocess
import sys
import time

import pytest

from lorakit.engine.jit import settle_cuda_arch_list


@pytest.mark.parametrize(
    "arch_list, expected",
    [
        ("9.0a", "9.0"),  # the GPU image's value, which DeepSpeed's builder cannot parse
        ("8.0;9.0a+PTX", "8.0;9.0+PTX"),
        ("9.0a 10.0a", "9.0;10.0"),
        ("9.0;9.0a", "9.0"),  # no duplicate entry left behind
        ("8.0;9.0", None),  # already parseable: untouched, nothing said
        (None, None),
    ],
)
def test_suffixed_architectures_lose_their_suffix_and_say_so(arch_list, expected):
    environ = {} if arch_list is None else {"TORCH_CUDA_ARCH_LIST": arch_list}
    lines = settle_cuda_arch_list(environ)
    assert environ.get("TORCH_CUDA_ARCH_LIST") == (expected or arch_list)
    assert len(lines) == (1 if expected else 0)
    if expected:
        assert f"using '{expected}' for this run" in lines[0]


def _lock(root, name: str = "shm_comm"):
    folder = root / "py311_cpu" / name
    folder.mkdir(parents=True)
    return folder / "lock"


def test_a_lock_left_by_a_killed_build_is_removed_and_said(tmp_path, monkeypatch):
    """What a build killed mid-way leaves: the lock file, held by no process. torch's own baton then acquires."""
    from torch.utils.file_baton import FileBaton

    from lorakit.engine.jit import clear_stale_build_locks, extensions_root

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _lock(tmp_path)
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL))  # as FileBaton.try_acquire, then the process died
    lines = clear_stale_build_locks(extensions_root(), recheck_s=0.01)
    assert not lock.exists() and len(lines) == 1 and str(lock) in lines[0] and "no process holds it" in lines[0]
    baton = FileBaton(str(lock))
    assert baton.try_acquire()  # the relaunch builds instead of waiting forever
    baton.release()


@pytest.fixture
def held_lock(tmp_path):
    """A lock held open by a live process, as a build in progress holds it."""
    lock = _lock(tmp_path, "fused_adam")
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time\nfd = os.open(sys.argv[1], os.O_CREAT | "
                               "os.O_EXCL)\nprint('held', flush=True)\ntime.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    yield lock, holder.pid
    holder.kill()
    holder.wait()


def test_a_lock_a_live_build_holds_is_kept_and_the_wait_is_said(held_lock, tmp_path, capsys):
    from lorakit.engine.jit import clear_stale_build_locks, lock_holders, watch_build_locks

    lock, pid = held_lock
    assert lock_holders(lock) == [pid]
    assert clear_stale_build_locks(tmp_path, recheck_s=0.01) == [] and lock.exists()
    with watch_build_locks(tmp_path, notice_s=0.3, poll_s=0.05):
        time.sleep(2.0)  # stands for DeepSpeed's FileBaton.wait
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # once per lock, not once a poll
    assert f"build lock {lock} (held by process {pid})" in lines[0] and f"delete {lock}" in lines[0]


def test_a_short_wait_says_nothing(held_lock, tmp_path, capsys):
    from lorakit.engine.jit import watch_build_locks

    with watch_build_locks(tmp_path, notice_s=5, poll_s=0.05):
        time.sleep(0.2)
    assert capsys.readouterr().err == ""


def test_a_long_wait_for_another_rank_is_said_once(capsys):
    from lorakit.distributed import notice_after

    with notice_after(0.1, "lorakit: waiting for rank 0"):
        time.sleep(1.0)  # margins wide enough for a loaded 2-core CI machine
    with notice_after(5, "lorakit: not said"):
        pass
    assert capsys.readouterr().err.splitlines() == ["lorakit: waiting for rank 0"]
