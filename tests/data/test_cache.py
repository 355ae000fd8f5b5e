from pathlib import Path

import numpy as np

from lorakit.config import DataConfig
from lorakit.data import prepare_data
from lorakit.engine import load_tokenizer
from lorakit.templates import get_template


def test_second_run_reuses_the_cache_and_inputs_change_the_key(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    tokenizer = load_tokenizer(str(tiny_model))
    template = get_template("qwen", tokenizer)
    config = DataConfig(dataset=("tiny",), dataset_dir=str(tiny_data), cutoff_len=256, data_cache_dir=str(tmp_path))
    first, path, cached = prepare_data(config, tokenizer, template, True, lambda ok: ok)
    assert not cached and path.is_file()
    again, same_path, cached_again = prepare_data(config, tokenizer, template, True, lambda ok: ok)
    assert cached_again and same_path == path and np.array_equal(first.ids, again.ids)
    _, other, cached_other = prepare_data(
        DataConfig(**{**config.__dict__, "cutoff_len": 200}), tokenizer, template, True, lambda ok: ok
    )
    assert other != path and not cached_other
    _, auto_path, _ = prepare_data(config, tokenizer, get_template("auto", tokenizer), True, lambda ok: ok)
    assert auto_path != path


def test_waiting_ranks_load_what_the_builder_wrote(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    tokenizer = load_tokenizer(str(tiny_model))
    template = get_template("qwen", tokenizer)
    config = DataConfig(dataset=("tiny",), dataset_dir=str(tiny_data), cutoff_len=256, data_cache_dir=str(tmp_path))
    built, path, _ = prepare_data(config, tokenizer, template, True, lambda ok: ok)
    loaded, _, cached = prepare_data(config, tokenizer, template, False, lambda ok: ok)
    assert cached and np.array_equal(built.labels, loaded.labels) and np.array_equal(built.offsets, loaded.offsets)


def test_the_cache_file_follows_the_umask(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    import os

    tokenizer = load_tokenizer(str(tiny_model))
    config = DataConfig(dataset=("tiny",), dataset_dir=str(tiny_data), cutoff_len=256, data_cache_dir=str(tmp_path))
    previous = os.umask(0o027)
    try:
        _, path, _ = prepare_data(config, tokenizer, get_template("qwen", tokenizer), True, lambda ok: ok)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640
