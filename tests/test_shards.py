"""WebDataset shards: the same windows as the zarr store, equal steps on every rank, each
keyframe once at inference, and clear errors on bad shards."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from stage_dist.core.outputs import MARKER_NAME
from stage_dist.data.batch import Padding, collate
from stage_dist.data.sampler import ClipWindowSampler
from stage_dist.data.tar_windows import TarWindowStream, fill_segments
from stage_dist.shards import main
from stage_dist.store.feature_store import (
    FeatureStore,
    StorageConfig,
    StoreLayout,
    StoreShape,
    Tables,
    create_store,
    finish_store,
    open_arrays,
    read_attrs,
    storage_attrs,
)
from stage_dist.store.tar_shards import (
    ShardError,
    expand_urls,
    read_clip_samples,
    shard_pattern,
    shards_to_store,
    write_shards,
)
from stage_dist.store.window import Window, WindowSpec

# Clips longer and shorter than W = 6, not multiples of it, and an empty one: 7 clips with
# keyframes, so one clip per shard gives 7 shards (neither 2 nor 3 ranks divide it).
LENGTHS = [14, 3, 20, 0, 14, 9, 13, 17]
NONEMPTY = [c for c, n in enumerate(LENGTHS) if n]
VIDEO_IDS = ["-5KQ66BBWC4", "_145Aa_xkuE", "a.b/c d", "x", "..", "v-5_x", "0902.h5", "C:\\y"]
WINDOW = 6


def build_store(path: Path, lengths: list[int], seed: int = 0, extras: bool = False) -> FeatureStore:
    """A real zarr store written with the store's own writer primitives (small chunks, so
    windows cross chunk boundaries); with ``extras`` also ``actors/spatial`` and ``objects/cls_prob``."""
    rng = np.random.default_rng(seed)
    num_keyframes = sum(lengths)
    actor_ptr = np.concatenate([[0], np.cumsum(rng.integers(0, 4, num_keyframes))]).astype(np.int64)
    object_ptr = np.concatenate([[0], np.cumsum(rng.integers(0, 5, num_keyframes))]).astype(np.int64)
    num_actors, num_objects = int(actor_ptr[-1]), int(object_ptr[-1])
    shape = StoreShape(len(lengths), num_keyframes, num_actors, num_objects, actor_dim=24, object_dim=40,
                       spatial_thw=(2, 1, 3) if extras else None, cls_prob_dim=7 if extras else None)
    layout = StoreLayout.build(shape, StorageConfig(chunk_kb=1, min_shards=3))
    tables = Tables(
        video_ids=VIDEO_IDS[: len(lengths)],
        clip_ptr=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        keyframe_clip=np.repeat(np.arange(len(lengths)), lengths).astype(np.int32),
        timestamps=np.concatenate([902 + np.arange(n) for n in lengths]).astype(np.int32),
        actor_ptr=actor_ptr,
        object_ptr=object_ptr,
    )
    create_store(path, layout, tables, {**storage_attrs(layout), "split": "train", "video_ids": tables.video_ids})
    arrays = open_arrays(path, [a.name for group in (layout.actors, layout.objects) for a in group.arrays])
    arrays["actors/features"][:] = rng.standard_normal((num_actors, 24)).astype(np.float16)
    arrays["actors/boxes"][:] = rng.random((num_actors, 4), dtype=np.float32)
    arrays["actors/labels"][:] = (rng.random((num_actors, 80)) < 0.1).astype(np.uint8)
    arrays["objects/features"][:] = rng.standard_normal((num_objects, 40)).astype(np.float16)
    arrays["objects/boxes"][:] = rng.random((num_objects, 4), dtype=np.float32)
    if extras:
        arrays["actors/spatial"][:] = rng.standard_normal((num_actors, 24, 2, 1, 3)).astype(np.float16)
        arrays["objects/cls_prob"][:] = rng.random((num_objects, 7)).astype(np.float16)
    finish_store(path)
    return FeatureStore.open(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    return build_store(tmp_path_factory.mktemp("store") / "train.zarr", LENGTHS)


@pytest.fixture(scope="module")
def seven(store, tmp_path_factory) -> tuple[dict, str]:
    """One clip per shard: 7 shards."""
    out = tmp_path_factory.mktemp("seven")
    manifest = write_shards(store, out, max_shard_bytes=1)
    return manifest, shard_pattern(manifest, out)


@pytest.fixture(scope="module")
def two(store, tmp_path_factory) -> tuple[dict, str]:
    """Two shards, fewer than the ranks of some tests."""
    out = tmp_path_factory.mktemp("two")
    one_clip = write_shards(store, tmp_path_factory.mktemp("probe"), max_shard_bytes=1)
    total = sum(s["bytes"] for s in one_clip["shards"])
    manifest = write_shards(store, out, max_shard_bytes=total // 2 + 1)
    assert manifest["num_shards"] == 2
    return manifest, shard_pattern(manifest, out)


def assert_windows_equal(a: Window, b: Window) -> None:
    for field in dataclasses.fields(Window):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, field.name
            assert np.array_equal(x, y), field.name
        else:
            assert x == y, field.name


def spec_of(store: FeatureStore, window: Window) -> WindowSpec:
    return WindowSpec(window.clip, window.keyframe_start - int(store.clip_ptr[window.clip]), window.num_keyframes)


def epoch_specs(store: FeatureStore, epoch: int, window: int = WINDOW, seed: int = 0) -> set[WindowSpec]:
    return set(ClipWindowSampler(store.clip_lengths, window, seed=seed).epoch_windows(epoch))


def stream(pattern: str | list[str], rank: int = 0, world_size: int = 1, **kwargs) -> TarWindowStream:
    options: dict[str, Any] = dict(window=WINDOW, windows_per_step=1, seed=0)
    options.update(kwargs)
    return TarWindowStream(pattern, rank=rank, world_size=world_size, **options)


def run_epoch(pattern: str | list[str], epoch: int, rank: int = 0, world_size: int = 1, **kwargs) -> list[list[Window]]:
    s = stream(pattern, rank, world_size, **kwargs)
    s.set_epoch(epoch)
    return list(s)


# --- writing --------------------------------------------------------------------------------


def test_shards_manifest_and_safe_keys(store, seven):
    manifest, pattern = seven
    out = Path(pattern).parent
    assert pattern == f"{out}/train-{{000000..000006}}.tar"
    names = [s["name"] for s in manifest["shards"]]
    assert names == [f"train-{i:06d}.tar" for i in range(7)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "manifest.json", MARKER_NAME])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["sample"] == "clip" and manifest["window"] is None
    assert (manifest["num_clips"], manifest["num_keyframes"]) == (len(LENGTHS), sum(LENGTHS))
    assert (manifest["num_actors"], manifest["num_objects"]) == (store.num_actors, store.num_objects)
    assert manifest["num_samples"] == len(NONEMPTY)
    assert manifest["clip_lengths"] == LENGTHS
    assert manifest["windows"] == {"6": sum(-(-n // 6) for n in LENGTHS)}
    assert (manifest["actor_dim"], manifest["object_dim"]) == (24, 40)
    assert manifest["dtypes"]["actor_features"] == "<f2" and manifest["dtypes"]["actor_labels"] == "|u1"
    assert manifest["store_attrs"]["video_ids"] == VIDEO_IDS
    assert [(s["first_clip"], s["stop_clip"], s["keyframes"]) for s in manifest["shards"]] == [
        (c, c + 1, LENGTHS[c]) for c in NONEMPTY
    ]
    members = []
    for name in names:
        with tarfile.open(out / name) as tar:
            members += tar.getnames()
    for member in members:  # the key is everything before the first dot: no dots, no slashes
        assert re.fullmatch(r"c\d{6}\.[a-z_]+\.(npy|json)", member), member
    assert len(members) == len(NONEMPTY) * 9


def test_shard_size_limit_and_stale_shards_removed(store, tmp_path):
    one_clip = write_shards(store, tmp_path, max_shard_bytes=1)
    limit = 2 * max(s["bytes"] for s in one_clip["shards"]) + 1
    manifest = write_shards(store, tmp_path, max_shard_bytes=limit)
    assert 1 < manifest["num_shards"] < 7
    assert all(s["bytes"] <= limit for s in manifest["shards"])
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [s["name"] for s in manifest["shards"]]
    assert sum(s["keyframes"] for s in manifest["shards"]) == sum(LENGTHS)


def test_one_split_per_directory(store, tmp_path):
    write_shards(store, tmp_path, max_shard_bytes=1)
    with pytest.raises(ShardError, match="one split per directory"):
        write_shards(store, tmp_path, prefix="val")
    with pytest.raises(ShardError, match="prefix"):
        write_shards(store, tmp_path / "x", prefix="a.b")


def zarr_contents(path: Path) -> dict[str, tuple]:
    """Every array of a zarr group (read with zarr itself): values, dtype, chunk and shard shape."""
    root = zarr.open_group(path, mode="r")
    return {name: (array[...], array.dtype, array.chunks, array.shards)
            for name, array in root.members(max_depth=None) if isinstance(array, zarr.Array)}


@pytest.mark.parametrize("window", [None, 4])
def test_store_to_shards_to_store_is_identical(tmp_path, window, capsys):
    original = build_store(tmp_path / "train.zarr", LENGTHS, seed=5, extras=True)
    manifest = write_shards(original, tmp_path / "shards", window=window, max_shard_bytes=30_000)
    assert manifest["num_shards"] > 2 and manifest["extra_arrays"] == ["actors/spatial", "objects/cls_prob"]
    assert manifest["dtypes"]["object_cls_prob"] == "<f2" and manifest["dtypes"]["actor_spatial"] == "<f2"
    pattern = shard_pattern(manifest, tmp_path / "shards")
    assert main(["--to-store", pattern, str(tmp_path / "back.zarr")]) == 0
    assert "8 clips, 90 keyframes" in capsys.readouterr().out
    expected, rebuilt = zarr_contents(original.path), zarr_contents(tmp_path / "back.zarr")
    assert sorted(rebuilt) == sorted(expected)
    assert {"actors/spatial", "objects/cls_prob", "keyframes/timestamp", "clips/ptr"} <= set(expected)
    for name, (values, dtype, chunks, shards) in expected.items():
        got = rebuilt[name]
        assert (got[1], got[2], got[3]) == (dtype, chunks, shards), name
        assert got[0].shape == values.shape and np.array_equal(got[0], values), name
    assert read_attrs(tmp_path / "back.zarr") == read_attrs(original.path)
    with pytest.raises(ShardError, match="must read every shard"):
        shards_to_store(expand_urls(pattern)[1:], tmp_path / "partial.zarr")


# --- identical batches ----------------------------------------------------------------------


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_stream_windows_are_the_samplers_windows_read_from_the_store(store, seven, epoch):
    steps = run_epoch(seven[1], epoch)
    expected = epoch_specs(store, epoch)
    windows = [w for step in steps for w in step]
    assert len(steps) == ClipWindowSampler(store.clip_lengths, WINDOW, seed=0).steps_for_epoch(epoch)
    assert sorted(spec_of(store, w) for w in windows) == sorted(expected)  # one rank: each window once
    for step in steps:
        from_store = [store.read_window(spec_of(store, w)) for w in step]
        for a, b in zip(step, from_store):
            assert_windows_equal(a, b)
        shard_batch, store_batch = collate(step), collate(from_store)
        for field in dataclasses.fields(shard_batch):
            x, y = getattr(shard_batch, field.name), getattr(store_batch, field.name)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, field.name


def test_window_samples_match_the_store_and_join_back_into_clips(store, tmp_path):
    manifest = write_shards(store, tmp_path, window=WINDOW, max_shard_bytes=1)
    pattern = shard_pattern(manifest, tmp_path)
    fixed = {WindowSpec(c, s, min(WINDOW, n - s)) for c, n in enumerate(LENGTHS) for s in range(0, n, WINDOW)}
    assert manifest["sample"] == "window" and manifest["num_samples"] == len(fixed) == manifest["windows"]["6"]
    windows = [w for step in run_epoch(pattern, 0) for w in step]
    assert sorted(spec_of(store, w) for w in windows) == sorted(fixed)
    for window in windows:
        assert_windows_equal(window, store.read_window(spec_of(store, window)))
    clips = list(read_clip_samples(pattern))
    assert [c.clip for c in clips] == NONEMPTY
    for clip in clips:
        whole = store.read_keyframes(int(store.clip_ptr[clip.clip]), int(store.clip_ptr[clip.clip + 1]))
        assert_windows_equal(clip, whole)
    with pytest.raises(ShardError, match="windows of 6 keyframes, not 4"):
        stream(pattern, window=4)


# --- equal steps on every rank --------------------------------------------------------------


def emulated_epoch(pattern: str, epoch: int, world_size: int, num_workers: int, monkeypatch,
                   **kwargs) -> list[list[list[Window]]]:
    """Every rank's steps, in step order, with ``num_workers`` DataLoader workers emulated."""
    import stage_dist.data.tar_windows as shard_stream

    ranks = []
    for rank in range(world_size):
        by_step: dict[int, list[Window]] = {}
        for worker in range(num_workers):
            monkeypatch.setattr(shard_stream, "_worker", lambda: (worker, num_workers))
            for i, step in enumerate(run_epoch(pattern, epoch, rank, world_size, **kwargs)):
                by_step[worker + i * num_workers] = step
        ranks.append([by_step[i] for i in range(len(by_step))])
    return ranks


