"""The feature store's schema: array names, dtypes, the chunk and shard rules, the attributes.

Torch- and zarr-free, so the converter, its workers and the readers share it at no import cost.
One zarr v3 group per split; every array's rows are ordered by (clip, timestamp), so a window of
consecutive keyframes of one clip is one contiguous row range in every array::

    clips/ptr              (N + 1,) int64   first keyframe row of each clip
    keyframes/clip         (K,) int32       clip index of each keyframe
    keyframes/timestamp    (K,) int32
    keyframes/actor_ptr    (K + 1,) int64   CSR pointers into actors/*
    keyframes/object_ptr   (K + 1,) int64   CSR pointers into objects/*
    actors/features        (A, C)  float16|float32, mean over t, h, w
    actors/boxes           (A, 4)  float32, normalised x1, y1, x2, y2
    actors/labels          (A, K) uint8, column j is class id class_ids[j] (AVA: K = 80, id j + 1)
    actors/spatial         (A, C, t, h, w) optional (--keep-spatial)
    objects/features       (O, D)
    objects/boxes          (O, 4)  float32
    objects/cls_prob       (O, P)  optional, feature dtype

Chunking (the unit a read decodes) and sharding (the unit of a file and of a converter write):

- the tables (``clips/*``, ``keyframes/*``) are one chunk each;
- ``*/features``: chunks of about ``chunk_kb``, shards of about ``shard_mb``, at least
  ``min_shards`` shards per group (parallel conversion); ``objects/cls_prob`` shares the object
  features' chunk and shard rows;
- the per-row tables ``actors/boxes``, ``actors/labels``, ``objects/boxes`` (:data:`ROW_TABLES`,
  about 100 bytes an actor and 16 an object) are ONE chunk per shard of their group, so a
  reader holds them in a handful of chunks whatever the dataset size (stores written before
  this rule split them into the features' chunks: they read the same, see ``stage_dist.store.feature_store``);
- ``actors/spatial``: smaller power-of-two chunks and shards that divide the group's shard.

Every array's shard rows divide its group's shard rows, so one converter writer owns whole
shards of every array.

The class set (:func:`store_class_ids`, :func:`store_class_names`): the attribute ``class_ids``
lists the class id of each label column, in column order, and ``class_names`` their names (null
unless the converter was given a label map). A store without ``class_ids`` (converted before it
existed) is AVA's: 80 columns, column j is action id j + 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from stage_dist.core.config import ConfigError, option
from stage_dist.core.errors import UserInputError


class StoreError(UserInputError):
    """A store that cannot be used as asked; the message names the path and attribute."""


SCHEMA_VERSION = 1
ATTRS_KEY = "stage_dist"  # the root group's attribute holding the store's description
PROGRESS_DIR = "_progress"  # finished-shard records of a conversion in progress
NUM_ACTIONS = 80  # AVA action ids 1..80; labels column j is action id j + 1
LABEL_LAYOUT = "ava80: labels[:, j] is AVA action id j + 1 (no background column)"
CUSTOM_LABEL_LAYOUT = "class_ids: labels[:, j] is class id class_ids[j] (no background column)"
AVA_CLASS_IDS: tuple[int, ...] = tuple(range(1, NUM_ACTIONS + 1))  # the class set of a store without class_ids
BOX_DTYPE = "float32"
LABEL_DTYPE = "uint8"
CLIP_PTR = "clips/ptr"
KEYFRAME_CLIP = "keyframes/clip"
KEYFRAME_TIMESTAMP = "keyframes/timestamp"
KEYFRAME_ACTOR_PTR = "keyframes/actor_ptr"
KEYFRAME_OBJECT_PTR = "keyframes/object_ptr"
TABLE_DTYPES = {CLIP_PTR: "int64", KEYFRAME_CLIP: "int32", KEYFRAME_TIMESTAMP: "int32",
                KEYFRAME_ACTOR_PTR: "int64", KEYFRAME_OBJECT_PTR: "int64"}

ACTOR_FEATURES = "actors/features"
ACTOR_BOXES = "actors/boxes"
ACTOR_LABELS = "actors/labels"
ACTOR_SPATIAL = "actors/spatial"
OBJECT_FEATURES = "objects/features"
OBJECT_BOXES = "objects/boxes"
OBJECT_CLS_PROB = "objects/cls_prob"

# What a training or inference window reads (``--in-memory`` loads these and nothing else).
WINDOW_ARRAYS = (ACTOR_FEATURES, ACTOR_BOXES, ACTOR_LABELS, OBJECT_FEATURES, OBJECT_BOXES)
# Narrow per-row arrays stored one chunk per shard and kept decoded by a reader once touched.
ROW_TABLES = frozenset({ACTOR_BOXES, ACTOR_LABELS, OBJECT_BOXES})

# 64 KB: a 6-keyframe window at real dims (3 actors x 1024, 10-20 objects x 2048, float16)
# decodes 1.2-1.4x the bytes it needs, against 2-2.8x with 256 KB; 16 KB chunks cost more per
# chunk than they save (data-only reads: 64 KB is 1.3-1.6x faster than 256 KB and than 16 KB)
DEFAULT_CHUNK_KB = 64
DEFAULT_SHARD_MB = 256
DEFAULT_TAR_SHARD_MB = 256  # target size of one WebDataset tar shard
DEFAULT_MIN_SHARDS = 16

Compression = Literal["zstd", "none"]


@dataclass(frozen=True)
class StorageConfig:
    """How rows are laid out on disk (store-affecting converter options)."""

    dtype: Literal["float16", "float32"] = option("float16", help="feature dtype on disk")
    chunk_kb: float = option(DEFAULT_CHUNK_KB, help="target chunk size of the feature arrays in KB (the unit one "
                                                    "read decodes)")
    shard_mb: float = option(DEFAULT_SHARD_MB, help="target shard file size in MB")
    min_shards: int = option(DEFAULT_MIN_SHARDS, help="split each row group into at least this many shards when it "
                                                      "is small (parallelism)")
    compression: Compression = option("zstd", help="chunk compression")

    def __post_init__(self) -> None:
        if not (self.chunk_kb > 0 and self.shard_mb > 0 and self.min_shards >= 1):
            raise ConfigError(f"--chunk-kb and --shard-mb must be > 0 and --min-shards >= 1, got {self.chunk_kb}, "
                              f"{self.shard_mb}, {self.min_shards}")


@dataclass(frozen=True)
class ArraySpec:
    """One row array: its name, shape, dtype, chunk rows and shard rows."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunk_rows: int
    shard_rows: int


