"""The store's layout rules and the reader API on a real converted store."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr

from stage_dist.batch import WindowSpec, collate
from stage_dist.convert import main
from stage_dist.store import (
    SCHEMA_VERSION,
    FeatureStore,
    StorageConfig,
    StoreError,
    StoreLayout,
    StoreShape,
)
from stage_dist.synth import SynthConfig, synthesize


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    config = SynthConfig(seed=1, train_clips=3, val_clips=1, keyframes_per_clip=10, actor_dim=16,
                         object_dim=32, actor_thw=(1, 2, 2))
    paths = synthesize(root / "synth", config).splits["train"]
    out = root / "train.zarr"
    assert main(["--actors-dir", str(paths.actors_dir), "--objects-file", str(paths.objects_file),
                 "--out", str(out), "--chunk-kb", "0.1", "--min-shards", "4", "--workers", "1",
                 "--no-progress"]) == 0
    return out


def copy_store(path: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy.zarr"
    shutil.copytree(path, dst)
    return dst


def edit_attrs(path: Path, **changes) -> None:
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["stage_dist"].update(changes)
    meta_path.write_text(json.dumps(meta))


def test_layout_shards_divide_and_fit():
    shape = StoreShape(num_clips=2, num_keyframes=100, num_actors=10_000, num_objects=3_000,
                       actor_dim=1024, object_dim=2048, spatial_thw=(4, 7, 7), cls_prob_dim=81)
    layout = StoreLayout.build(shape, StorageConfig(shard_mb=8, chunk_kb=256, min_shards=4))
    for group in (layout.actors, layout.objects):
        ranges = group.shard_ranges()
        assert ranges[0][0] == 0 and ranges[-1][1] == group.num_rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        for spec in group.arrays:
            assert group.shard_rows % spec.shard_rows == 0, spec  # one writer owns whole shards
            assert spec.shard_rows % spec.chunk_rows == 0, spec
    features = layout.actors.arrays[0]
    assert features.chunk_rows == 128  # 256 KB of 1024 float16 values
    assert features.shard_rows * 1024 * 2 <= 8 * 2**20
    spatial = next(s for s in layout.actors.arrays if s.name == "actors/spatial")
    assert spatial.shard_rows * 1024 * 4 * 7 * 7 * 2 <= 8 * 2**20
    assert len(layout.objects.shard_ranges()) >= 4  # min_shards splits a small group


def test_open_reads_tables(store_path):
    store = FeatureStore.open(store_path, expect_actor_dim=16, expect_object_dim=32)
    assert store.num_clips == 3 and store.num_keyframes == 30
    assert store.clip_ptr.tolist() == [0, 10, 20, 30]
    assert store.clip_lengths.tolist() == [10, 10, 10]
    assert store.video_ids == sorted(store.video_ids)
    assert store.timestamps[:10].tolist() == list(range(902, 912))
    assert store.actor_ptr[-1] == store.num_actors and store.object_ptr[-1] == store.num_objects
    assert store.attrs["schema_version"] == SCHEMA_VERSION and store.split == "train"
    assert store.actor_boxes_all().shape == (store.num_actors, 4)


def test_read_window_is_contiguous_and_local(store_path):
    store = FeatureStore.open(store_path)
    spec = WindowSpec(clip=1, start=3, length=6)
    window = store.read_window(spec)
    first = 10 + 3
    a0, a1 = store.actor_ptr[first], store.actor_ptr[first + 6]
    o0, o1 = store.object_ptr[first], store.object_ptr[first + 6]
    assert window.keyframe_start == first and window.actor_start == a0 and window.clip == 1
    assert window.video_id == store.video_ids[1]
    assert window.timestamps.tolist() == list(range(905, 911))
    assert window.actor_ptr.tolist() == (store.actor_ptr[first: first + 7] - a0).tolist()
    assert window.object_ptr.tolist() == (store.object_ptr[first: first + 7] - o0).tolist()
    root = zarr.open_group(store_path, mode="r")
    np.testing.assert_array_equal(window.actor_features, root["actors/features"][a0:a1])
    np.testing.assert_array_equal(window.actor_labels, root["actors/labels"][a0:a1])
    np.testing.assert_array_equal(window.object_features, root["objects/features"][o0:o1])
    np.testing.assert_array_equal(window.object_boxes, root["objects/boxes"][o0:o1])
    assert window.actor_boxes.dtype == np.float32 and window.actor_labels.dtype == np.uint8
    batch = collate([window, store.read_window(WindowSpec(0, 0, 2))])
    assert batch.num_windows == 2 and batch.actor_index[0].item() == a0


def test_zero_actor_keyframes_read_as_empty_ranges(store_path):
    store = FeatureStore.open(store_path)
    empty = np.flatnonzero(np.diff(store.actor_ptr) == 0)
    assert len(empty), "synthetic data should have zero-actor keyframes"
    k = int(empty[0])
    window = store.read_keyframes(k, k + 1)
    assert window.actor_features.shape == (0, 16) and window.actor_labels.shape == (0, 80)
    assert window.actor_ptr.tolist() == [0, 0]


def test_window_reads_one_slice_per_feature_array(store_path, monkeypatch):
    store = FeatureStore.open(store_path, cache_mb=0)
    calls = []
    original = zarr.Array.__getitem__
    monkeypatch.setattr(zarr.Array, "__getitem__", lambda self, sel: calls.append(sel) or original(self, sel))
    store.read_window(WindowSpec(0, 2, 6))  # first read: boxes and labels are loaded whole, once
    assert len(calls) == 5 and all(isinstance(s, slice) for s in calls)
    calls.clear()
    store.read_window(WindowSpec(0, 0, 6))
    assert len(calls) == 2 and all(isinstance(s, slice) and s.start is not None for s in calls)


def test_cache_in_memory_and_plain_reads_agree(store_path):
    plain = FeatureStore.open(store_path, cache_mb=0)
    cached = FeatureStore.open(store_path)
    memory = FeatureStore.open(store_path, in_memory=True)
    assert memory.nbytes > 0
    for clip in range(3):
        for start in range(0, 8, 2):
            spec = WindowSpec(clip, start, 3)
            a, b, c = plain.read_window(spec), cached.read_window(spec), memory.read_window(spec)
            for name in ("actor_features", "actor_boxes", "actor_labels", "object_features", "object_boxes"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
                np.testing.assert_array_equal(getattr(a, name), getattr(c, name))
    assert cached._cache.bytes > 0


def test_node_shared_memmaps_are_written_once_and_read_like_zarr(store_path, tmp_path):
    import multiprocessing

    plain = FeatureStore.open(store_path, cache_mb=0)
    mapped = FeatureStore.open(store_path, memmap_dir=tmp_path / "shm")
    specs = [WindowSpec(clip, start, 3) for clip in range(3) for start in range(0, 8, 3)]
    for spec in specs:
        a, b = plain.read_window(spec), mapped.read_window(spec)
        for name in ("actor_features", "actor_boxes", "actor_labels", "object_features", "object_boxes"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    files = sorted((tmp_path / "shm").glob("*/*.npy"))
    assert [f.name for f in files] == ["actors__boxes.npy", "actors__features.npy", "actors__labels.npy",
                                       "objects__boxes.npy", "objects__features.npy"]
    written = {f: f.stat().st_mtime_ns for f in files}
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # other processes map the same files
        windows = pool.starmap(FeatureStore.read_window, [(mapped, spec) for spec in specs[:2]])
    np.testing.assert_array_equal(windows[1].actor_features, plain.read_window(specs[1]).actor_features)
    assert {f: f.stat().st_mtime_ns for f in files} == written
    assert not list((tmp_path / "shm").glob("*/*.tmp*"))


def test_store_pickles_for_worker_processes(store_path):
    store = FeatureStore.open(store_path, in_memory=True)
    store.read_window(WindowSpec(0, 0, 4))
    blob = pickle.dumps(store)
    assert len(blob) < 20_000  # tables only: no arrays, no zarr handles
    clone = pickle.loads(blob)
    a, b = store.read_window(WindowSpec(2, 1, 5)), clone.read_window(WindowSpec(2, 1, 5))
    np.testing.assert_array_equal(a.object_features, b.object_features)


def test_windows_never_cross_clips(store_path):
    store = FeatureStore.open(store_path)
    with pytest.raises(IndexError):
        store.read_window(WindowSpec(0, 8, 3))
    with pytest.raises(IndexError):
        store.read_keyframes(8, 12)
    with pytest.raises(IndexError):
        store.read_window(WindowSpec(3, 0, 1))


def test_refuses_unexpected_dims(store_path):
    with pytest.raises(StoreError, match="dims.actor_dim is 16, expected 1024"):
        FeatureStore.open(store_path, expect_actor_dim=1024)
    with pytest.raises(StoreError, match="dims.object_dim is 32, expected 2048"):
        FeatureStore.open(store_path, expect_object_dim=2048)


def test_refuses_other_schema_version(store_path, tmp_path):
    path = copy_store(store_path, tmp_path)
    edit_attrs(path, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match=f"schema_version is {SCHEMA_VERSION + 1}"):
        FeatureStore.open(path)


def test_refuses_incomplete_store(store_path, tmp_path):
    path = copy_store(store_path, tmp_path)
    edit_attrs(path, complete=False)
    with pytest.raises(StoreError, match=f"{path}: store is incomplete"):
        FeatureStore.open(path)


def test_refuses_non_store(tmp_path):
    with pytest.raises(StoreError, match="not a stage_dist feature store"):
        FeatureStore.open(tmp_path)


def test_label_width_constant_matches_data_contract():
    from stage_dist import batch, sources

    assert sources.NUM_ACTIONS == batch.NUM_ACTIONS
