"""The zarr v3 feature store: schema, writer primitives and the reader API.

One zarr group per split. Every array's rows are ordered by (clip, timestamp), so a window of
consecutive keyframes of one clip is one contiguous row range in every array::

    clips/ptr              (N + 1,) int64   first keyframe row of each clip
    keyframes/clip         (K,) int32       clip index of each keyframe
    keyframes/timestamp    (K,) int32
    keyframes/actor_ptr    (K + 1,) int64   CSR pointers into actors/*
    keyframes/object_ptr   (K + 1,) int64   CSR pointers into objects/*
    actors/features        (A, C)  float16|float32, mean over t, h, w
    actors/boxes           (A, 4)  float32, normalised x1, y1, x2, y2
    actors/labels          (A, 80) uint8, column j is AVA action id j + 1
    actors/spatial         (A, C, t, h, w) optional (--keep-spatial)
    objects/features       (O, D)
    objects/boxes          (O, 4)  float32
    objects/cls_prob       (O, P)  optional, feature dtype

Attributes live under the ``stage_dist`` key of the root group (schema version, split, counts,
dims, dtypes, label layout, video ids, sources, converter version and arguments, and
``complete``). Row arrays are sharded (one file per shard, hundreds of MB at real scale) and
chunked inside shards (a chunk is the unit a read decodes). Writers write whole shards, one
writer per shard (zarr rewrites a whole shard on any partial write); finished shards are
recorded in ``_progress/`` so an interrupted conversion resumes, and ``complete`` is set last.

Reading: :meth:`FeatureStore.open` refuses an incomplete store, another schema version or
unexpected dims. Small tables are loaded into numpy at open; feature arrays are read with one
contiguous slice per array per window, through a small per-process LRU cache of decoded chunks
(windows of a clip share chunks), from RAM with ``in_memory=True``, or from node-shared
memory maps with ``memmap_dir``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from stage_dist.errors import UserInputError
from stage_dist.sources import NUM_ACTIONS

if TYPE_CHECKING:  # batch imports torch, which the converter does not need
    from stage_dist.batch import Window, WindowSpec

SCHEMA_VERSION = 1
ATTRS_KEY = "stage_dist"
PROGRESS_DIR = "_progress"
LABEL_LAYOUT = "ava80: labels[:, j] is AVA action id j + 1 (no background column)"
DEFAULT_CACHE_MB = 64

Compression = Literal["zstd", "none"]


class StoreError(UserInputError):
    """A store that cannot be used as asked; the message names the path and attribute."""


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class StorageConfig:
    """How rows are laid out on disk (store-affecting converter options)."""

    dtype: Literal["float16", "float32"] = "float16"  # of every feature array
    chunk_kb: float = 256  # target chunk size of a features array (the unit a read decodes)
    shard_mb: float = 256  # target shard (file) size
    min_shards: int = 16  # split smaller groups into at least this many shards (parallelism)
    compression: Compression = "zstd"


@dataclass(frozen=True)
class ArraySpec:
    """One row array: its name, shape, dtype, chunk rows and shard rows."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunk_rows: int
    shard_rows: int


@dataclass(frozen=True)
class RowGroup:
    """Arrays that share a row index (``actors/*`` or ``objects/*``) and a shard grid.

    Every array's shard rows divide ``shard_rows``, so a writer of group rows
    ``[i * shard_rows, (i + 1) * shard_rows)`` owns whole shards of every array.
    """

    name: str
    num_rows: int
    shard_rows: int
    arrays: tuple[ArraySpec, ...]

    def shard_ranges(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.shard_rows, self.num_rows)) for s in range(0, self.num_rows, self.shard_rows)]


