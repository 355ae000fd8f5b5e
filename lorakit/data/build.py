"""Building a tokenised-data cache folder: read, check, tokenise on every core, mix, write, in a child process.

The build runs in a process forked for it, so what reading a large file costs in memory (a JSON list is parsed
whole) leaves with that process and never stays in the rank's resident memory. Its intermediate Arrow files go
in a temporary folder under the datasets cache (`$HF_DATASETS_CACHE`, where `datasets` keeps its own map
results) and are removed when it ends (by the rank, which ends its map workers too, when it is killed); nothing
is written to the lorakit cache until every check has passed. The folder is written under a temporary name and
renamed, so a killed build never leaves a half-written cache.

Its files (lorakit.data.tokens reads them): ids.npy, labels.npy, offsets.npy, targets.npy, examples.npy and
meta.json: the datasets and their record counts, the mixture's size and log line, the first example with tool
turns, the truncated and dropped counts, the distinct records the examples come from, and how long tokenising took.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lorakit.config import DataConfig
from lorakit.data.arrow import Encoder, raw_conversations, raw_files, tokenise
from lorakit.data.checks import check_data
from lorakit.data.info import DatasetSpec
from lorakit.data.mixing import mix
from lorakit.errors import LorakitError
from lorakit.reporting import say
from lorakit.templates import Message, Template

META = "meta.json"
POLL_S = 0.2  # how often the rank looks whether its build process has ended


def available_cores() -> int:
    """The cores this process may run on (a job's CPU set, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build(specs: Sequence[DatasetSpec], conversations: Sequence[list[Message]], config: DataConfig, tokenizer: Any,
          template: Template, seed: int, what: str, folder: Path) -> None:  # fmt: skip
    """Tokenise the datasets of `specs` (or data from Python, `conversations`) into the cache folder `folder`, in a
    child process; its one-line error is raised here. `what` names the data in errors ("the training data's")."""
    names = ", ".join(spec.name for spec in specs) or "the data from Python"
    workers = config.preprocessing_num_workers or available_cores()
    say(f"data: reading and tokenising {names} with up to {workers} processes into {folder}")
    context = multiprocessing.get_context("fork")  # inherits the tokenizer and the data given from Python as they are
    receiving, sending = context.Pipe(duplex=False)
    args = (sending, specs, conversations, config, tokenizer, template, seed, what, folder)
    process = context.Process(target=_child, args=args, name="lorakit-data-build")
    unset = "TOKENIZERS_PARALLELISM" not in os.environ
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else tokenizers warns on fork if it ran threads
    try:
        process.start()
        sending.close()
        while not receiving.poll(POLL_S) and not _ended(process):  # its map workers hold the pipe and the
            pass  # process's sentinel too: a killed build sends no EOF while they live
        try:
            status, message = receiving.recv() if receiving.poll() else ("died", "")
        except EOFError:
            status, message = "died", ""
        if status != "ok":
            _kill_group(process.pid, folder)  # its workers, before it is reaped (its group id stays ours)
        process.join()
    finally:
        if unset:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        if process.is_alive():  # interrupted: the build and its workers, which Ctrl-C no longer reaches
            _kill_group(process.pid, folder)
            process.kill()  # in case it had not made its group yet
            process.join()
    if status == "error":
        raise LorakitError(message)
    if status == "crash":
        raise RuntimeError(f"tokenising the data failed in lorakit's build process:\n{message}")
    if status == "died":
        raise LorakitError(f"the process tokenising the data into {folder} ended with exit code {process.exitcode} "
                           "(killed, out of memory?); lower --preprocessing_num_workers, or free memory")  # fmt: skip


def _ended(process: Any) -> bool:
    """Whether the child has ended, leaving it unreaped (its process group id is still ours to kill). Where
    os.waitid is missing (macOS), it is reaped: its group lives on while a worker does, and is killed the same."""
    if not hasattr(os, "waitid"):
        return process.exitcode is not None
    return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pid: int, folder: Path) -> None:
    """End the build process `pid` and its map workers, and remove the Arrow files it had written."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # killed before it made its group: it had no workers
        pass
    for work in _work_root().glob(f"{_work_prefix(folder, pid)}*"):
        shutil.rmtree(work, ignore_errors=True)


def _work_prefix(folder: Path, pid: int) -> str:
    """The name of a build's temporary folder, up to its random part: its parent can find it if it is killed."""
    return f"lorakit-build-{folder.name}-{socket.gethostname()}-{pid}-"