GroupName = Literal["actors", "objects"]


@dataclass(frozen=True)
class RowGroup:
    """Arrays that share a row index (``actors/*`` or ``objects/*``) and a shard grid.

    Every array's shard rows divide ``shard_rows``, so a writer of group rows
    ``[i * shard_rows, (i + 1) * shard_rows)`` owns whole shards of every array.
    """

    name: GroupName
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
    class_ids: tuple[int, ...] = AVA_CLASS_IDS  # the class id of each label column
    class_names: tuple[str, ...] | None = None  # their names, when a label map gave them


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def _row_group(name: GroupName, rows: int, columns: dict[str, tuple[tuple[int, ...], str]],
               cfg: StorageConfig) -> RowGroup:
    """Chunk and shard rows of a group, sized by its ``features`` array.

    Chunk rows: a power of two near ``chunk_kb`` of features. Shard rows: ``shard_mb`` of
    features, but small enough for ``min_shards`` shards, a multiple of the chunk rows.
    Per-row tables (:data:`ROW_TABLES`) are one chunk per group shard. Arrays with much wider
    rows (``spatial``) get smaller power-of-two chunks and shards that still divide the group's
    shard rows.
    """
    row_bytes = {k: math.prod(shape) * np.dtype(dt).itemsize for k, (shape, dt) in columns.items()}
    chunk = _pow2_floor(cfg.chunk_kb * 1024 / row_bytes["features"])
    by_size = max(chunk, int(cfg.shard_mb * 2**20 // row_bytes["features"]) // chunk * chunk)
    by_count = max(chunk, math.ceil(math.ceil(rows / cfg.min_shards) / chunk) * chunk)
    shard = min(by_size, by_count)
    arrays = []
    for key, (shape, dtype) in columns.items():
        a_chunk, a_shard = chunk, shard
        if f"{name}/{key}" in ROW_TABLES:
            a_chunk = shard
        elif row_bytes[key] > row_bytes["features"]:
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
            "features": ((shape.actor_dim,), f), "boxes": ((4,), BOX_DTYPE),
            "labels": ((len(shape.class_ids),), LABEL_DTYPE),
        }
        if shape.spatial_thw is not None:
            actor_cols["spatial"] = ((shape.actor_dim, *shape.spatial_thw), f)
        object_cols: dict[str, tuple[tuple[int, ...], str]] = {
            "features": ((shape.object_dim,), f), "boxes": ((4,), BOX_DTYPE),
        }
        if shape.cls_prob_dim is not None:
            object_cols["cls_prob"] = ((shape.cls_prob_dim,), f)
        return cls(shape, storage, _row_group("actors", shape.num_actors, actor_cols, storage),
                   _row_group("objects", shape.num_objects, object_cols, storage))

    def group(self, name: str) -> RowGroup:
        return {"actors": self.actors, "objects": self.objects}[name]


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
        "dtypes": {"features": layout.storage.dtype, "boxes": BOX_DTYPE, "labels": LABEL_DTYPE},
        "label_layout": LABEL_LAYOUT if s.class_ids == AVA_CLASS_IDS else CUSTOM_LABEL_LAYOUT,
        "class_ids": list(s.class_ids),
        "class_names": list(s.class_names) if s.class_names is not None else None,
        "storage": asdict(layout.storage),
    }


def store_class_ids(attrs: dict[str, Any]) -> tuple[int, ...]:
    """The class id of each label column of a store with ``attrs`` (AVA's 1..80 when it records none)."""
    ids = attrs.get("class_ids")
    return AVA_CLASS_IDS if ids is None else tuple(int(i) for i in ids)


def store_class_names(attrs: dict[str, Any]) -> tuple[str, ...] | None:
    """The names of the store's classes, in column order, if its converter was given a label map."""
    names = attrs.get("class_names")
    return None if names is None else tuple(str(n) for n in names)


def describe_classes(class_ids: tuple[int, ...] | list[int]) -> str:
    """A class set in a few words, for messages: ``80 classes (ids 1..80)``, ``5 classes (ids 1001, 1002, ...)``."""
    ids = list(class_ids)
    if len(ids) > 2 and ids == list(range(ids[0], ids[0] + len(ids))):
        shown = f"{ids[0]}..{ids[-1]}"
    else:
        shown = ", ".join(map(str, ids[:6])) + (", ..." if len(ids) > 6 else "")
    return f"{len(ids)} classes (ids {shown})"


def row_arrays(attrs: dict[str, Any]) -> list[str]:
    """Names of the row arrays (``actors/*``, ``objects/*``) a store with ``attrs`` holds."""
    names = list(WINDOW_ARRAYS)
    if attrs["dims"].get("spatial_thw"):
        names.append(ACTOR_SPATIAL)
    if attrs["dims"].get("cls_prob_dim"):
        names.append(OBJECT_CLS_PROB)
    return names
