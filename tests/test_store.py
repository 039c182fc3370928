"""The store's layout rules and the reader API on a real converted store."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from stage_dist.convert import main
from stage_dist.data.batch import collate
from stage_dist.ingest.synthetic import SynthConfig, synthesize
from stage_dist.store import zarr_shards
from stage_dist.store.feature_store import (
    SCHEMA_VERSION,
    FeatureStore,
    StorageConfig,
    StoreError,
    StoreLayout,
    StoreShape,
    Tables,
    create_store,
    finish_store,
    open_arrays,
    storage_attrs,
)
from stage_dist.store.schema import ROW_TABLES, TABLE_DTYPES, WINDOW_ARRAYS
from stage_dist.store.window import WindowSpec
from stage_dist.store.zarr_shards import ArrayReader, UnknownLayout, open_reader
from tests.counting import count_reads


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
    assert store.read_array("actors/boxes", 0, store.num_actors).shape == (store.num_actors, 4)


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


def test_window_decodes_only_its_chunks(store_path):
    root = zarr.open_group(store_path, mode="r")
    store = FeatureStore.open(store_path, cache_mb=0)
    first, stop = 2, 8  # clip 0, keyframes 2..7
    rows = {"actors": (store.actor_ptr[first], store.actor_ptr[stop]),
            "objects": (store.object_ptr[first], store.object_ptr[stop])}

    def chunks_touched(name: str) -> int:
        r0, r1 = rows[name.split("/")[0]]
        size = root[name].chunks[0]  # zarr's own view of the chunking
        return int((r1 - 1) // size - r0 // size + 1)

    with count_reads() as counts:
        store.read_window(WindowSpec(0, first, stop - first))
    assert not counts.zarr_calls
    for name in ("actors/features", "objects/features", "actors/boxes", "actors/labels", "objects/boxes"):
        assert counts.chunks[name] == chunks_touched(name), name
    for name in ROW_TABLES:  # one chunk per shard of the group
        assert root[name].chunks[0] == root[name].shards[0] == root[name.split("/")[0] + "/features"].shards[0]
    with count_reads() as counts:  # per-row tables stay decoded; features are decoded again
        store.read_window(WindowSpec(0, first, stop - first))
    assert set(counts.chunks) == {"actors/features", "objects/features"}


def _zarr_arrays(tmp_path: Path) -> dict[str, tuple[zarr.Array, np.ndarray]]:
    """Arrays in every layout the direct reader handles, each with its expected content."""
    rng = np.random.default_rng(3)
    root = zarr.open_group(tmp_path / "layouts.zarr", mode="w", zarr_format=3)
    made = {}

    def make(name: str, values: np.ndarray, written: slice, **options) -> None:
        arr = root.create_array(name, shape=values.shape, dtype=values.dtype, **options)
        arr[written] = values[written]
        expected = np.full_like(values, options.get("fill_value") or 0)
        expected[written] = values[written]
        made[name] = (arr, expected)

    f16 = rng.standard_normal((1000, 6)).astype(np.float16)
    make("sharded_zstd", f16, slice(0, 1000), chunks=(16, 6), shards=(64, 6),
         compressors=(ZstdCodec(level=1),))
    make("sharded_index_start_raw", f16, slice(0, 1000), chunks=(64, 6), compressors=None,
         serializer=zarr.codecs.ShardingCodec(chunk_shape=(16, 6), index_location="start"))
    make("plain_zstd", f16, slice(0, 1000), chunks=(48, 6), compressors=(ZstdCodec(level=3),))
    make("big_endian", rng.random((300, 3)).astype(np.float32), slice(0, 300), chunks=(32, 3),
         serializer=zarr.codecs.BytesCodec(endian="big"))
    # rows never written read as the fill value (whole missing shards and chunks inside a shard)
    make("partly_written", rng.integers(1, 9, (700, 2, 3)).astype(np.int32), slice(0, 64 * 3 + 10),
         chunks=(16, 2, 3), shards=(64, 2, 3), fill_value=7)
    zeros = np.zeros((200, 4), np.uint8)
    zeros[100:] = 1
    make("zero_chunks_skipped", zeros, slice(0, 200), chunks=(10, 4), shards=(50, 4))  # zarr skips empty chunks
    return made


def test_direct_reads_equal_zarr_in_every_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(zarr_shards, "MAX_OPEN_FILES", 2)  # reads cross more files than stay open
    rng = np.random.default_rng(0)
    for name, (array, expected) in _zarr_arrays(tmp_path).items():
        reader = ArrayReader.open(tmp_path / "layouts.zarr", name)
        n = len(expected)
        ranges = [(0, n), (0, 1), (n - 1, n), *[tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(40)]]
        for start, stop in ranges:
            got = reader.read(int(start), int(stop))
            np.testing.assert_array_equal(got, array[start:stop], err_msg=f"{name} {start}:{stop}")
            np.testing.assert_array_equal(got, expected[start:stop])
            assert got.dtype == array.dtype and got.shape == array[start:stop].shape
            assert len([fd for fd in reader._fds.values() if fd is not None]) <= 2
        reader.close()


def test_layouts_the_direct_reader_does_not_know_are_read_through_zarr(tmp_path, caplog):
    root = zarr.open_group(tmp_path / "other.zarr", mode="w", zarr_format=3)
    values = np.random.default_rng(2).standard_normal((300, 5)).astype(np.float32)
    array = root.create_array("blosc", shape=values.shape, dtype=values.dtype, chunks=(32, 5),
                              compressors=(zarr.codecs.BloscCodec(),))
    array[:] = values
    with pytest.raises(UnknownLayout, match="blosc"):
        ArrayReader.open(tmp_path / "other.zarr", "blosc")
    reader = open_reader(tmp_path / "other.zarr", "blosc")
    assert "blosc is read through zarr" in caplog.text
    with count_reads() as counts:
        np.testing.assert_array_equal(reader.read(10, 250), values[10:250])
    assert sum(counts.zarr_calls.values()) == 1


# ----------------------------------------------------------------------------- layouts from zarr.json


def _zarr_json(**changes) -> dict:
    """An array's zarr.json as zarr-python 3.1 writes the store's row arrays."""
    doc = {
        "zarr_format": 3, "node_type": "array", "shape": [203, 7], "data_type": "float16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [64, 7]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0,
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [16, 7],
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 1, "checksum": False}}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}],
        "attributes": {}, "dimension_names": None, "storage_transformers": [],
    }
    return {**doc, **changes}


def _sharding(**changes) -> list:
    config = {**_zarr_json()["codecs"][0]["configuration"], **changes}
    return [{"name": "sharding_indexed", "configuration": config}]


_CANONICAL = zarr_shards.ShardLayout(shape=(203, 7), dtype=np.dtype("<f2"), fill_value=0.0, shard_rows=64,
                                 chunk_rows=16, sharded=True, zstd={"level": 1, "checksum": False},
                                 index_dtype=np.dtype("<u8"))

# every form the zarr v3 spec allows for the same layout, and keys a later writer may add
_SAME_LAYOUT: dict[str, dict[str, Any]] = {
    "as written": {},
    "name-only strings": {"codecs": _sharding(codecs=["bytes", {"name": "zstd", "configuration": {"level": 1,
                                                                                                  "checksum": False}}],
                                              index_codecs=["bytes", "crc32c"])},
    "no or null configuration": {"codecs": _sharding(codecs=[{"name": "bytes", "configuration": None},
                                                             {"name": "zstd", "configuration": {"level": 1,
                                                                                                "checksum": False}}],
                                                     index_codecs=[{"name": "bytes"}, {"name": "crc32c"}]),
                                 "chunk_key_encoding": {"name": "default"}},
    "defaults left out": {"codecs": _sharding(index_location=None), "chunk_key_encoding": "default",
                          "storage_transformers": None},
    "data type as an object": {"data_type": {"name": "float16", "configuration": {}}},
    "fill value forms": {"fill_value": 0},
    "unknown keys inside entries": {"codecs": [{"name": "sharding_indexed", "must_understand": True, "configuration": {
        **_zarr_json()["codecs"][0]["configuration"], "subchunk_write_order": "morton"}}]},
    "extension the reader may ignore": {"consolidated": {"must_understand": False, "anything": [1, 2]}},
}


@pytest.mark.parametrize("form", list(_SAME_LAYOUT))
def test_layout_from_zarr_json_in_every_form_of_the_spec(form):
    doc = _zarr_json(**_SAME_LAYOUT[form])
    if form == "defaults left out":
        del doc["codecs"][0]["configuration"]["index_location"], doc["storage_transformers"]
    assert zarr_shards.ShardLayout.from_zarr_json(json.loads(json.dumps(doc))) == _CANONICAL


def test_layout_from_zarr_json_reads_each_decision():
    big = zarr_shards.ShardLayout.from_zarr_json(_zarr_json(
        codecs=_sharding(codecs=[{"name": "bytes", "configuration": {"endian": "big"}}],
                         index_codecs=[{"name": "bytes", "configuration": {"endian": "big"}}], index_location="start"),
        chunk_key_encoding={"name": "v2", "configuration": {"separator": "."}}, fill_value="NaN"))
    assert (big.dtype, big.index_dtype, big.index_at_end, big.index_crc, big.zstd) == \
        (np.dtype(">f2"), np.dtype(">u8"), False, False, None)
    assert np.isnan(big.fill_value) and big.index_nbytes == 4 * 16 and big.file_key(3) == "3.0"
    assert _CANONICAL.file_key(3) == "c/3/0" and _CANONICAL.index_nbytes == 4 * 16 + 4
    plain = zarr_shards.ShardLayout.from_zarr_json(_zarr_json(
        data_type="int32", fill_value=-7, codecs=["bytes"],
        chunk_key_encoding={"name": "default", "configuration": {"separator": "."}}))
    assert (plain.sharded, plain.chunk_rows, plain.shard_rows, plain.dtype, plain.fill_value, plain.file_key(2)) == \
        (False, 64, 64, np.dtype("<i4"), -7, "c.2.0")
    assert zarr_shards.ShardLayout.from_zarr_json(_zarr_json(fill_value="0x3c00")).fill_value == 1.0  # float16 1.0


# layouts the direct path does not read: zarr reads them, after a warning
_UNKNOWN: dict[str, tuple[dict[str, Any], str]] = {
    "unknown key": ({"future_key": 1}, "future_key"),
    "extension zarr must understand": ({"ext": {"must_understand": True}}, "ext"),
    "storage transformer": ({"storage_transformers": [{"name": "t"}]}, "plain zarr v3"),
    "zarr v2": ({"zarr_format": 2}, "plain zarr v3"),
    "blosc": ({"codecs": _sharding(codecs=["bytes", "blosc"])}, "blosc"),
    "transpose": ({"codecs": _sharding(codecs=["transpose", "bytes"])}, "transpose"),
    "codecs after the shards": ({"codecs": [*_sharding(), "crc32c"]}, "after sharding"),
    "nested shards": ({"codecs": _sharding(codecs=_sharding())}, "sharding_indexed"),
    "index location": ({"codecs": _sharding(index_location="middle")}, "middle"),
    "endian": ({"codecs": _sharding(codecs=[{"name": "bytes", "configuration": {"endian": "native"}}])}, "native"),
    "index codecs": ({"codecs": _sharding(index_codecs=["bytes", "zstd"])}, "index codecs"),
    "index codec entry": ({"codecs": _sharding(index_codecs=[3])}, "index codec"),
    "data type": ({"data_type": "r16"}, "r16"),
    "data type with configuration": ({"data_type": {"name": "float16", "configuration": {"x": 1}}}, "data type"),
    "chunk grid": ({"chunk_grid": {"name": "rectilinear", "configuration": {}}}, "rectilinear"),
    "key encoding": ({"chunk_key_encoding": {"name": "custom"}}, "custom"),
    "fill value": ({"fill_value": "lots"}, "lots"),
    "bool fill for float": ({"fill_value": True}, "fill value"),
    "chunks across rows": ({"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [64, 3]}}},
                           "whole rows"),
    "shard not whole chunks": ({"codecs": _sharding(chunk_shape=[24, 7])}, "multiple"),
    "missing codecs": ({"codecs": None}, "codecs"),
    "missing shape": ({"shape": "big"}, "metadata"),
}


@pytest.mark.parametrize("case", list(_UNKNOWN))
def test_layouts_zarr_json_describes_but_the_direct_path_does_not_know(case):
    changes, reason = _UNKNOWN[case]
    with pytest.raises(UnknownLayout, match=reason):
        zarr_shards.ShardLayout.from_zarr_json(json.loads(json.dumps(_zarr_json(**changes))))


def _spec_forms(doc: dict) -> dict:
    """``doc`` rewritten into another form of the spec with the same meaning: name-only strings,
    defaults left out, an extension marked ``"must_understand": false``."""
    def short(codec):
        config = codec.get("configuration")
        if codec["name"] == "bytes" and config == {"endian": "little"} or not config:
            return codec["name"]
        return {**codec, "configuration": {**config, "added_by_a_later_zarr": True}}

    doc = json.loads(json.dumps(doc))
    doc["codecs"] = [short(c) for c in doc["codecs"]]
    if isinstance(doc["codecs"][0], dict) and doc["codecs"][0]["name"] == "sharding_indexed":
        config = doc["codecs"][0]["configuration"]
        config["codecs"] = [short(c) for c in config["codecs"]]
        config["index_codecs"] = [short(c) for c in config["index_codecs"]]
        config.pop("index_location")
    doc["chunk_key_encoding"] = "default"
    doc.pop("storage_transformers", None)
    doc["data_type"] = {"name": doc["data_type"]}
    doc["an_extension"] = {"must_understand": False, "configuration": {"x": 1}}
    return doc


def test_a_store_in_another_form_of_the_spec_reads_identical_arrays(store_path, tmp_path, caplog):
    path = copy_store(store_path, tmp_path)
    names = [*FeatureStore.open(store_path).row_arrays(), "keyframes/actor_ptr", "keyframes/timestamp"]
    for name in names:
        meta = path / name / "zarr.json"
        meta.write_text(json.dumps(_spec_forms(json.loads(meta.read_text()))))
    root = zarr.open_group(store_path, mode="r")
    for name in names:
        reader = open_reader(path, name)
        assert isinstance(reader, ArrayReader), name
        n = root[name].shape[0]
        for start, stop in [(0, n), (1, n - 1), (n // 3, n // 2)]:
            got, expected = reader.read(start, stop), root[name][start:stop]
            np.testing.assert_array_equal(got, expected, err_msg=name)
            assert got.dtype == expected.dtype
    assert "read through zarr" not in caplog.text
    edited = path / "actors" / "features" / "zarr.json"  # an inner codec the direct path does not know
    doc = json.loads(edited.read_text())
    doc["codecs"][0]["configuration"]["codecs"][1] = "lz5"
    edited.write_text(json.dumps(doc))
    with pytest.raises(UnknownLayout, match="lz5"):
        ArrayReader.open(path, "actors/features")


@pytest.mark.parametrize("options", [
    {"index_location": "start", "index_codecs": (zarr.codecs.BytesCodec(endian="big"),)},
    {"index_location": "end", "codecs": (zarr.codecs.BytesCodec(endian="big"), ZstdCodec(level=2, checksum=True))},
], ids=["index at the start, big endian, no crc32c", "big-endian data, zstd with checksum"])
def test_streamed_shards_in_other_spec_layouts_read_back_in_zarr(tmp_path, options):
    """The writer takes every decision from zarr.json: it is handed only the array's path."""
    from types import SimpleNamespace

    root = zarr.open_group(tmp_path / "s", mode="w", zarr_format=3)
    values = np.random.default_rng(3).standard_normal((150, 2, 3)).astype(np.float32)
    array = root.create_array("x", shape=values.shape, dtype=values.dtype, chunks=(48, 2, 3), fill_value=0,
                              chunk_key_encoding={"name": "v2", "separator": "."}, compressors=None,
                              serializer=zarr.codecs.ShardingCodec(chunk_shape=(16, 2, 3), **options))
    assert zarr_shards.ShardStreamWriter.supports(array, tmp_path / "s")
    for start in range(0, 150, 48):
        writer = zarr_shards.ShardStreamWriter(SimpleNamespace(path="x"), tmp_path / "s", start, min(start + 48, 150))
        writer.append(values[start: start + 48])
        writer.close("x")
    assert sorted(p.name for p in (tmp_path / "s" / "x").iterdir()) == ["0.0.0", "1.0.0", "2.0.0", "3.0.0", "zarr.json"]
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "s" / "x", mode="r")[:], values)
    np.testing.assert_array_equal(ArrayReader.open(tmp_path / "s", "x").read(0, 150), values)


