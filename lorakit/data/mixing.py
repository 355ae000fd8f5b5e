"""Several datasets into one training set: LLaMA-Factory's --mix_strategy and --interleave_probs.

`concat`: every record of each dataset, in --dataset order. `interleave_under` / `interleave_over`: examples are
drawn from the datasets in turn (no --interleave_probs) or at random with those probabilities; each dataset's
records are taken in file order and, once used up, from its start again. interleave_under stops when the first
dataset runs out (`datasets.interleave_datasets`' stopping_strategy "first_exhausted": the larger datasets are
under-sampled), interleave_over when every dataset has run out at least once ("all_exhausted": the smaller ones
repeat). The draws are exactly `datasets.interleave_datasets`' with seed --seed, as LLaMA-Factory calls it
(tests/data/test_mixing.py compares them); here they are made with numpy on record indices alone.

The mixture is made once per run, a pure function of the record counts, the two flags and --seed; each epoch
then shuffles it (lorakit.data.batching.plan_epoch), so a resumed run trains on the same examples in the same
order. The tokenised-data cache key covers what makes the mixture (the data files, hence the record counts, the two
flags and --seed where the draws are random: lorakit.data.cache), and so does the checkpoint fingerprint, which
holds that key. The cache keeps each record's tokens once and the mixture as record indices (lorakit.data.tokens).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lorakit.config import DataConfig
from lorakit.data.records import DatasetSpec, load_records
from lorakit.errors import LorakitError
from lorakit.templates import Message

DRAW_BLOCK = 1000  # datasets draws sources 1000 at a time; drawing in whole blocks keeps the same random stream


@dataclass(frozen=True)
class MixedData:
    """The training set's conversations, in the mixture's order."""

    conversations: list[list[Message]]
    digest: str = ""  # sha256 of the mixture's order, for the cache key ("": data from Python, keyed by content)
    line: str = ""  # the realised proportions, logged at start ("": one dataset)
    wheres: list[str] = field(default_factory=list)  # each conversation's file and record, as errors name it


def mixture_order(lengths: Sequence[int], strategy: str, probs: Sequence[float], seed: int) -> np.ndarray:
    """Indices into the datasets' concatenation, as `datasets.interleave_datasets(...)` selects them."""
    sizes = np.asarray(lengths, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    if strategy == "concat" or len(sizes) == 1:
        return np.arange(int(sizes.sum()), dtype=np.int64)
    over = strategy == "interleave_over"
    if not probs:  # in turn: rows of one record from each dataset, min (under) or max (over) rows
        rows = int(sizes.max() if over else sizes.min())
        return (np.arange(rows)[:, None] % sizes[None, :] + offsets).reshape(-1)
    draws = _draws(sizes, probs, seed, over)
    order = np.empty(len(draws), np.int64)
    for source, size in enumerate(sizes):
        at = np.flatnonzero(draws == source)
        order[at] = np.arange(len(at)) % size + offsets[source]  # the k-th draw takes record k, wrapping round
    return order


def _draws(sizes: np.ndarray, probs: Sequence[float], seed: int, over: bool) -> np.ndarray:
    """The dataset of each example: random draws up to and including the one that uses up the first dataset
    (under) or the last one still unused up (over)."""
    p = np.asarray(probs, np.float64)
    p = p if abs(p.sum() - 1) <= 1e-8 else p / p.sum()  # numpy's own tolerance; the config allows 1e-6
    rng = np.random.default_rng(seed)
    blocks, counts = [], np.zeros(len(sizes), np.int64)
    done = np.all if over else np.any
    while not done(counts >= sizes):
        blocks.append(rng.choice(len(sizes), size=DRAW_BLOCK, p=p))
        counts += np.bincount(blocks[-1], minlength=len(sizes))
    draws = np.concatenate(blocks)
    used_up = [np.flatnonzero(draws == s)[size - 1] for s, size in enumerate(sizes) if counts[s] >= size]
    return draws[: (max(used_up) if over else min(used_up)) + 1]


def mixture_line(names: Sequence[str], lengths: Sequence[int], order: np.ndarray, config: DataConfig,
                 seed: int) -> str:  # fmt: skip
    """One log line: how many examples each dataset gave, their share, and from how many records."""
    sources = np.searchsorted(np.cumsum(lengths), order, side="right")
    counts = np.bincount(sources, minlength=len(names))
    total = max(len(order), 1)
    how = config.mix_strategy
    if config.interleave_probs:
        how += f", --interleave_probs {','.join(f'{p:g}' for p in config.interleave_probs)}, --seed {seed}"
    parts = [f"{name} {n:,} ({n / total:.1%}) from {size:,} records" for name, n, size in zip(names, counts, lengths)]
    return f"data mix ({how}): {len(order):,} examples: " + "; ".join(parts)


def mix(names: Sequence[str], lengths: Sequence[int], config: DataConfig, seed: int) -> tuple[np.ndarray, str]:
    """The mixture of datasets of these record counts as `config` says: its order (indices into the datasets'
    concatenation) and its log line ("" for one dataset)."""
    if not sum(lengths):
        raise LorakitError(f"no examples left: the data files of {list(names)} hold no records")
    interleaved = config.mix_strategy != "concat" and len(names) > 1
    empty = [name for name, size in zip(names, lengths) if not size]
    if interleaved and empty:
        raise LorakitError(f"dataset '{empty[0]}' holds no records; --mix_strategy {config.mix_strategy} draws from "
                           "every dataset: drop it from --dataset")  # fmt: skip
    if config.interleave_probs and len(config.interleave_probs) != len(names):  # config checks --dataset; this, names
        raise LorakitError(f"--interleave_probs gives {len(config.interleave_probs)} probabilities for {len(names)} "
                           "datasets; give one per dataset")  # fmt: skip
    order = mixture_order(lengths, config.mix_strategy, config.interleave_probs, seed)
    return order, mixture_line(names, lengths, order, config, seed) if len(names) > 1 else ""


def load_mixed(specs: list[DatasetSpec], config: DataConfig, seed: int) -> MixedData:
    """The datasets of `specs` read (in this process: the reference path, `lorakit preview`) and mixed as `config`
    says (--max_samples applies to each before mixing)."""
    datasets = load_records(specs, config.max_samples)
    order, line = mix([s.name for s in specs], [len(dataset) for dataset in datasets], config, seed)
    flat = [pair for dataset in datasets for pair in dataset]
    digest = hashlib.sha256(np.ascontiguousarray(order, np.int64).tobytes()).hexdigest()
    mixed = [flat[i] for i in order.tolist()]
    return MixedData([c for _, c in mixed], digest, line, [where for where, _ in mixed])
