"""The zarr v3 feature store: writer primitives and the reader API (the schema: ``stage_dist.store.schema``).

Attributes live under the ``stage_dist`` key of the root group (schema version, split, counts,
dims, dtypes, label layout, video ids, sources, converter version and arguments, and
``complete``). Row arrays are sharded (one file per shard, hundreds of MB at real scale) and
chunked inside shards (a chunk is the unit a read decodes). Writers write whole shards, one
writer per shard (zarr rewrites a whole shard on any partial write); finished shards are
recorded in ``_progress/`` so an interrupted conversion resumes, and ``complete`` is set last.

Reading: :meth:`FeatureStore.open` refuses an incomplete store, another schema version or
unexpected dims, and reads the clip and keyframe tables (one chunk each) and nothing else.
Rows are read by :class:`~stage_dist.store.zarr_shards.ArrayReader` straight from the shard files
(the shard index of the zarr v3 ``sharding_indexed`` codec, then the chunk's bytes decoded with
numcodecs): a window costs the decoding of the chunks it touches, not a zarr-python call (~1.5 ms)
per array, and returns
what zarr returns (arrays whose layout it does not know are read through zarr). The per-row tables
(boxes, labels) are kept decoded once touched (one chunk per shard, see the schema), feature
chunks go through a small per-process LRU (windows of a clip share chunks); ``in_memory=True``
holds the arrays a window reads in RAM and ``memmap_dir`` decompresses them once per node into
memory-mapped ``.npy`` files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from stage_dist.core.outputs import empty_directory
from stage_dist.core.paths import ensure_free_space
from stage_dist.store.schema import (  # the layout names are re-exported for the converter and the benches
    ATTRS_KEY,
    CLIP_PTR,
    KEYFRAME_ACTOR_PTR,
    KEYFRAME_CLIP,
    KEYFRAME_OBJECT_PTR,
    KEYFRAME_TIMESTAMP,
    PROGRESS_DIR,
    ROW_TABLES,
    SCHEMA_VERSION,
    WINDOW_ARRAYS,
    Compression,
    StorageConfig,
    StoreError,
    StoreLayout,
    StoreShape,
    row_arrays,
    storage_attrs,
    store_class_ids,
    store_class_names,
)
from stage_dist.store.window import Window, WindowSpec, cut_window
from stage_dist.store.zarr_shards import ArrayReader, ChunkCache, ZarrRows, open_reader

__all__ = [
    "SCHEMA_VERSION", "ArrayReader", "FeatureStore", "StorageConfig", "StoreError", "StoreLayout",
    "StoreShape", "Tables", "create_store", "finish_store", "materialize_npy", "open_arrays",
    "read_attrs", "record_path", "record_shard_done", "shard_done", "storage_attrs",
]

log = logging.getLogger(__name__)

DEFAULT_CACHE_MB = 64


@dataclass
class Tables:
    """The small arrays: clip table and keyframe table (loaded into RAM by readers)."""

    video_ids: list[str]
    clip_ptr: np.ndarray  # (N + 1,) int64
    keyframe_clip: np.ndarray  # (K,) int32
    timestamps: np.ndarray  # (K,) int32
    actor_ptr: np.ndarray  # (K + 1,) int64
    object_ptr: np.ndarray  # (K + 1,) int64

    def arrays(self) -> dict[str, np.ndarray]:
        return {CLIP_PTR: self.clip_ptr, KEYFRAME_CLIP: self.keyframe_clip,
                KEYFRAME_TIMESTAMP: self.timestamps, KEYFRAME_ACTOR_PTR: self.actor_ptr,
                KEYFRAME_OBJECT_PTR: self.object_ptr}


def _compressors(kind: Compression) -> tuple[ZstdCodec, ...] | None:
    return (ZstdCodec(level=1),) if kind == "zstd" else None


# --------------------------------------------------------------------------- writing


def read_attrs(path: Path) -> dict[str, Any] | None:
    """The ``stage_dist`` attributes of the store at ``path``; None if there is no store."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("attributes", {}).get(ATTRS_KEY)
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{meta}: unreadable store metadata: {e}") from None


