"""Several datasets mixed (lorakit.data.mixing): the draws are `datasets.interleave_datasets`' (what LLaMA-Factory's
--mix_strategy calls), a pure function of the record counts, the flags and --seed; the realised proportions are
logged; the flags are checked in one line; the cache key and the checkpoint fingerprint follow the mixture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import tiny

from lorakit.cli import parse_config
from lorakit.config import Config, DataConfig
from lorakit.data import plan_epoch, prepare_data
from lorakit.data.cache import cache_folder
from lorakit.data.mixing import load_mixed, mixture_order
from lorakit.data.records import resolve_datasets
from lorakit.errors import LorakitError
from lorakit.evaluate import eval_data
from lorakit.validate import validate

STOPPING = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}


@pytest.mark.parametrize(
    "lengths, strategy, probs, seed",
    [
        ([3, 4, 5], "interleave_under", (), 0),
        ([3, 4, 5], "interleave_over", (), 0),
        ([50, 20], "interleave_under", (0.7, 0.3), 42),
        ([50, 20], "interleave_over", (0.7, 0.3), 42),
        ([50, 20], "interleave_over", (0.7, 0.3), 7),
        ([5, 100, 30], "interleave_under", (0.2, 0.5, 0.3), 11),
        ([5, 100, 30], "interleave_over", (0.2, 0.5, 0.3), 11),
        ([3000, 2500], "interleave_over", (0.9, 0.1), 1),  # over several blocks of 1000 draws
        ([1, 1], "interleave_under", (0.5, 0.5), 3),
    ],
)
def test_interleaving_selects_what_datasets_interleave_datasets_selects(lengths, strategy, probs, seed):
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    parts = [datasets.Dataset.from_dict({"i": list(range(s, s + n))}) for s, n in zip(starts, lengths)]
    theirs = datasets.interleave_datasets(parts, probabilities=list(probs) or None, seed=seed,
                                          stopping_strategy=STOPPING[strategy])["i"]  # fmt: skip
    assert mixture_order(lengths, strategy, probs, seed).tolist() == theirs


def test_concat_is_every_record_in_dataset_order():
    assert mixture_order([2, 3], "concat", (), 5).tolist() == [0, 1, 2, 3, 4]
    assert mixture_order([4], "interleave_over", (), 5).tolist() == [0, 1, 2, 3]  # one dataset: nothing to mix


@pytest.mark.parametrize(
    "strategy, probs, sizes, shares",
    [
        ("interleave_under", (0.7, 0.3), (20000, 20000), (0.7, 0.3)),
        ("interleave_over", (0.7, 0.3), (2000, 300), (0.7, 0.3)),
        ("interleave_under", (0.5, 0.25, 0.25), (4000, 4000, 4000), (0.5, 0.25, 0.25)),
        ("interleave_under", (), (100, 40), (0.5, 0.5)),
        ("interleave_over", (), (100, 40), (0.5, 0.5)),
        ("concat", (), (100, 40), (100 / 140, 40 / 140)),
    ],
)
def test_the_realised_shares_follow_the_probabilities(strategy, probs, sizes, shares):
    order = mixture_order(sizes, strategy, probs, seed=42)
    sources = np.searchsorted(np.cumsum(sizes), order, side="right")
    realised = np.bincount(sources, minlength=len(sizes)) / len(order)
    np.testing.assert_allclose(realised, shares, atol=0.02)


def _two_datasets(folder: Path, sizes: tuple[int, int] = (30, 10)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, size, seed in zip(("big", "small"), sizes, (0, 1)):
        records = tiny.alpaca_records(size, seed)
        records = [{**r, "instruction": f"{name}{i}: {r['instruction']}"} for i, r in enumerate(records)]
        (folder / f"{name}.json").write_text(json.dumps(records))
        info[name] = {"file_name": f"{name}.json"}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def _sources(conversations: list) -> list[str]:
    return [c[0].content.split(":")[0].rstrip("0123456789") for c in conversations]


@pytest.mark.parametrize(
    "flags, counts, line",
    [
        ({}, {"big": 30, "small": 10}, "data mix (concat): 40 examples: big 30 (75.0%) from 30 records; small 10 "
         "(25.0%) from 10 records"),
        ({"mix_strategy": "interleave_under"}, {"big": 10, "small": 10}, "data mix (interleave_under): 20 examples: "
         "big 10 (50.0%) from 30 records; small 10 (50.0%) from 10 records"),
        ({"mix_strategy": "interleave_over"}, {"big": 30, "small": 30}, "data mix (interleave_over): 60 examples: "
         "big 30 (50.0%) from 30 records; small 30 (50.0%) from 10 records"),
    ],
)  # fmt: skip
def test_the_log_line_states_what_was_drawn(tmp_path: Path, flags: dict, counts: dict, line: str):
    folder = _two_datasets(tmp_path / "data")
    config = DataConfig(dataset=("big", "small"), dataset_dir=str(folder), **flags)
    mixed = load_mixed(resolve_datasets(str(folder), config.dataset), config, seed=3)
    sources = _sources(mixed.conversations)
    assert {name: sources.count(name) for name in counts} == counts and mixed.line == line


def test_the_probabilities_line_names_the_seed_and_counts_what_was_drawn(tmp_path: Path):
    folder = _two_datasets(tmp_path / "data", (300, 200))
    config = DataConfig(dataset=("big", "small"), dataset_dir=str(folder), mix_strategy="interleave_under",
                        interleave_probs=(0.7, 0.3))  # fmt: skip
    mixed = load_mixed(resolve_datasets(str(folder), config.dataset), config, seed=9)
    sources = _sources(mixed.conversations)
    big, small = sources.count("big"), sources.count("small")
    assert big == 300 and 100 < small < 160  # big runs out first, at about 300 x 3/7 draws of small
    assert mixed.line == (f"data mix (interleave_under, --interleave_probs 0.7,0.3, --seed 9): {big + small} examples: "
                          f"big {big} ({big / (big + small):.1%}) from 300 records; small {small} "
                          f"({small / (big + small):.1%}) from 200 records")  # fmt: skip


def _flags(tmp_path: Path, folder: Path, *extra: str) -> Config:
    return parse_config(["--dataset_dir", str(folder), "--dataset", "big,small", "--output_dir", str(tmp_path / "o"),
                         "--template", "qwen", "--cutoff_len", "256", *extra])  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mix_strategy", "interleave"], "--mix_strategy interleave is unknown; use one of concat, interleave_under"),
        (["--interleave_probs", "0.7,0.3"], "--interleave_probs 0.7,0.3 applies to --mix_strategy interleave_under"),
        (["--mix_strategy", "interleave_over", "--interleave_probs", "0.5,0.3,0.2"], "gives 3 probabilities for 2"),
        (["--mix_strategy", "interleave_over", "--interleave_probs", "0.7,0.2"], "sums to 0.9; the probabilities"),
        (["--mix_strategy", "interleave_over", "--interleave_probs", "1,0"], "every probability must be above 0"),
        (["--mix_strategy", "interleave_under", "--interleave_probs", "1.2,-0.2"], "every probability must be above"),
        (["--mix_strategy", "interleave_under", "--interleave_probs", "0.7,x"], "--interleave_probs: could not"),
    ],
)
def test_bad_mixing_flags_are_one_line_errors(tmp_path: Path, extra: list[str], message: str):
    with pytest.raises(LorakitError, match=message.replace("(", r"\(").replace(".", r"\.")) as caught:
        _flags(tmp_path, tmp_path, *extra)
    assert "\n" not in str(caught.value)


def test_flags_and_a_config_file_give_the_same_probabilities(tmp_path: Path):
    (tmp_path / "c.yaml").write_text("mix_strategy: interleave_under\ninterleave_probs: [0.7, 0.3]\n")
    from_file = parse_config([str(tmp_path / "c.yaml"), "--dataset", "big,small"]).data
    from_flags = parse_config(["--mix_strategy", "interleave_under", "--interleave_probs", "0.7,0.3", "--dataset",
                               "big,small"]).data  # fmt: skip
    assert from_file.interleave_probs == from_flags.interleave_probs == (0.7, 0.3)


def test_an_empty_dataset_cannot_be_interleaved(tmp_path: Path):
    folder = _two_datasets(tmp_path / "data")
    (folder / "small.json").write_text("[]")
    config = DataConfig(dataset=("big", "small"), dataset_dir=str(folder), mix_strategy="interleave_over")
    with pytest.raises(LorakitError, match="dataset 'small' holds no records; --mix_strategy interleave_over draws"):
        load_mixed(resolve_datasets(str(folder), config.dataset), config, seed=0)


def _plan(tmp_path: Path, model: Path, folder: Path, *extra: str) -> Any:
    return validate(_flags(tmp_path, folder, "--model_name_or_path", str(model), *extra))


def test_the_mixture_and_its_key_are_a_pure_function_of_seed_and_flags(tiny_model: Path, tmp_path: Path):
    """What exact resume rests on: the same flags give the same examples in the same order and the same cache key
    (hence fingerprint); another seed draws another mixture, refused on resume as other data."""
    folder = _two_datasets(tmp_path / "data")
    mix = ["--mix_strategy", "interleave_over", "--interleave_probs", "0.6,0.4"]
    first, again = (_plan(tmp_path, tiny_model, folder, *mix, "--seed", "11") for _ in range(2))
    assert _examples(first) == _examples(again) and again.train_data.cached
    assert first.train_data.key == again.train_data.key and first.fingerprint == again.fingerprint
    (line,) = [note for note in first.notes if note.startswith("data mix")]  # said at start with the other notes
    assert line.startswith("data mix (interleave_over, --interleave_probs 0.6,0.4, --seed 11): ")
    other_seed = _plan(tmp_path, tiny_model, folder, *mix, "--seed", "12")
    assert _examples(other_seed) != _examples(first)
    assert other_seed.train_data.key != first.train_data.key
    concat = [_plan(tmp_path, tiny_model, folder, "--seed", seed).train_data.key for seed in ("11", "12")]
    assert concat[0] == concat[1] and first.train_data.key not in concat  # concat does not draw: the seed is moot


def _examples(plan: Any) -> list[list[int]]:
    """The training set's examples, in order, as the loop reads them from the cache."""
    data, _, _ = prepare_data(plan.config.data, plan.tokenizer, plan.template, source=plan.train_data)
    return [data.example(i)[0].tolist() for i in range(len(data))]