def test_arrays_the_streaming_writer_does_not_know_are_written_through_zarr(tmp_path, caplog):
    root = zarr.open_group(tmp_path / "s", mode="w", zarr_format=3)
    values = np.arange(200 * 3, dtype=np.int16).reshape(200, 3)
    array = root.create_array("blosc", shape=values.shape, dtype=values.dtype, chunks=(16, 3), shards=(64, 3),
                              compressors=(zarr.codecs.BloscCodec(),))
    for start in range(0, 200, 64):
        writer = zarr_shards.row_writer(array, tmp_path / "s", start, min(start + 64, 200), 64)
        assert isinstance(writer, zarr_shards.BufferedRowWriter)
        writer.append(values[start: start + 64])
        writer.close("blosc")
    assert caplog.text.count("blosc is written through zarr") == 1  # once per array and process
    np.testing.assert_array_equal(array[:], values)


def test_direct_reads_equal_zarr_on_a_converted_store(store_path):
    root = zarr.open_group(store_path, mode="r")
    store = FeatureStore.open(store_path, cache_mb=0)
    cached = FeatureStore.open(store_path)
    rng = np.random.default_rng(1)
    for name in store.row_arrays():
        n = root[name].shape[0]
        for start, stop in [(0, n), *[sorted(rng.integers(0, n + 1, 2)) for _ in range(12)]]:
            if stop > start:
                np.testing.assert_array_equal(store.read_array(name, start, stop), root[name][start:stop])
                np.testing.assert_array_equal(cached.read_array(name, start, stop), root[name][start:stop])