def create_store(path: Path, layout: StoreLayout, tables: Tables, attrs: dict[str, Any]) -> None:
    """Create the arrays of ``layout`` at ``path`` (replacing anything there) and write the tables.

    An existing directory is emptied, not replaced, so it keeps its permissions and owner (the
    converter first checks, with :mod:`stage_dist.core.outputs`, that what is there is its own).
    The store is marked incomplete until :func:`finish_store`.
    """
    path = Path(path)
    if path.exists():
        empty_directory(path)
    root = zarr.open_group(path, mode="a", zarr_format=3)
    comp = _compressors(layout.storage.compression)
    for name, values in tables.arrays().items():
        arr = root.create_array(name, shape=values.shape, dtype=values.dtype,
                                chunks=(max(1, len(values)),), compressors=comp)
        arr[:] = values
    for group in (layout.actors, layout.objects):
        for spec in group.arrays:
            root.create_array(spec.name, shape=spec.shape, dtype=spec.dtype,
                              chunks=(spec.chunk_rows, *spec.shape[1:]),
                              shards=(spec.shard_rows, *spec.shape[1:]),
                              compressors=comp, fill_value=0)
    root.attrs.update({ATTRS_KEY: {**attrs, "complete": False}})
    (path / PROGRESS_DIR).mkdir()


def open_arrays(path: Path, names: Sequence[str], mode: Literal["r", "r+"] = "r+") -> dict[str, zarr.Array]:
    """Open arrays of a store, for writing unless ``mode`` is "r" (one call per worker process)."""
    root = zarr.open_group(Path(path), mode=mode)
    return {name: _array(root, name) for name in names}


def _array(group: zarr.Group, name: str) -> zarr.Array:
    node = group[name]
    assert isinstance(node, zarr.Array), f"{name}: a group, not an array"  # the schema names arrays only
    return node


def record_path(path: Path, group: str, index: int) -> Path:
    return Path(path) / PROGRESS_DIR / f"{group}-{index:06d}.json"


def record_shard_done(path: Path, group: str, index: int, info: dict[str, Any]) -> None:
    """Atomically record that group shard ``index`` is fully written."""
    target = record_path(path, group, index)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, target)


def shard_done(path: Path, group: str, index: int) -> bool:
    return record_path(path, group, index).is_file()


def update_attrs(path: Path, **changes: Any) -> None:
    """Change some of the ``stage_dist`` attributes of the store at ``path`` (an object: :func:`create_store`)."""
    root = zarr.open_group(Path(path), mode="r+")
    attrs = root.attrs[ATTRS_KEY]
    assert isinstance(attrs, dict), f"{path}: the {ATTRS_KEY} attributes are not an object"
    root.attrs.update({ATTRS_KEY: {**attrs, **changes}})


def finish_store(path: Path) -> None:
    """Mark the store complete (the last write of a conversion) and drop the progress records."""
    update_attrs(path, complete=True)
    shutil.rmtree(Path(path) / PROGRESS_DIR, ignore_errors=True)


# --------------------------------------------------------------------------- direct array reads