@pytest.mark.parametrize("world_size, num_workers, windows_per_step", [(2, 2, 1), (2, 2, 2), (3, 1, 1), (1, 3, 2)])
@pytest.mark.parametrize("layout", ["seven", "two"])
def test_uneven_shards_yield_every_window_once_plus_padding(store, layout, world_size, num_workers, windows_per_step,
                                                            monkeypatch, request, caplog):
    """Shards of 3..20 keyframes (or two of unequal size): over all ranks and workers each
    window of the epoch comes exactly once, and only the padding needed for equal steps repeats."""
    _, pattern = request.getfixturevalue(layout)
    for epoch in (0, 1):
        ranks = emulated_epoch(pattern, epoch, world_size, num_workers, monkeypatch, windows_per_step=windows_per_step)
        sampler = ClipWindowSampler(store.clip_lengths, WINDOW, windows_per_step, world_size=world_size, seed=0)
        steps = sampler.steps_for_epoch(epoch)
        assert [len(r) for r in ranks] == [steps] * world_size
        assert all(len(step) == windows_per_step for r in ranks for step in r)
        specs = [spec_of(store, w) for r in ranks for step in r for w in step]
        expected = epoch_specs(store, epoch)
        assert set(specs) == expected  # every window of the epoch, no other
        padded = steps * world_size * windows_per_step - len(expected)
        assert len(specs) - len(expected) == padded == sampler.padded_windows(epoch)
        assert padded < world_size * windows_per_step
        assert stream(pattern, 0, world_size, windows_per_step=windows_per_step).padded_windows(epoch) == padded
        keyframes = np.zeros(sum(LENGTHS), dtype=np.int64)  # keyframe rows, counted
        for spec in specs:
            first = int(store.clip_ptr[spec.clip]) + spec.start
            keyframes[first : first + spec.length] += 1
        repeated = sum(n for _, _, n in specs) - sum(LENGTHS)
        assert (keyframes >= 1).all() and int((keyframes - 1).sum()) == repeated
        for r in ranks:
            for step in r:
                for w in step:
                    assert_windows_equal(w, store.read_window(spec_of(store, w)))
        with caplog.at_level("INFO", logger="stage_dist.data.sampler"):
            stream(pattern, 0, world_size, windows_per_step=windows_per_step).set_epoch(epoch)
        assert (f"epoch {epoch}: {steps} steps x {world_size} rank(s) x {windows_per_step} window(s); "
                f"{padded} windows repeated") in caplog.text


