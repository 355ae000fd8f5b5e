"""Tokenised examples, flat: every record's ids and labels back to back, read from a memory map.

The cache (lorakit.data.cache) holds each record's tokens once, in `ids.npy` and `labels.npy` (int32), with
`offsets.npy` (record i is [offsets[i], offsets[i+1])), `targets.npy` (its trained tokens) and `examples.npy`
(the training set: a record index per example, in the mixture's order, repeats included, the records that lost
every target to --cutoff_len left out). Only those small per-record arrays are read into memory; the tokens are
mapped, so every rank of a node reads the one copy in the page cache, and `release` drops the pages a rank has
read from its resident set after each step (they stay cached): its memory does not grow with the data.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedData:
    """Example i is record `index[i]` (every record in order when `index` is None): its ids are
    ids[offsets[r]:offsets[r+1]]. `targets` holds each record's trained tokens (computed from the labels when
    None)."""

    ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not trained
    offsets: np.ndarray  # int64, len = records + 1
    num_truncated: int
    num_dropped: int  # examples left out because truncation removed every target
    index: np.ndarray | None = None  # int64: the record of each example
    targets: np.ndarray | None = None  # per record
    maps: tuple[mmap.mmap, ...] = field(default=(), repr=False, compare=False)  # what `release` advises

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.index is None else len(self.index)

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        record = index if self.index is None else int(self.index[index])
        start, end = self.offsets[record], self.offsets[record + 1]
        return self.ids[start:end], self.labels[start:end]

    def subset(self, indices: np.ndarray) -> TokenizedData:
        """The examples at `indices`, in that order (a view: the tokens are not copied)."""
        records = np.asarray(indices, np.int64) if self.index is None else self.index[np.asarray(indices, np.int64)]
        return TokenizedData(self.ids, self.labels, self.offsets, self.num_truncated, self.num_dropped, records,
                             self.targets, self.maps)  # fmt: skip

    @cached_property
    def lengths(self) -> np.ndarray:
        lengths = np.diff(self.offsets)
        return lengths if self.index is None else lengths[self.index]

    @cached_property
    def target_counts(self) -> np.ndarray:
        """Tokens each example is trained on (the first token is never a target: nothing predicts it)."""
        counts = self.targets if self.targets is not None else _targets(self.labels, self.offsets)
        counts = np.asarray(counts, np.int64)
        return counts if self.index is None else counts[self.index]

    def release(self) -> None:
        """Drop the token pages this process has read from its resident memory; the page cache keeps them, and a
        later read maps them again. Called after each step, so a rank's memory stays flat as the data grows."""
        for mapped in self.maps:
            if hasattr(mapped, "madvise"):  # Python 3.8+ on Linux and macOS
                mapped.madvise(mmap.MADV_DONTNEED)


def _targets(labels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    if len(offsets) < 2:
        return np.zeros(0, np.int64)
    trained = (labels != IGNORE_INDEX).astype(np.int64)
    trained[offsets[:-1][np.diff(offsets) > 0]] = 0
    return np.add.reduceat(trained, offsets[:-1]) if len(trained) else np.zeros(len(offsets) - 1, np.int64)


def map_array(path: Path) -> tuple[np.ndarray, mmap.mmap | None]:
    """A 1-d .npy file as a read-only array over a memory map (and the map, for `release`)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
        start = handle.tell()
        count = int(np.prod(shape))
        if not count:
            return np.zeros(0, dtype), None
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype, count, start), mapped


def load_tokens(folder: Path, num_truncated: int, num_dropped: int) -> TokenizedData:
    """The tokenised data of a cache folder: tokens mapped, the per-record arrays in memory."""
    ids, ids_map = map_array(folder / "ids.npy")
    labels, labels_map = map_array(folder / "labels.npy")
    maps = tuple(m for m in (ids_map, labels_map) if m is not None)
    small = {name: np.load(folder / f"{name}.npy") for name in ("offsets", "targets", "examples")}
    return TokenizedData(ids, labels, small["offsets"], num_truncated, num_dropped, small["examples"],
                         small["targets"], maps)  # fmt: skip
