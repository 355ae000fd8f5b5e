"""The tokenised-data cache (lorakit.data.cache): keyed by every input, reused by a second run, shared by the ranks
of a node (local rank 0 builds, the others wait for the folder), written whole or not at all."""

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow
import pyarrow.parquet
import pytest
import tiny
from conversations import MIXED_KEY_RECORDS

from lorakit.config import DataConfig
from lorakit.data import arrow, cache, prepare_data, read_source, ready
from lorakit.data.tokens import TokenizedData
from lorakit.engine import load_tokenizer
from lorakit.errors import LorakitError
from lorakit.templates import get_template


def _config(tiny_data: Path, tmp_path: Path, **flags) -> DataConfig:
    return DataConfig(**{"dataset": ("tiny",), "dataset_dir": str(tiny_data), "cutoff_len": 256,
                         "data_cache_dir": str(tmp_path), **flags})  # fmt: skip


def test_second_run_reuses_the_cache_and_inputs_change_the_key(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    tokenizer = load_tokenizer(str(tiny_model))
    template = get_template("qwen", tokenizer)
    config = _config(tiny_data, tmp_path)
    first, path, cached = prepare_data(config, tokenizer, template)
    assert not cached and path.is_dir() and sorted(p.name for p in path.iterdir()) == [
        "examples.npy", "ids.npy", "labels.npy", "meta.json", "offsets.npy", "targets.npy"]  # fmt: skip
    again, same_path, cached_again = prepare_data(config, tokenizer, template)
    assert cached_again and same_path == path and np.array_equal(first.ids, again.ids)
    _, other, cached_other = prepare_data(_config(tiny_data, tmp_path, cutoff_len=200), tokenizer, template)
    assert other != path and not cached_other
    _, auto_path, _ = prepare_data(config, tokenizer, get_template("auto", tokenizer))
    assert auto_path != path
    workers = prepare_data(_config(tiny_data, tmp_path, preprocessing_num_workers=1), tokenizer, template)
    assert workers[1] == path and workers[2]  # how many processes tokenise changes nothing they write
    rebuilt, _, was_cached = prepare_data(_config(tiny_data, tmp_path, overwrite_cache=True), tokenizer, template)
    assert not was_cached and np.array_equal(rebuilt.labels, first.labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({path.name, other.name, auto_path.name})


def test_an_edited_chat_template_is_another_key_under_template_auto(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    """An edit the probe conversations do not show (a mark before any message that mentions a zebra, which no probe
    does) still changes what --template auto writes for some data: it must not reuse the cache."""
    tokenizer = load_tokenizer(str(tiny_model))
    _, path, _ = prepare_data(_config(tiny_data, tmp_path), tokenizer, get_template("auto", tokenizer))
    mark = "{% for m in messages %}{% if 'zebra' in m['content'] %}[zebra]{% endif %}{% endfor %}"
    tokenizer.chat_template = mark + tokenizer.chat_template
    _, edited, cached = prepare_data(_config(tiny_data, tmp_path), tokenizer, get_template("auto", tokenizer))
    assert edited != path and not cached


def test_the_same_data_in_another_folder_has_the_same_key(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    """The key is also the data part of a checkpoint's fingerprint (lorakit.resume): a checkpoint resumed on another
    machine, whose copy of the data lives under another path, is the same run."""
    tokenizer = load_tokenizer(str(tiny_model))
    template = get_template("qwen", tokenizer)
    moved = shutil.copytree(tiny_data, tmp_path / "elsewhere" / "data")
    _, path, _ = prepare_data(_config(tiny_data, tmp_path / "cache"), tokenizer, template)
    _, again, cached = prepare_data(_config(moved, tmp_path / "cache"), tokenizer, template)
    assert again == path and cached
    (moved / "tiny.json").write_text((moved / "tiny.json").read_text().replace("cat", "cow"))
    assert prepare_data(_config(moved, tmp_path / "cache"), tokenizer, template)[1] != path  # the bytes still count


def test_a_parquet_datasets_key_holds_its_readers_version(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    """The same Parquet bytes read as other records since its reader drops the null keys Arrow adds (the tools text
    of MIXED_KEY_RECORDS lost every other tool's parameters as nulls): a cache tokenised by the former reader, whose
    key the bytes alone made, must not be reused, nor a checkpoint of it resumed. A JSON dataset's key stays."""
    tokenizer = load_tokenizer(str(tiny_model))
    template = get_template("qwen", tokenizer)
    folder = tmp_path / "parquet"
    folder.mkdir()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(MIXED_KEY_RECORDS), folder / "t.parquet")
    (folder / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.parquet", "formatting": "sharegpt"}}))
    parquet = DataConfig(dataset=("t",), dataset_dir=str(folder), cutoff_len=256, data_cache_dir=str(tmp_path))
    keys = [read_source(parquet, template, tokenizer, 42).key, read_source(_config(tiny_data, tmp_path), template,
                                                                          tokenizer, 42).key]  # fmt: skip
    monkeypatch.setattr(cache, "READERS", {})  # the key before: the bytes alone
    former = [read_source(parquet, template, tokenizer, 42).key, read_source(_config(tiny_data, tmp_path), template,
                                                                            tokenizer, 42).key]  # fmt: skip
    assert former[0] != keys[0] and former[1] == keys[1]


def test_the_tokens_are_memory_mapped_and_released(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    tokenizer = load_tokenizer(str(tiny_model))
    data, _, _ = prepare_data(_config(tiny_data, tmp_path), tokenizer, get_template("qwen", tokenizer))
    assert isinstance(data, TokenizedData) and not data.ids.flags.owndata and not data.ids.flags.writeable
    assert len(data.maps) == 2 and data.offsets.flags.writeable  # the per-record arrays are read into memory
    before = [data.example(i) for i in range(len(data))]
    data.release()
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(before, [data.example(i) for i in range(len(data))]))


def test_waiting_ranks_wait_for_the_builder_and_load_what_it_wrote(tiny_model: Path, tiny_data: Path,
                                                                   tmp_path: Path):  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_model))
    template = get_template("qwen", tokenizer)
    config = _config(tiny_data, tmp_path)
    waiting: dict = {}

    def wait() -> None:  # another rank of the node: it does not build, it waits for the folder
        waiting["data"] = prepare_data(config, tokenizer, template, builds=False)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and "data" not in waiting  # nothing to load yet
    built, path, _ = prepare_data(config, tokenizer, template)
    waiter.join(timeout=30)
    loaded, same, cached = waiting["data"]
    assert same == path and not cached and np.array_equal(built.labels, loaded.labels)
    assert np.array_equal(built.offsets, loaded.offsets) and np.array_equal(built.index, loaded.index)


def test_a_waiting_rank_says_so(tiny_model: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capfd: pytest.CaptureFixture):  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_model))
    template = get_template("qwen", tokenizer)
    config = _config(tiny_data, tmp_path)
    source = read_source(config, template, tokenizer, 42)
    monkeypatch.setattr(cache, "WAIT_S", 0.2)
    threading.Timer(1.0, lambda: prepare_data(config, tokenizer, template)).start()
    ready(source, config, tokenizer, template, False, 42, "the training data's")
    err = capfd.readouterr().err
    assert f"waiting 0 s for local rank 0 to write the tokenised cache {tmp_path / source.key}" in err


def test_the_cache_files_follow_the_umask(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    tokenizer = load_tokenizer(str(tiny_model))
    previous = os.umask(0o027)
    try:
        _, path, _ = prepare_data(_config(tiny_data, tmp_path), tokenizer, get_template("qwen", tokenizer))
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in path.iterdir()} == {0o640}


def _block_in_the_map(marks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each process running the map's function marks itself (a file named by its pid in `marks`) and then blocks, as
    a worker at work would be when the out-of-memory killer picks it. The build and its workers are forked, so they
    run this patched Encoder. Picking a busy process by its CPU use instead flaked: it sometimes hit the Manager
    `datasets` starts beside the pool, whose death went unnoticed until the test's 30 s timeout."""
    marks.mkdir()

    def marked_and_blocked(self, batch):
        (marks / str(os.getpid())).touch()
        time.sleep(120)  # killed by the test or by lorakit before this ends

    monkeypatch.setattr(arrow.Encoder, "__call__", marked_and_blocked)


def _kill(victim: str, marks: Path, killed: list[tuple[int, float]]) -> None:
    """SIGKILL the build process or one of its map workers (as the OOM killer may) once a worker runs the map;
    `killed` gets (its pid, when), then every process of the build still there 30 s later (the rank was left waiting
    for them). The build is never waited on here: lorakit reaps it (its exit code)."""
    me = psutil.Process()
    deadline = time.monotonic() + 60
    while not (working := [p for p in me.children(recursive=True) if (marks / str(p.pid)).exists()]):
        if time.monotonic() > deadline:
            return  # no worker ran the map: the test's assertions say so
        time.sleep(0.01)
    build = next(child for child in me.children() if working[0] in child.children(recursive=True))
    workers = build.children(recursive=True)
    target = build if victim == "build" else working[0]
    killed.append((target.pid, time.monotonic()))
    target.kill()
    _, left = psutil.wait_procs([p for p in workers if p.pid != target.pid], timeout=30)
    if victim != "build" and build.is_running() and build.status() != psutil.STATUS_ZOMBIE:
        left.append(build)  # still waiting on its pool
    for process in left:
        killed.append((process.pid, time.monotonic()))
        process.kill()


@pytest.mark.parametrize(
    ("victim", "line"),
    [
        ("build", "ended with exit code -9 (killed, out of memory?)"),
        ("worker", "a process tokenising the data was killed (signal 9: out of memory?)"),
    ],
)
def test_a_killed_build_or_map_worker_is_one_line_at_once_and_leaves_no_process(
    victim: str, line: str, qwen_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))  # as the variable sets it
    _block_in_the_map(tmp_path / "marks", monkeypatch)
    tiny.write_dataset(tmp_path / "data", [{"instruction": f"q {i}", "output": "a"} for i in range(1024)])
    config = _config(tmp_path / "data", tmp_path / "cache", preprocessing_num_workers=2)
    killed: list[tuple[int, float]] = []
    killer = threading.Thread(target=_kill, args=(victim, tmp_path / "marks", killed))
    killer.start()
    with pytest.raises(LorakitError) as caught:
        prepare_data(config, qwen_tokenizer, get_template("qwen", qwen_tokenizer))
    raised = time.monotonic()
    killer.join()
    assert line in str(caught.value) and "\n" not in str(caught.value)
    assert len(killed) == 1 and raised - killed[0][1] < 10, "the rank waited on the build's processes, or left some"
    assert not (tmp_path / "cache").exists() and list((tmp_path / "hf").iterdir()) == []  # nor its Arrow files


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB disk (tmpfs), where this user may mount one (root, as in CI containers)."""
    disk = tmp_path / "small"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("full", ["--data_cache_dir", "HF_DATASETS_CACHE"])
def test_a_full_disk_is_one_line_naming_it(full: str, small_disk: Path, tiny_model: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    import datasets.config

    tiny.write_dataset(tmp_path / "data", tiny.alpaca_records(3000))
    cache_dir = small_disk if full == "--data_cache_dir" else tmp_path / "cache"
    if full == "HF_DATASETS_CACHE":
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(small_disk))  # as the variable sets it
    tokenizer = load_tokenizer(str(tiny_model))
    with pytest.raises(LorakitError) as caught:
        prepare_data(_config(tmp_path / "data", cache_dir), tokenizer, get_template("qwen", tokenizer))
    assert str(small_disk) in str(caught.value) and full in str(caught.value) and "\n" not in str(caught.value)
    assert list(small_disk.iterdir()) == [] and not (tmp_path / "cache").exists()