def _child(sending: Any, *args: Any) -> None:
    os.setpgid(0, 0)  # a group of its own, with its map workers, for `build` to end together
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: the processes use the cores
    import datasets

    datasets.disable_progress_bars()  # a bad input is one line on stderr; the log says what is tokenised
    datasets.logging.set_verbosity_error()
    _stop_when_a_worker_is_killed(sending)
    try:
        _build(*args)
        sending.send(("ok", ""))
    except LorakitError as err:
        sending.send(("error", str(err)))
    except OSError as err:  # a full disk; anything else is a crash, with its traceback
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        sending.send(("error", _no_space(err, args[-1])) if full else ("crash", traceback.format_exc()))
    except BaseException:  # noqa: BLE001 - reported in the parent, which raises it
        sending.send(("crash", traceback.format_exc()))
    finally:
        sending.close()


def _stop_when_a_worker_is_killed(sending: Any) -> None:
    """A map worker killed by a signal (the out-of-memory killer's SIGKILL) would leave `datasets` waiting on its
    pool forever: the pool starts a replacement, and its clean-up waits on a lock the dead worker held. The pool's
    worker handler (multiprocess, as `datasets` uses it) notices the death first; here it reports the death and
    ends the build process, whose group `build` then ends. Workers end by a signal only so while the pool runs: at
    its close the handler is stopped before the workers are."""
    import multiprocess.pool

    join_exited_workers = multiprocess.pool.Pool._join_exited_workers

    def stop_on_a_killed_worker(pool: list) -> bool:
        # looked at after the pool's own join, over the workers before it: a worker that died between a look and
        # the join would otherwise be joined and replaced, and `datasets` then stops on the changed pool with a
        # RuntimeError of its own, ending the workers before the build says why (seen under load)
        workers = list(pool)
        cleaned = join_exited_workers(pool)
        killed = next((worker.exitcode for worker in workers if (worker.exitcode or 0) < 0), None)
        if killed is not None:
            sending.send(("error", f"a process tokenising the data was killed (signal {-killed}: out of memory?); "
                                   "lower --preprocessing_num_workers, or free memory"))  # fmt: skip
            os._exit(1)
        return cleaned

    multiprocess.pool.Pool._join_exited_workers = staticmethod(stop_on_a_killed_worker)


def _no_space(err: OSError, folder: Path) -> str:
    return (f"the disk filled up while tokenising the data ({os.strerror(err.errno)}): lorakit writes its "
            f"intermediate files in {_work_root()} (HF_DATASETS_CACHE) and the cache in {folder.parent} "
            "(--data_cache_dir); free space there or point them at a larger disk")  # fmt: skip


def _work_root() -> Path:
    """The datasets cache, where `datasets` writes its own map results; the temporary folder where it cannot be."""
    import datasets.config

    root = Path(datasets.config.HF_DATASETS_CACHE)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path(tempfile.gettempdir())
    return root if os.access(root, os.W_OK) else Path(tempfile.gettempdir())