def materialize_npy(read: Callable[[int, int], np.ndarray], shape: tuple[int, ...], dtype: np.dtype, target: Path,
                    rows_per_block: int = 1 << 16) -> np.ndarray:
    """An array decompressed once into ``target`` (.npy), opened as a read-only memory map.

    ``read(start, stop)`` returns its rows. The first process on a node writes the file (block
    by block, under an exclusive file lock, to a temporary name renamed when complete); the
    others wait for the lock and map the same file, so every rank and DataLoader worker of the
    node shares one copy through the page cache.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            for stale in target.parent.glob(f"{target.stem}.tmp*"):  # left by a killed writer
                stale.unlink()
            # writing through a memory map past the end of space is a SIGBUS: an OSError (ENOSPC) first
            ensure_free_space(target.parent, math.prod(shape) * dtype.itemsize + (1 << 20), target.name)
            temporary = target.with_suffix(f".tmp{os.getpid()}")
            out = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape)
            for start in range(0, shape[0], rows_per_block):
                stop = min(start + rows_per_block, shape[0])
                out[start:stop] = read(start, stop)
            out.flush()
            del out
            os.replace(temporary, target)
    return np.load(target, mmap_mode="r")


# --------------------------------------------------------------------------- reading


class FeatureStore:
    """Read-only access to a complete store. Picklable: files are reopened lazily per process.

    Opening reads the clip and keyframe tables only. Rows are read straight from the shard
    files by :class:`ArrayReader` (a window is its chunks' decoding plus a few microseconds):

    - the per-row tables (boxes, labels: ~100 bytes an actor, 16 an object) are stored one chunk
      per shard and kept decoded in the process once a read touches them (at most the whole
      tables, ~80 MB at full AVA scale, per process that reads; a DataLoader worker forked
      after its parent touched them shares the parent's pages);
    - feature rows go through a per-process LRU of ``cache_mb`` decoded chunks (0 disables it);
    - ``in_memory=True`` loads the arrays a window reads (:data:`~stage_dist.store.schema.WINDOW_ARRAYS`;
      not ``cls_prob`` or ``spatial``) into RAM when the store is opened: that costs their
      uncompressed bytes in every process that opens or unpickles the store (forked DataLoader
      workers share the opener's pages; spawned processes load their own copy on first read);
    - with ``memmap_dir`` each array a process reads is decompressed once per node into a
      ``.npy`` file there (a local disk or ``/dev/shm``) and memory-mapped: one copy, shared by
      all the node's processes through the page cache (:func:`materialize_npy`).

    Stores converted before the per-row tables got one chunk per shard (they share the features'
    chunks) read the same and start as fast: their tables are decoded chunk by chunk as windows
    touch them. Stores converted before 64 KB feature chunks read 1.3-1.6x slower per window;
    reconverting them is optional.
    """

    def __init__(self, path: Path, attrs: dict[str, Any], tables: Tables, *,
                 in_memory: bool = False, cache_mb: int = DEFAULT_CACHE_MB,
                 memmap_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.attrs = attrs
        counts, dims = attrs["counts"], attrs["dims"]
        self.split: str = attrs["split"]
        self.num_clips: int = counts["num_clips"]
        self.num_keyframes: int = counts["num_keyframes"]
        self.num_actors: int = counts["num_actors"]
        self.num_objects: int = counts["num_objects"]
        self.actor_dim: int = dims["actor_dim"]
        self.object_dim: int = dims["object_dim"]
        self.class_ids: tuple[int, ...] = store_class_ids(attrs)  # class id of each label column
        self.class_names: tuple[str, ...] | None = store_class_names(attrs)
        self.video_ids: list[str] = tables.video_ids
        self.clip_ptr = tables.clip_ptr
        self.clip_lengths = np.diff(tables.clip_ptr)
        self.keyframe_clip = tables.keyframe_clip
        self.timestamps = tables.timestamps
        self.actor_ptr = tables.actor_ptr
        self.object_ptr = tables.object_ptr
        self.in_memory = in_memory
        self.cache_mb = cache_mb
        self.memmap_dir = None if memmap_dir is None else Path(memmap_dir)
        self._pid: int | None = None
        self._readers: dict[str, ArrayReader | ZarrRows] = {}
        self._memmaps: dict[str, np.ndarray] = {}
        self._memory: dict[str, np.ndarray] = {}
        self._row_tables = ChunkCache(None)
        self._cache = ChunkCache(cache_mb * 2**20)
        if in_memory:
            self._load_window_arrays()

    # -- opening

    @classmethod
    def open(cls, path: str | Path, *, expect_actor_dim: int | None = None,
             expect_object_dim: int | None = None, in_memory: bool = False,
             cache_mb: int = DEFAULT_CACHE_MB, memmap_dir: str | Path | None = None) -> "FeatureStore":
        path = Path(path)
        attrs = read_attrs(path)
        if attrs is None:
            raise StoreError(f"{path}: not a stage_dist feature store (no zarr.json with '{ATTRS_KEY}' attributes)")
        version = attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{path}: attribute schema_version is {version}, this code reads {SCHEMA_VERSION}; reconvert the store"
            )
        if not attrs.get("complete"):
            raise StoreError(
                f"{path}: store is incomplete (attribute complete is false: the conversion did not finish); "
                "rerun the converter with the same arguments to resume it"
            )
        for name, expected in (("actor_dim", expect_actor_dim), ("object_dim", expect_object_dim)):
            if expected is not None and attrs["dims"][name] != expected:
                raise StoreError(f"{path}: attribute dims.{name} is {attrs['dims'][name]}, expected {expected}")
        readers: dict[str, ArrayReader | ZarrRows] = {}

        def table(name: str) -> np.ndarray:
            readers[name] = reader = open_reader(path, name)
            return reader.read(0, reader.shape[0]).astype(np.int64)

        try:
            tables = Tables(video_ids=list(attrs["video_ids"]), clip_ptr=table(CLIP_PTR),
                            keyframe_clip=table(KEYFRAME_CLIP), timestamps=table(KEYFRAME_TIMESTAMP),
                            actor_ptr=table(KEYFRAME_ACTOR_PTR), object_ptr=table(KEYFRAME_OBJECT_PTR))
        except KeyError as missing:
            raise StoreError(f"{path}: damaged store, {missing} is missing; reconvert it") from None
        finally:
            for reader in readers.values():
                reader.close()
        return cls(path, attrs, tables, in_memory=in_memory, cache_mb=cache_mb, memmap_dir=memmap_dir)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pid=None, _readers={}, _memory={}, _memmaps={}, _row_tables=ChunkCache(None),
                     _cache=ChunkCache(self.cache_mb * 2**20))
        return state  # in_memory stores reload their rows in the receiving process, on first read

    def _reader(self, name: str) -> ArrayReader | ZarrRows:
        if self._pid != os.getpid():  # a forked process opens its own files (decoded chunks stay valid)
            for reader in self._readers.values():
                reader.close()
            self._readers, self._pid = {}, os.getpid()
        if name not in self._readers:
            try:
                self._readers[name] = open_reader(self.path, name)
            except KeyError:
                raise StoreError(f"{self.path}: store has no array {name!r}") from None
        return self._readers[name]

    def _memmap(self, name: str) -> np.ndarray:
        if name not in self._memmaps:
            reader = self._reader(name)
            block = reader.chunk_rows * max(1, (1 << 16) // reader.chunk_rows)  # whole chunks, decoded once
            self._memmaps[name] = materialize_npy(reader.read, reader.shape, reader.dtype.newbyteorder("="),
                                                  self._memmap_file(name), rows_per_block=block)
        return self._memmaps[name]

    def _memmap_file(self, name: str) -> Path:
        """``MEMMAP_DIR/<store fingerprint>/<array>.npy``: a store converted again gets new files."""
        assert self.memmap_dir is not None
        fingerprint = hashlib.sha1(json.dumps(self.attrs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.memmap_dir / f"{self.path.name}-{fingerprint}" / (name.replace("/", "__") + ".npy")

    def memmap_bytes(self) -> int:
        """Bytes ``memmap_dir`` still needs for this store: the arrays a window reads that are not
        decompressed there yet (0 without ``memmap_dir``)."""
        if self.memmap_dir is None:
            return 0
        present = set(self.row_arrays())
        return sum(self._reader(name).nbytes for name in WINDOW_ARRAYS
                   if name in present and not self._memmap_file(name).exists())

    def _load_window_arrays(self) -> None:
        for name in WINDOW_ARRAYS:
            if name not in self._memory:
                reader = self._reader(name)
                self._memory[name] = reader.read(0, reader.shape[0])

    # -- description

    def row_arrays(self) -> list[str]:
        """Names of the row arrays present (``actors/*``, ``objects/*``)."""
        return row_arrays(self.attrs)

    @property
    def nbytes(self) -> int:
        """Uncompressed bytes of the row arrays."""
        return sum(self._reader(name).nbytes for name in self.row_arrays())

    # -- reading

    def read_array(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of one row array (a new array, the same as zarr reads)."""
        if stop <= start:
            reader = self._reader(name)
            return np.zeros((0, *reader.row_shape), dtype=reader.dtype.newbyteorder("="))
        if self.memmap_dir is not None:
            return np.array(self._memmap(name)[start:stop])
        if self.in_memory and name in WINDOW_ARRAYS:
            if name not in self._memory:  # unpickled in a spawned process
                self._load_window_arrays()
            return self._memory[name][start:stop].copy()
        return self._reader(name).read(start, stop, self._row_tables if name in ROW_TABLES else self._cache)

    def read_keyframes(self, first: int, stop: int) -> Window:
        """Keyframe rows ``first:stop`` (global), which must lie in one clip, as a :class:`Window`."""
        if not 0 <= first < stop <= self.num_keyframes:
            raise IndexError(f"keyframes {first}:{stop} outside 0:{self.num_keyframes} of {self.path}")
        clip = int(self.keyframe_clip[first])
        if stop > self.clip_ptr[clip + 1]:
            raise IndexError(f"keyframes {first}:{stop} cross the end of clip {clip} ({self.video_ids[clip]})")
        return cut_window(clip, self.video_ids[clip], first, stop, timestamps=self.timestamps,
                          actor_ptr=self.actor_ptr, object_ptr=self.object_ptr, read_rows=self.read_array)

    def read_window(self, spec: WindowSpec) -> Window:
        """Keyframes ``spec.start .. spec.start + spec.length - 1`` of clip ``spec.clip``."""
        if not 0 <= spec.clip < self.num_clips:
            raise IndexError(f"clip {spec.clip} outside 0:{self.num_clips} of {self.path}")
        length = int(self.clip_lengths[spec.clip])
        if spec.length < 1 or spec.start < 0 or spec.start + spec.length > length:
            raise IndexError(f"window {tuple(spec)} outside clip {spec.clip} of {length} keyframes")
        first = int(self.clip_ptr[spec.clip]) + spec.start
        return self.read_keyframes(first, first + spec.length)