def test_segments_fill_quotas_evenly():
    assert fill_segments([3, 3, 2, 2], 10).tolist() == [3, 3, 2, 2]
    assert fill_segments([3, 3, 2, 2], 7).tolist() == [2, 2, 2, 1]
    assert fill_segments([4, 4], 1).tolist() == [1, 0]
    with pytest.raises(ValueError):
        fill_segments([1, 1], 3)


@pytest.mark.parametrize("world_size", [3, 5, 9])
def test_more_ranks_than_shards_still_gives_equal_steps(store, two, world_size):
    """2 shards: readers share shards; with 9 ranks and 15 windows some ranks have one window of
    their own and repeat it."""
    _, pattern = two
    ranks = [run_epoch(pattern, 0, r, world_size) for r in range(world_size)]
    steps = ClipWindowSampler(store.clip_lengths, WINDOW, world_size=world_size, seed=0).steps_for_epoch(0)
    assert [len(r) for r in ranks] == [steps] * world_size
    assert {spec_of(store, w) for r in ranks for step in r for w in step} == epoch_specs(store, 0)


def test_dataloader_workers_and_exact_mid_epoch_resume(store, seven):
    _, pattern = seven

    def actor_rows(num_workers: int, resume: int = 0) -> list[list[int]]:
        s = stream(pattern, 1, 2, windows_per_step=2)
        s.load_state_dict({"epoch": 1, "step": resume})
        loader = DataLoader(s, batch_size=None, collate_fn=collate, num_workers=num_workers)
        return [batch.actor_keyframe.tolist() + [-1] + batch.actor_index.tolist() for batch in loader]

    for workers in (0, 2):
        full = actor_rows(workers)
        assert len(full) == len(stream(pattern, 1, 2, windows_per_step=2)) > 3
        for resume in (1, 3):
            assert actor_rows(workers, resume) == full[resume:]


