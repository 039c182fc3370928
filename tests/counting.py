"""Counting what a feature store reads, for tests that assert read costs instead of wall time.

Every chunk :class:`stage_dist.store.zarr_shards.ArrayReader` decodes passes through ``ArrayReader._decode``;
arrays whose layout it does not know are read through ``zarr.Array.__getitem__``. Both are
counted per array name::

    with count_reads() as counts:
        store = FeatureStore.open(path)
        store.read_window(WindowSpec(0, 0, 6))
    assert counts.chunks["objects/boxes"] <= 1 and not counts.zarr_calls
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import zarr

from stage_dist.store.zarr_shards import ArrayReader


@dataclass
class ReadCounts:
    chunks: Counter[str] = field(default_factory=Counter)  # array name -> chunks decoded
    decoded_bytes: Counter[str] = field(default_factory=Counter)  # array name -> bytes decoded
    zarr_calls: Counter[str] = field(default_factory=Counter)  # array path -> zarr reads

    @property
    def total_chunks(self) -> int:
        return sum(self.chunks.values())

    def clear(self) -> None:
        self.chunks.clear()
        self.decoded_bytes.clear()
        self.zarr_calls.clear()


@contextmanager
def count_reads() -> Iterator[ReadCounts]:
    """Count chunk decodes and zarr reads of every store read inside the block (this process)."""
    counts = ReadCounts()
    decode, getitem = ArrayReader._decode, zarr.Array.__getitem__

    def counted_decode(self, chunk, encoded):
        values = decode(self, chunk, encoded)
        counts.chunks[self.name] += 1
        counts.decoded_bytes[self.name] += values.nbytes
        return values

    def counted_getitem(self, selection):
        counts.zarr_calls[self.path] += 1
        return getitem(self, selection)

    ArrayReader._decode = counted_decode  # type: ignore[method-assign]
    zarr.Array.__getitem__ = counted_getitem  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        ArrayReader._decode = decode  # type: ignore[method-assign]
        zarr.Array.__getitem__ = getitem  # type: ignore[method-assign]


@contextmanager
def count_h5_opens() -> Iterator[list[str]]:
    """Paths of the HDF5 files opened inside the block (this process): every open, high-level
    ``h5py.File`` or low-level, goes through ``h5py.h5f.open``."""
    import h5py

    opened: list[str] = []
    h5f_open = h5py.h5f.open

    def counted_open(name, *args, **kwargs):
        opened.append(os.fsdecode(name))
        return h5f_open(name, *args, **kwargs)

    h5py.h5f.open = counted_open
    try:
        yield opened
    finally:
        h5py.h5f.open = h5f_open
