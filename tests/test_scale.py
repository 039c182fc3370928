"""A store with full AVA v2.2 train counts and tiny dims: start-up costs do not grow with the data.

235 clips x 897 keyframes = 210,795 keyframes, 476,000 actors, 2,100,000 objects, written
directly with the store's writer primitives (no h5). Feature chunks hold 64 rows as at real
dims. Costs are counted (chunks decoded, zarr calls: ``tests/counting.py``), not timed. Only
the first shard of each features array is written: the rest reads as the fill value (zero) and
is decoded like any other chunk, so the counts are those of a fully written store.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from stage_dist.store.feature_store import (
    FeatureStore,
    StorageConfig,
    StoreLayout,
    StoreShape,
    Tables,
    create_store,
    finish_store,
    open_arrays,
    storage_attrs,
)
from stage_dist.store.schema import (
    ACTOR_BOXES,
    ACTOR_FEATURES,
    ACTOR_LABELS,
    NUM_ACTIONS,
    OBJECT_BOXES,
    OBJECT_CLS_PROB,
    OBJECT_FEATURES,
    ROW_TABLES,
    TABLE_DTYPES,
    WINDOW_ARRAYS,
)
from stage_dist.store.window import WindowSpec
from tests.counting import count_reads

CLIPS, KEYFRAMES_PER_CLIP = 235, 897
NUM_KEYFRAMES = CLIPS * KEYFRAMES_PER_CLIP  # 210,795
NUM_ACTORS, NUM_OBJECTS = 476_000, 2_100_000
DIM = 4  # float16: 8 bytes a row, so chunk_kb=0.5 gives the 64-row feature chunks of real dims


@dataclass
class ScaleStore:
    path: Path
    layout: StoreLayout
    tables: Tables
    actor_boxes: np.ndarray
    actor_labels: np.ndarray
    object_boxes: np.ndarray


def _ptr(rng: np.random.Generator, rows: int) -> np.ndarray:
    counts = np.bincount(rng.integers(0, NUM_KEYFRAMES, rows), minlength=NUM_KEYFRAMES)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


@pytest.fixture(scope="module")
def scale_store(tmp_path_factory) -> ScaleStore:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("scale") / "train.zarr"
    tables = Tables(
        video_ids=[f"clip{c:07d}" for c in range(CLIPS)],
        clip_ptr=np.arange(CLIPS + 1, dtype=np.int64) * KEYFRAMES_PER_CLIP,
        keyframe_clip=np.repeat(np.arange(CLIPS, dtype=np.int32), KEYFRAMES_PER_CLIP),
        timestamps=np.tile(np.arange(902, 902 + KEYFRAMES_PER_CLIP, dtype=np.int32), CLIPS),
        actor_ptr=_ptr(rng, NUM_ACTORS),
        object_ptr=_ptr(rng, NUM_OBJECTS),
    )
    shape = StoreShape(CLIPS, NUM_KEYFRAMES, NUM_ACTORS, NUM_OBJECTS, DIM, DIM, cls_prob_dim=3)
    layout = StoreLayout.build(shape, StorageConfig(chunk_kb=0.5))
    create_store(path, layout, tables, {**storage_attrs(layout), "split": "train", "video_ids": tables.video_ids})
    arrays = open_arrays(path, [ACTOR_FEATURES, ACTOR_BOXES, ACTOR_LABELS, OBJECT_FEATURES, OBJECT_BOXES])
    actor_boxes = rng.random((NUM_ACTORS, 4), dtype=np.float32)
    actor_labels = (rng.random((NUM_ACTORS, NUM_ACTIONS)) < 0.02).astype(np.uint8)
    object_boxes = rng.random((NUM_OBJECTS, 4), dtype=np.float32)
    arrays[ACTOR_BOXES][:] = actor_boxes
    arrays[ACTOR_LABELS][:] = actor_labels
    arrays[OBJECT_BOXES][:] = object_boxes
    for name, group in ((ACTOR_FEATURES, layout.actors), (OBJECT_FEATURES, layout.objects)):
        rows = group.shard_rows
        arrays[name][:rows] = np.arange(rows * DIM, dtype=np.float16).reshape(rows, DIM)
    finish_store(path)
    return ScaleStore(path, layout, tables, actor_boxes, actor_labels, object_boxes)


def _chunks_touched(chunk_rows: int, start: int, stop: int) -> int:
    return 0 if stop <= start else (stop - 1) // chunk_rows - start // chunk_rows + 1


def _window_rows(store: FeatureStore, spec: WindowSpec) -> dict[str, tuple[int, int]]:
    first = int(store.clip_ptr[spec.clip]) + spec.start
    actors = int(store.actor_ptr[first]), int(store.actor_ptr[first + spec.length])
    objects = int(store.object_ptr[first]), int(store.object_ptr[first + spec.length])
    return {name: actors if name.startswith("actors/") else objects for name in WINDOW_ARRAYS}


def test_layout_keeps_row_tables_in_a_few_chunks(scale_store):
    layout = scale_store.layout
    assert layout.objects.arrays[0].chunk_rows == 64 and layout.actors.arrays[0].chunk_rows == 64
    for group in (layout.actors, layout.objects):
        assert len(group.shard_ranges()) == 16
        for spec in group.arrays:
            if spec.name in ROW_TABLES:
                assert spec.chunk_rows == spec.shard_rows == group.shard_rows
    root = zarr.open_group(scale_store.path, mode="r")  # what zarr itself sees on disk
    assert math.ceil(NUM_OBJECTS / root[OBJECT_BOXES].chunks[0]) == 16
    assert math.ceil(NUM_OBJECTS / root[OBJECT_FEATURES].chunks[0]) == math.ceil(NUM_OBJECTS / 64)


def test_open_and_first_window_read_a_constant_number_of_chunks(scale_store):
    spec = WindowSpec(clip=117, start=400, length=6)
    with count_reads() as counts:
        store = FeatureStore.open(scale_store.path)
        window = store.read_window(spec)
    assert not counts.zarr_calls
    assert {name: counts.chunks[name] for name in TABLE_DTYPES} == dict.fromkeys(TABLE_DTYPES, 1)
    chunk_rows = {s.name: s.chunk_rows for g in (scale_store.layout.actors, scale_store.layout.objects)
                  for s in g.arrays}
    for name, (start, stop) in _window_rows(store, spec).items():
        assert counts.chunks[name] == _chunks_touched(chunk_rows[name], start, stop) <= 2, name
    assert counts.total_chunks <= len(TABLE_DTYPES) + 2 * len(WINDOW_ARRAYS)
    a0, a1 = _window_rows(store, spec)[ACTOR_BOXES]
    o0, o1 = _window_rows(store, spec)[OBJECT_BOXES]
    np.testing.assert_array_equal(window.actor_boxes, scale_store.actor_boxes[a0:a1])
    np.testing.assert_array_equal(window.actor_labels, scale_store.actor_labels[a0:a1])
    np.testing.assert_array_equal(window.object_boxes, scale_store.object_boxes[o0:o1])

    with count_reads() as counts:  # a DataLoader worker: the store arrives pickled, tables included
        worker = pickle.loads(pickle.dumps(store))
        worker.read_window(WindowSpec(clip=3, start=0, length=6))
        worker.read_window(WindowSpec(clip=200, start=890, length=7))
    assert counts.total_chunks <= 2 * 2 * len(WINDOW_ARRAYS) and not counts.zarr_calls


def test_whole_row_tables_read_in_one_chunk_per_shard(scale_store):
    store = FeatureStore.open(scale_store.path)
    with count_reads() as counts:
        boxes = store.read_array(ACTOR_BOXES, 0, store.num_actors)
        objects = store.read_array(OBJECT_BOXES, 0, NUM_OBJECTS)
    assert dict(counts.chunks) == {ACTOR_BOXES: 16, OBJECT_BOXES: 16}
    np.testing.assert_array_equal(boxes, scale_store.actor_boxes)
    np.testing.assert_array_equal(objects, scale_store.object_boxes)


def test_in_memory_loads_only_what_windows_read(scale_store):
    with count_reads() as counts:
        store = FeatureStore.open(scale_store.path, in_memory=True)
    assert OBJECT_CLS_PROB in store.row_arrays() and counts.chunks[OBJECT_CLS_PROB] == 0
    chunk_rows = {s.name: s.chunk_rows for g in (scale_store.layout.actors, scale_store.layout.objects)
                  for s in g.arrays}
    for name in WINDOW_ARRAYS:  # each chunk once
        rows = NUM_ACTORS if name.startswith("actors/") else NUM_OBJECTS
        assert counts.chunks[name] == math.ceil(rows / chunk_rows[name]), name
    with count_reads() as counts:
        store.read_window(WindowSpec(5, 10, 6))
    assert counts.total_chunks == 0


def test_memmap_dir_decompresses_once_per_node(scale_store, tmp_path):
    with count_reads() as counts:
        first = FeatureStore.open(scale_store.path, memmap_dir=tmp_path)
        first.read_window(WindowSpec(0, 0, 6))
    assert counts.chunks[OBJECT_BOXES] == 16 and counts.chunks[OBJECT_CLS_PROB] == 0
    with count_reads() as counts:  # another rank or worker of the node: maps the same files
        other = FeatureStore.open(scale_store.path, memmap_dir=tmp_path)
        window = other.read_window(WindowSpec(100, 3, 6))
    assert set(counts.chunks) == set(TABLE_DTYPES)
    o0, o1 = _window_rows(other, WindowSpec(100, 3, 6))[OBJECT_BOXES]
    np.testing.assert_array_equal(window.object_boxes, scale_store.object_boxes[o0:o1])