def test_epochs_differ_and_are_reproducible(seven):
    _, pattern = seven
    first = [[w.keyframe_start for w in step] for step in run_epoch(pattern, 0, 0, 2)]
    assert first == [[w.keyframe_start for w in step] for step in run_epoch(pattern, 0, 0, 2)]
    assert first != [[w.keyframe_start for w in step] for step in run_epoch(pattern, 1, 0, 2)]


# --- inference: every keyframe once ---------------------------------------------------------


@pytest.mark.parametrize("layout", ["seven", "two"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_clip_samples_give_every_keyframe_exactly_once(store, layout, world_size, request):
    _, pattern = request.getfixturevalue(layout)
    keyframes: list[int] = []
    for rank in range(world_size):
        for clip in read_clip_samples(pattern, rank=rank, world_size=world_size):
            whole = store.read_keyframes(int(store.clip_ptr[clip.clip]), int(store.clip_ptr[clip.clip + 1]))
            assert_windows_equal(clip, whole)
            keyframes += range(clip.keyframe_start, clip.keyframe_start + clip.num_keyframes)
    assert sorted(keyframes) == list(range(sum(LENGTHS)))


# --- URLs and bad input ---------------------------------------------------------------------


def test_pipe_urls_and_explicit_manifest(store, seven):
    manifest, pattern = seven
    urls = [f"pipe:cat {url}" for url in expand_urls(pattern)]
    with pytest.raises(ShardError, match="manifest"):
        stream(urls)
    steps = run_epoch(urls, 0, manifest=manifest)
    assert sorted(spec_of(store, w) for step in steps for w in step) == sorted(epoch_specs(store, 0))
    assert len(list(read_clip_samples(urls))) == len(NONEMPTY)


def test_subset_of_shards(store, seven):
    manifest, pattern = seven
    urls = expand_urls(pattern)[:3]
    steps = run_epoch(urls, 0)
    clips = set(NONEMPTY[:3])
    assert {w.clip for step in steps for w in step} == clips
    assert len(steps) == len({s for s in epoch_specs(store, 0) if s.clip in clips})


def test_bad_shards_are_named(seven, tmp_path):
    manifest, pattern = seven
    urls = expand_urls(pattern)
    with pytest.raises(ShardError, match="not listed in the manifest"):
        stream([*urls, str(tmp_path / "other-000000.tar")])
    with pytest.raises(ShardError, match="cannot read .*manifest.json"):
        stream(str(tmp_path / "train-000000.tar"))

    truncated = tmp_path / urls[0].rsplit("/", 1)[1]
    truncated.write_bytes(Path(urls[0]).read_bytes()[:3000])
    with pytest.raises(ShardError, match=re.escape(str(truncated))):
        list(read_clip_samples([str(truncated)]))

    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as tar:
        data = b"{}"
        info = tarfile.TarInfo("c000000.meta.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"sample c000000: missing entry 'timestamps.npy'"):
        list(read_clip_samples([str(broken)]))


def test_cli_writes_shards_and_reports_errors(store, tmp_path, capsys):
    assert main([str(store.path), str(tmp_path / "out"), "--max-shard-mb", "0.0001"]) == 0
    assert "7 shards, 7 samples, 8 clips, 90 keyframes" in capsys.readouterr().out
    assert (tmp_path / "out" / "manifest.json").exists()
    assert main([str(tmp_path / "missing.zarr"), str(tmp_path / "o2")]) == 2
    assert "not a stage_dist feature store" in capsys.readouterr().err


def test_convert_format_webdataset_alone_writes_shards_to_out(tmp_path, capsys):
    from stage_dist.convert import build_parser, main as convert_main
    from stage_dist.ingest.synthetic import SynthConfig, synthesize

    data = synthesize(tmp_path / "synth", SynthConfig(seed=3, train_clips=2, val_clips=1, keyframes_per_clip=5,
                                                      actor_dim=8, object_dim=16, actor_thw=(1, 1, 1)))
    paths = data.splits["train"]
    common = ["--actors-dir", str(paths.actors_dir), "--objects-file", str(paths.objects_file),
              "--workers", "1", "--no-progress"]
    out = tmp_path / "train"
    assert convert_main([*common, "--out", str(out), "--format", "webdataset"]) == 0
    assert f"-> {out}/train-000000.tar" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_keyframes"] == 10 and manifest["split"] == "train"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth", "train"]  # no store left beside it
    help_text = build_parser().format_help()
    assert help_text.count("zarr,webdataset") == 1, "each --format choice is listed once"


def test_store_and_shards_are_one_kind_of_window_source(store, seven):
    """Both paths satisfy WindowSource with the same schedule, dims and counts, and their
    inference batches own every actor exactly once over the ranks, naming its keyframe."""
    from stage_dist.data.splits import open_window_source
    from stage_dist.data.store_windows import StoreWindowSource
    from stage_dist.data.window_source import WindowSource

    sources = [StoreWindowSource(store, windows_per_step=2, rank=1, world_size=2),
               open_window_source(shards=seven[1], windows_per_step=2, rank=1, world_size=2)]
    nodes = [int(store.actor_ptr[k + 1] - store.actor_ptr[k] + store.object_ptr[k + 1] - store.object_ptr[k])
             for k in range(store.num_keyframes)]
    for source in sources:
        assert isinstance(source, WindowSource)
        assert (source.actor_dim, source.object_dim, source.num_clips, source.num_keyframes, source.num_actors) == (
            24, 40, len(LENGTHS), sum(LENGTHS), store.num_actors)
        assert source.max_nodes_per_keyframe == max(nodes)
        assert [source.steps_for_epoch(e) for e in range(4)] == [sources[0].steps_for_epoch(e) for e in range(4)]
        assert [source.padded_windows(e) for e in range(4)] == [sources[0].padded_windows(e) for e in range(4)]
        assert source.state_dict(3) == {"epoch": 0, "step": 3}
        owned: list[int] = []
        named: dict[int, tuple[str, int]] = {}
        for rank in range(2):
            padding = Padding.batch_invariant(source.max_nodes_per_keyframe)
            for batch, mine, keyframes in source.inference_batches(rank, 2, window=4, context=2, windows_per_batch=3,
                                                                   padding=padding, num_workers=0, pin_memory=False):
                owned += batch.actor_index[mine].tolist()
                for start, video_id, timestamps in keyframes:
                    for k, t in enumerate(timestamps.tolist(), start):
                        assert named.setdefault(k, (video_id, t)) == (video_id, t)
        assert sorted(owned) == list(range(store.num_actors))
        clip_of = np.repeat(np.arange(len(LENGTHS)), LENGTHS)
        assert named == {k: (VIDEO_IDS[clip_of[k]], int(store.timestamps[k])) for k in range(sum(LENGTHS))}