def test_damaged_shard_is_a_named_error(store_path, tmp_path):
    path = copy_store(store_path, tmp_path)
    shard = path / "objects" / "features" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-10])
    store = FeatureStore.open(path, cache_mb=0)
    with pytest.raises(StoreError, match=f"{path}/objects/features: shard 0 .*reconvert the store"):
        store.read_array("objects/features", 0, 1)
    shard = path / "actors" / "features" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[:16] = bytes(16)  # the first chunk's zstd frame header, index intact
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{path}/actors/features: chunk 0 does not decode .*reconvert the store"):
        store.read_array("actors/features", 0, 1)
    shutil.rmtree(path / "keyframes" / "actor_ptr")
    with pytest.raises(StoreError, match=f"{path}: damaged store, 'keyframes/actor_ptr' is missing; reconvert it"):
        FeatureStore.open(path)


def test_stores_with_row_tables_in_feature_chunks_read_the_same(tmp_path):
    """Stores written before the per-row tables got one chunk per shard still read, the same."""
    path = tmp_path / "old.zarr"
    build = StoreLayout.build

    def old_layout(shape, storage):
        layout = build(shape, storage)
        groups = []
        for group in (layout.actors, layout.objects):
            features = group.arrays[0]
            arrays = tuple(dataclasses.replace(a, chunk_rows=features.chunk_rows) for a in group.arrays)
            groups.append(dataclasses.replace(group, arrays=arrays))
        return dataclasses.replace(layout, actors=groups[0], objects=groups[1])

    new = build_small_store(tmp_path / "new.zarr")
    build_small_store(path, layout_for=old_layout)
    assert zarr.open_group(path)["objects/boxes"].chunks[0] < zarr.open_group(new.path)["objects/boxes"].chunks[0]
    with count_reads() as counts:  # start-up: the per-row tables are not decoded whole
        old = FeatureStore.open(path)
        old.read_window(WindowSpec(1, 2, 3))
    for name in ROW_TABLES:  # the chunks the window touches, as for the features, which share their chunking
        assert counts.chunks[name] == counts.chunks[name.split("/")[0] + "/features"], name
    assert not counts.zarr_calls
    for clip in range(old.num_clips):
        a, b = old.read_window(WindowSpec(clip, 0, 3)), new.read_window(WindowSpec(clip, 0, 3))
        for name in ("actor_features", "actor_boxes", "actor_labels", "object_features", "object_boxes"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def build_small_store(path: Path, layout_for=StoreLayout.build) -> FeatureStore:
    """A store with a few hundred rows and small chunks, written with the writer primitives."""
    rng = np.random.default_rng(5)
    lengths = [7, 9, 5]
    k = sum(lengths)
    actor_ptr = np.concatenate([[0], np.cumsum(rng.integers(0, 4, k))]).astype(np.int64)
    object_ptr = np.concatenate([[0], np.cumsum(rng.integers(0, 12, k))]).astype(np.int64)
    a, o = int(actor_ptr[-1]), int(object_ptr[-1])
    layout = layout_for(StoreShape(len(lengths), k, a, o, actor_dim=8, object_dim=16),
                        StorageConfig(chunk_kb=0.25, min_shards=3))
    tables = Tables(video_ids=[f"clip{c:08d}_" for c in range(len(lengths))],
                    clip_ptr=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                    keyframe_clip=np.repeat(np.arange(len(lengths)), lengths).astype(np.int32),
                    timestamps=np.concatenate([902 + np.arange(n) for n in lengths]).astype(np.int32),
                    actor_ptr=actor_ptr, object_ptr=object_ptr)
    create_store(path, layout, tables, {**storage_attrs(layout), "split": "train", "video_ids": tables.video_ids})
    arrays = open_arrays(path, [s.name for g in (layout.actors, layout.objects) for s in g.arrays])
    arrays["actors/features"][:] = rng.standard_normal((a, 8)).astype(np.float16)
    arrays["actors/boxes"][:] = rng.random((a, 4), dtype=np.float32)
    arrays["actors/labels"][:] = (rng.random((a, 80)) < 0.1).astype(np.uint8)
    arrays["objects/features"][:] = rng.standard_normal((o, 16)).astype(np.float16)
    arrays["objects/boxes"][:] = rng.random((o, 4), dtype=np.float32)
    finish_store(path)
    return FeatureStore.open(path)


def test_in_memory_loads_only_what_windows_read(store_path):
    assert "objects/cls_prob" in FeatureStore.open(store_path).row_arrays()
    with count_reads() as counts:
        store = FeatureStore.open(store_path, in_memory=True)
    assert set(counts.chunks) == set(WINDOW_ARRAYS) | set(TABLE_DTYPES)
    with count_reads() as counts:
        store.read_window(WindowSpec(1, 0, 5))
    assert counts.total_chunks == 0 and not counts.zarr_calls


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


_FORKED: list[FeatureStore] = []  # a store a forked child inherits (not pickled to it)


def _read_in_forked_child(spec: WindowSpec) -> tuple[np.ndarray, np.ndarray, int]:
    store = _FORKED[0]
    inherited = len(store._row_tables._chunks)
    window = store.read_window(spec)
    return window.object_features, window.actor_labels, inherited


def test_forked_loader_workers_open_their_own_files(store_path):
    import multiprocessing

    store = FeatureStore.open(store_path)
    parent = store.read_window(WindowSpec(1, 0, 4))  # opens files, decodes the per-row tables' chunks
    tables_decoded = len(store._row_tables._chunks)
    _FORKED[:] = [store]
    with multiprocessing.get_context("fork").Pool(1) as pool:  # as a DataLoader worker on Linux
        features, labels, inherited = pool.apply(_read_in_forked_child, (WindowSpec(1, 0, 4),))
    _FORKED.clear()
    assert inherited == tables_decoded > 0  # decoded once, shared with the child
    np.testing.assert_array_equal(features, parent.object_features)
    np.testing.assert_array_equal(labels, parent.actor_labels)
    np.testing.assert_array_equal(store.read_window(WindowSpec(1, 0, 4)).object_features, features)


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


def test_schema_store_and_converter_import_without_torch():
    code = ("import sys, stage_dist.store.schema, stage_dist.store.feature_store, stage_dist.convert; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