def _build(specs: Sequence[DatasetSpec], conversations: Sequence[list[Message]], config: DataConfig, tokenizer: Any,
           template: Template, seed: int, what: str, folder: Path) -> None:  # fmt: skip
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=_work_prefix(folder, os.getpid()), dir=_work_root()))
    try:
        if specs:
            files, arrows, read_error = raw_files(specs, config.max_samples, work)
        else:
            files, arrows, read_error = [], raw_conversations(conversations, work), None
        read = time.perf_counter()
        encoder = Encoder(tuple(specs), tuple(files), template, tokenizer, config)
        workers = config.preprocessing_num_workers or available_cores()
        tokens = tokenise(arrows, encoder, workers, work) if arrows else None
        table = tokens.data.table if tokens is not None else None
        tokenised = time.perf_counter()
        _raise_first_error(table, read_error)
        records = _records(table)
        names = [spec.name for spec in specs] or ["data from Python"]
        counts = np.bincount(records["dataset"], minlength=len(names)).tolist()
        order, line = mix(names, counts, config, seed) if specs else (np.arange(len(records["dataset"])), "")
        with_tools = np.flatnonzero(records["tools"][order])
        meta = {"datasets": names, "records": counts, "examples": len(order), "line": line,
                "tools_example": int(with_tools[0]) if len(with_tools) else None}  # fmt: skip
        kept = records["targets"][order] > 0
        meta["dropped"] = int((~kept).sum())
        meta["distinct_records"] = len(np.unique(order[kept]))  # what --val_size splits (interleave_over repeats)
        check_data(meta, config, template, what)  # on the examples that train
        if not kept.any():
            raise LorakitError(f"no examples left: all {len(order)} lost every trained token to --cutoff_len "
                               f"{config.cutoff_len}; raise --cutoff_len")  # fmt: skip
        meta.update(truncated=int(records["truncated"][order].sum()), workers=workers,
                    phases={"read": round(read - started, 3), "tokenise": round(tokenised - read, 3)})  # fmt: skip
        _commit(table, records, order[kept], meta, folder, config.overwrite_cache, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _raise_first_error(table: pa.Table | None, read_error: str | None) -> None:
    """The first problem in reading order: by file, then stage, then record (lorakit.data.arrow)."""
    if table is not None:
        bad = np.flatnonzero(pc.is_valid(table.column("error")).to_numpy(zero_copy_only=False))
        if len(bad):
            files = table.column("file").to_numpy()[bad]
            stages = table.column("stage").to_numpy()[bad]
            first = int(bad[np.lexsort((bad, stages, files))[0]])
            raise LorakitError(table.column("error")[first].as_py())
    if read_error is not None:  # the file after the last one read
        raise LorakitError(read_error)


def _records(table: pa.Table | None) -> dict[str, np.ndarray]:
    """Per record (rows within --max_samples): its dataset, tool turns, truncation, trained tokens and length."""
    names = ("dataset", "tools", "truncated", "targets")
    if table is None:
        return {name: np.zeros(0, np.int64) for name in (*names, "lengths")}
    use = table.column("use").to_numpy()
    columns = {name: table.column(name).to_numpy()[use] for name in names}
    columns["tools"], columns["truncated"] = columns["tools"].astype(bool), columns["truncated"].astype(bool)
    columns["lengths"] = pc.list_value_length(table.column("input_ids")).to_numpy()[use].astype(np.int64)
    return columns


def _flat(table: pa.Table, column: str, path: Path, total: int) -> None:
    """Every row's list of a column, back to back, as one int32 .npy file (rows without tokens add none)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(total,))
    position = 0
    for chunk in table.column(column).chunks:
        values = chunk.flatten().to_numpy()
        out[position : position + len(values)] = values
        position += len(values)
    out.flush()
    del out


def _commit(table: pa.Table, records: dict[str, np.ndarray], examples: np.ndarray, meta: dict[str, Any],
            folder: Path, replace: bool, started: float) -> None:  # fmt: skip
    offsets = np.concatenate([[0], np.cumsum(records["lengths"])]).astype(np.int64)
    _check_room(folder.parent, 8 * int(offsets[-1]) + 20 * len(offsets) + 8 * len(examples) + (1 << 16))
    staging = folder.with_name(f".{folder.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for column, name in (("input_ids", "ids"), ("labels", "labels")):
            _flat(table, column, staging / f"{name}.npy", int(offsets[-1]))
        np.save(staging / "offsets.npy", offsets)
        np.save(staging / "targets.npy", records["targets"].astype(np.int32))
        np.save(staging / "examples.npy", examples.astype(np.int64))
        meta["seconds"] = round(time.perf_counter() - started, 3)  # reading, tokenising and writing
        (staging / META).write_text(json.dumps(meta, ensure_ascii=False))
        _install(staging, folder, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_room(root: Path, need: int) -> None:
    """Room for the cache's files on the disk of --data_cache_dir: they are written through memory maps, and a map
    past a full disk's end kills the process (SIGBUS) instead of raising."""
    existing = next(path for path in (root, *root.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise LorakitError(f"--data_cache_dir {root} has {free / 2**20:.1f} MiB free on its disk; the tokenised data "
                           f"needs {need / 2**20:.1f} MiB: free space there or choose another folder")  # fmt: skip


def _install(staging: Path, folder: Path, replace: bool) -> None:
    """Rename the written folder into place; another build that got there first (a shared cache) keeps its own."""
    old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
    if replace and folder.exists():
        os.rename(folder, old)
    try:
        os.rename(staging, folder)
    except OSError:
        if not folder.is_dir():
            raise
    shutil.rmtree(old, ignore_errors=True)