@dataclass(frozen=True)
class StoreShape:
    """Counts and per-row dims of a store."""

    num_clips: int
    num_keyframes: int
    num_actors: int
    num_objects: int
    actor_dim: int
    object_dim: int
    spatial_thw: tuple[int, ...] | None = None  # (t, h, w) when the full actor tensor is kept
    cls_prob_dim: int | None = None


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def _row_group(name: str, rows: int, columns: dict[str, tuple[tuple[int, ...], str]],
               cfg: StorageConfig) -> RowGroup:
    """Chunk and shard rows of a group, sized by its ``features`` array.

    Chunk rows: a power of two near ``chunk_kb`` of features. Shard rows: ``shard_mb`` of
    features, but small enough for ``min_shards`` shards, a multiple of the chunk rows.
    Arrays with much wider rows (``spatial``) get smaller power-of-two chunks and shards that
    still divide the group's shard rows.
    """
    row_bytes = {k: math.prod(shape) * np.dtype(dt).itemsize for k, (shape, dt) in columns.items()}
    chunk = _pow2_floor(cfg.chunk_kb * 1024 / row_bytes["features"])
    by_size = max(chunk, int(cfg.shard_mb * 2**20 // row_bytes["features"]) // chunk * chunk)
    by_count = max(chunk, math.ceil(math.ceil(rows / cfg.min_shards) / chunk) * chunk)
    shard = min(by_size, by_count)
    arrays = []
    for key, (shape, dtype) in columns.items():
        a_chunk, a_shard = chunk, shard
        if row_bytes[key] > row_bytes["features"]:
            a_chunk = min(chunk, _pow2_floor(cfg.chunk_kb * 1024 / row_bytes[key]))
            a_shard = min(chunk, max(a_chunk, _pow2_floor(cfg.shard_mb * 2**20 / row_bytes[key])))
        arrays.append(ArraySpec(f"{name}/{key}", (rows, *shape), dtype, a_chunk, a_shard))
    return RowGroup(name, rows, shard, tuple(arrays))


@dataclass(frozen=True)
class StoreLayout:
    """Every array of a store with its chunking: the plan a converter writes."""

    shape: StoreShape
    storage: StorageConfig
    actors: RowGroup
    objects: RowGroup

    @classmethod
    def build(cls, shape: StoreShape, storage: StorageConfig) -> "StoreLayout":
        f = storage.dtype
        actor_cols: dict[str, tuple[tuple[int, ...], str]] = {
            "features": ((shape.actor_dim,), f), "boxes": ((4,), "float32"), "labels": ((NUM_ACTIONS,), "uint8"),
        }
        if shape.spatial_thw is not None:
            actor_cols["spatial"] = ((shape.actor_dim, *shape.spatial_thw), f)
        object_cols: dict[str, tuple[tuple[int, ...], str]] = {
            "features": ((shape.object_dim,), f), "boxes": ((4,), "float32"),
        }
        if shape.cls_prob_dim is not None:
            object_cols["cls_prob"] = ((shape.cls_prob_dim,), f)
        return cls(shape, storage, _row_group("actors", shape.num_actors, actor_cols, storage),
                   _row_group("objects", shape.num_objects, object_cols, storage))

    def group(self, name: str) -> RowGroup:
        return {"actors": self.actors, "objects": self.objects}[name]


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
        return {"clips/ptr": self.clip_ptr, "keyframes/clip": self.keyframe_clip,
                "keyframes/timestamp": self.timestamps, "keyframes/actor_ptr": self.actor_ptr,
                "keyframes/object_ptr": self.object_ptr}


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

    The store is marked incomplete until :func:`finish_store`.
    """
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    root = zarr.open_group(path, mode="w", zarr_format=3)
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


def open_arrays(path: Path, names: list[str]) -> dict[str, zarr.Array]:
    """Open arrays of a store for writing (one call per worker process)."""
    root = zarr.open_group(Path(path), mode="r+")
    return {name: root[name] for name in names}


def _record_path(path: Path, group: str, index: int) -> Path:
    return Path(path) / PROGRESS_DIR / f"{group}-{index:06d}.json"


def record_shard_done(path: Path, group: str, index: int, info: dict[str, Any]) -> None:
    """Atomically record that group shard ``index`` is fully written."""
    target = _record_path(path, group, index)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, target)


def shard_done(path: Path, group: str, index: int) -> bool:
    return _record_path(path, group, index).is_file()


def finish_store(path: Path) -> None:
    """Mark the store complete (the last write of a conversion) and drop the progress records."""
    root = zarr.open_group(Path(path), mode="r+")
    attrs = dict(root.attrs[ATTRS_KEY])
    attrs["complete"] = True
    root.attrs.update({ATTRS_KEY: attrs})
    shutil.rmtree(Path(path) / PROGRESS_DIR, ignore_errors=True)


# --------------------------------------------------------------------------- reading


class _ChunkCache:
    """LRU of decoded chunks, keyed by (array, chunk index), bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def read(self, name: str, array: zarr.Array, start: int, stop: int) -> np.ndarray:
        rows = array.chunks[0]
        first, last = start // rows, (stop - 1) // rows
        keys = [(name, c) for c in range(first, last + 1)]
        if all(k in self._chunks for k in keys):
            for k in keys:
                self._chunks.move_to_end(k)
            parts = [self._chunks[k] for k in keys]
        else:  # one slice read of the whole chunk range; the decode cost is the same
            block = array[first * rows: min((last + 1) * rows, array.shape[0])]
            parts = [block[i * rows: (i + 1) * rows] for i in range(last - first + 1)]
            for k, part in zip(keys, parts):
                self._put(k, part)
        offset = first * rows
        return np.concatenate(parts)[start - offset: stop - offset]

    def _put(self, key: tuple[str, int], chunk: np.ndarray) -> None:
        if key in self._chunks:
            return
        self._chunks[key] = chunk
        self.bytes += chunk.nbytes
        while self.bytes > self.max_bytes and self._chunks:
            _, old = self._chunks.popitem(last=False)
            self.bytes -= old.nbytes


def materialize_npy(array: zarr.Array, target: Path, rows_per_block: int = 1 << 16) -> np.ndarray:
    """The zarr array decompressed once into ``target`` (.npy), opened as a read-only memory map.

    The first process on a node writes it (block by block, under an exclusive file lock, to a
    temporary name renamed when complete); the others wait for the lock and map the same file,
    so every rank and DataLoader worker of the node shares one copy through the page cache.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            for stale in target.parent.glob(f"{target.stem}.tmp*"):  # left by a killed writer
                stale.unlink()
            needed = array.nbytes + (1 << 20)
            free = shutil.disk_usage(target.parent).free
            if free < needed:  # writing through a memory map past the end of space is a SIGBUS
                raise StoreError(f"{target.parent}: {needed / 1e9:.1f} GB needed for {target.name}, "
                                 f"{free / 1e9:.1f} GB free")
            temporary = target.with_suffix(f".tmp{os.getpid()}")
            out = np.lib.format.open_memmap(temporary, mode="w+", dtype=array.dtype, shape=array.shape)
            for start in range(0, array.shape[0], rows_per_block):
                out[start : start + rows_per_block] = array[start : start + rows_per_block]
            out.flush()
            del out
            os.replace(temporary, target)
    return np.load(target, mmap_mode="r")


RESIDENT_ARRAYS = frozenset({"actors/boxes", "actors/labels", "objects/boxes"})


class FeatureStore:
    """Read-only access to a complete store. Picklable: zarr is reopened lazily per process.

    Small tables are numpy arrays loaded at open; boxes and labels (about 100 bytes an actor)
    are loaded into RAM on first use, since a zarr call costs ~1.5 ms however few rows it
    reads, so a window read is two zarr calls (actor and object features). Feature rows come
    from zarr through a
    per-process cache of ``cache_mb`` decoded chunks (0 disables it), or, with
    ``in_memory=True``, from RAM: that costs the store's uncompressed row arrays
    (:attr:`nbytes`) in EVERY process that reads (each DataLoader worker, each rank). With
    ``memmap_dir`` the row arrays are decompressed once per node into ``.npy`` files there
    (a local disk or ``/dev/shm``) and memory-mapped: one copy, shared by all the node's
    processes through the page cache (:func:`materialize_npy`).
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
        self._memmaps: dict[str, np.ndarray] = {}
        self._pid: int | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._memory: dict[str, np.ndarray] = {}
        self._cache = _ChunkCache(cache_mb * 2**20)
        if in_memory:
            self._load("actors/features")

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
        try:
            root = zarr.open_group(path, mode="r")
            tables = Tables(
                video_ids=list(attrs["video_ids"]),
                clip_ptr=root["clips/ptr"][:].astype(np.int64),
                keyframe_clip=root["keyframes/clip"][:].astype(np.int64),
                timestamps=root["keyframes/timestamp"][:].astype(np.int64),
                actor_ptr=root["keyframes/actor_ptr"][:].astype(np.int64),
                object_ptr=root["keyframes/object_ptr"][:].astype(np.int64),
            )
            return cls(path, attrs, tables, in_memory=in_memory, cache_mb=cache_mb, memmap_dir=memmap_dir)
        except KeyError as missing:
            raise StoreError(f"{path}: damaged store, {missing} is missing; reconvert it") from None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pid=None, _arrays={}, _memory={}, _memmaps={}, _cache=_ChunkCache(self.cache_mb * 2**20))
        return state  # in_memory stores reload their rows in the receiving process, on first read

    def _array(self, name: str) -> zarr.Array:
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
            self._cache = _ChunkCache(self.cache_mb * 2**20)
        if name not in self._arrays:
            try:
                self._arrays[name] = zarr.open_group(self.path, mode="r")[name]
            except KeyError:
                raise StoreError(f"{self.path}: store has no array {name!r}") from None
        return self._arrays[name]

    def _memmap(self, name: str) -> np.ndarray:
        if name not in self._memmaps:
            self._memmaps[name] = materialize_npy(self._array(name), self._memmap_file(name))
        return self._memmaps[name]

    def _memmap_file(self, name: str) -> Path:
        """``MEMMAP_DIR/<store fingerprint>/<array>.npy``: a store converted again gets new files."""
        fingerprint = hashlib.sha1(json.dumps(self.attrs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.memmap_dir / f"{self.path.name}-{fingerprint}" / (name.replace("/", "__") + ".npy")

    def _load(self, name: str) -> None:
        if self.in_memory:
            for row_array in self.row_arrays():
                self._memory[row_array] = self._array(row_array)[:]
        else:
            self._memory[name] = self._array(name)[:]

    # -- description

    def row_arrays(self) -> list[str]:
        """Names of the row arrays present (``actors/*``, ``objects/*``)."""
        names = ["actors/features", "actors/boxes", "actors/labels", "objects/features", "objects/boxes"]
        if self.attrs["dims"].get("spatial_thw"):
            names.append("actors/spatial")
        if self.attrs["dims"].get("cls_prob_dim"):
            names.append("objects/cls_prob")
        return names

    @property
    def nbytes(self) -> int:
        """Uncompressed bytes of the row arrays (the RAM ``in_memory=True`` takes per process)."""
        total = 0
        for name in self.row_arrays():
            arr = self._array(name)
            total += math.prod(arr.shape) * arr.dtype.itemsize
        return total

    # -- reading

    def read_array(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of one row array (one contiguous read, or a cache hit)."""
        if stop <= start:
            arr = self._memory.get(name)
            arr = arr if arr is not None else self._array(name)
            return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        if self.memmap_dir is not None:
            return np.array(self._memmap(name)[start:stop])
        if self.in_memory or name in RESIDENT_ARRAYS:
            if name not in self._memory:
                self._load(name)
            return self._memory[name][start:stop].copy()
        arr = self._array(name)
        if self.cache_mb > 0:
            return self._cache.read(name, arr, start, stop)
        return arr[start:stop]

    def read_keyframes(self, first: int, stop: int) -> Window:
        """Keyframe rows ``first:stop`` (global), which must lie in one clip, as a :class:`Window`."""
        from stage_dist.batch import Window  # deferred: torch is imported by readers, not the converter

        if not 0 <= first < stop <= self.num_keyframes:
            raise IndexError(f"keyframes {first}:{stop} outside 0:{self.num_keyframes} of {self.path}")
        clip = int(self.keyframe_clip[first])
        if stop > self.clip_ptr[clip + 1]:
            raise IndexError(f"keyframes {first}:{stop} cross the end of clip {clip} ({self.video_ids[clip]})")
        a0, a1 = int(self.actor_ptr[first]), int(self.actor_ptr[stop])
        o0, o1 = int(self.object_ptr[first]), int(self.object_ptr[stop])
        return Window(
            clip=clip,
            video_id=self.video_ids[clip],
            keyframe_start=first,
            actor_start=a0,
            timestamps=self.timestamps[first:stop].copy(),
            actor_ptr=self.actor_ptr[first: stop + 1] - a0,
            actor_features=self.read_array("actors/features", a0, a1),
            actor_boxes=self.read_array("actors/boxes", a0, a1),
            actor_labels=self.read_array("actors/labels", a0, a1),
            object_ptr=self.object_ptr[first: stop + 1] - o0,
            object_features=self.read_array("objects/features", o0, o1),
            object_boxes=self.read_array("objects/boxes", o0, o1),
        )

    def read_window(self, spec: WindowSpec) -> Window:
        """Keyframes ``spec.start .. spec.start + spec.length - 1`` of clip ``spec.clip``."""
        if not 0 <= spec.clip < self.num_clips:
            raise IndexError(f"clip {spec.clip} outside 0:{self.num_clips} of {self.path}")
        length = int(self.clip_lengths[spec.clip])
        if spec.length < 1 or spec.start < 0 or spec.start + spec.length > length:
            raise IndexError(f"window {tuple(spec)} outside clip {spec.clip} of {length} keyframes")
        first = int(self.clip_ptr[spec.clip]) + spec.start
        return self.read_keyframes(first, first + spec.length)

    def actor_boxes_all(self) -> np.ndarray:
        """All actor boxes (A, 4) float32, for inference bookkeeping."""
        return self.read_array("actors/boxes", 0, self.num_actors)

    def describe(self) -> str:
        return (f"{self.path} split={self.split} clips={self.num_clips} keyframes={self.num_keyframes} "
                f"actors={self.num_actors} objects={self.num_objects} actor_dim={self.actor_dim} "
                f"object_dim={self.object_dim} dtype={self.attrs['dtypes']['features']}")


def storage_attrs(layout: StoreLayout) -> dict[str, Any]:
    """The schema part of a store's attributes (counts, dims, dtypes, label layout)."""
    s = layout.shape
    return {
        "schema_version": SCHEMA_VERSION,
        "counts": {"num_clips": s.num_clips, "num_keyframes": s.num_keyframes,
                   "num_actors": s.num_actors, "num_objects": s.num_objects},
        "dims": {"actor_dim": s.actor_dim, "object_dim": s.object_dim,
                 "spatial_thw": list(s.spatial_thw) if s.spatial_thw else None,
                 "cls_prob_dim": s.cls_prob_dim},
        "dtypes": {"features": layout.storage.dtype, "boxes": "float32", "labels": "uint8"},
        "label_layout": LABEL_LAYOUT,
        "storage": asdict(layout.storage),
    }