def test_val_size_holds_out_records_of_an_oversampled_mixture(tiny_model: Path, tmp_path: Path):
    """interleave_over repeats the small dataset's records; --val_size holds records out with every copy, so none is
    both trained and evaluated (a record: its dataset and index in it, the record index in the datasets'
    concatenation), and the training side still oversamples the small dataset."""
    folder = _two_datasets(tmp_path / "data")  # big: records 0-29, small: 30-39, each drawn 3 times
    plan = _plan(tmp_path, tiny_model, folder, "--mix_strategy", "interleave_over", "--val_size", "0.25")
    data, _, _ = prepare_data(plan.config.data, plan.tokenizer, plan.template, source=plan.train_data)
    train, held_out = eval_data(plan, data)
    assert held_out is not None and not set(train.index.tolist()) & set(held_out.index.tolist())
    assert len(held_out) == len(set(held_out.index.tolist())) == 10  # a quarter of the 40 records, each once
    small = train.index[train.index >= 30].tolist()
    assert len(small) == 3 * len(set(small)) > 0  # each small record left to train is drawn 3 times, as mixed
    assert len(train) == 60 - sum(3 if record >= 30 else 1 for record in held_out.index.tolist())
    assert plan.fingerprint["data"].endswith(":val_size=0.25:split=records")  # checkpoints of the former split differ


def test_val_size_counts_records_in_a_cache_written_before_they_were_counted(tiny_model: Path, tmp_path: Path):
    """A cache from before session 8 has no distinct_records in its meta, and its example count counts
    interleave_over's repeats: a --val_size that holds out every record must still fail in validation (one line,
    before any process group), not at the split once training has started. The cache is reused, not rebuilt."""
    folder = _two_datasets(tmp_path / "data")  # big: 30 records, small: 10, each drawn 3 times: 60 examples
    mix = ["--mix_strategy", "interleave_over", "--data_cache_dir", str(tmp_path / "cache")]  # its own: edited below
    plan = _plan(tmp_path, tiny_model, folder, *mix, "--val_size", "1")
    meta_file = cache_folder(plan.config.data, plan.train_data.key) / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta.pop("distinct_records") == 40 and meta["examples"] - meta["dropped"] == 60
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(LorakitError, match=r"^--val_size 50 leaves no training examples of 40 records; lower"):
        _plan(tmp_path, tiny_model, folder, *mix, "--val_size", "50")
    assert _plan(tmp_path, tiny_model, folder, *mix, "--val_size", "39").train_data.cached


def test_a_resumed_epoch_continues_the_mixed_order():
    """The epoch's order over the mixture depends on seed and epoch only; resuming after k steps plans exactly the
    uninterrupted epoch's remaining steps."""
    order = mixture_order([30, 10], "interleave_over", (0.6, 0.4), 11)
    lengths = (order % 7 + 3).astype(np.int64)  # example lengths as a function of the record drawn
    for epoch in (0, 1):
        full = plan_epoch(lengths, epoch, 11, 2, 4, 2, pack_tokens=64)
        for steps_done in (1, 3):
            resumed = plan_epoch(lengths, epoch, 11, 2, 4, 2, skip=steps_done * 16, pack_tokens=64)
            assert [p.micro_batches for p in resumed] == [p.micro_batches for p in full[steps_done:]]
