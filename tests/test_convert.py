"""The converter on real files: round trips of both layouts, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from stage_dist.convert import main
from stage_dist.core.errors import EXIT_BAD_INPUT
from stage_dist.ingest.synthetic import SynthConfig, synthesize
from stage_dist.store.feature_store import FeatureStore, StoreError

REPO = Path(__file__).resolve().parents[1]
# tiny chunks and many shards, so that small data still exercises shard-parallel writing
SMALL = ["--chunk-kb", "0.1", "--min-shards", "8", "--no-progress", "--workers", "1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    config = SynthConfig(seed=0, train_clips=3, val_clips=2, keyframes_per_clip=8, actor_dim=16,
                         object_dim=32, actor_thw=(2, 2, 2))
    return synthesize(tmp_path_factory.mktemp("synth"), config)


@pytest.fixture
def split(dataset, tmp_path):
    """A private copy of the train split (tests may damage it)."""
    src = dataset.splits["train"]
    root = tmp_path / "train"
    shutil.copytree(src.actors_dir.parents[1], root)
    return type(src).under(root)


def i3d_args(paths, out) -> list[str]:
    return ["--actors-dir", str(paths.actors_dir), "--objects-file", str(paths.objects_file), "--out", str(out)]


def slowfast_args(paths, out, objects: bool = True) -> list[str]:
    args = ["--slowfast-file", str(paths.slowfast_file), "--video-list", str(paths.video_list), "--out", str(out)]
    return args + (["--objects-file", str(paths.objects_file)] if objects else [])


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    import zarr

    root = zarr.open_group(path, mode="r")
    names = ["clips/ptr", "keyframes/clip", "keyframes/timestamp", "keyframes/actor_ptr", "keyframes/object_ptr",
             "actors/features", "actors/boxes", "actors/labels", "objects/features", "objects/boxes",
             "objects/cls_prob", "actors/spatial"]
    return {n: np.asarray(root[n][:]) for n in names if n in root}


def assert_same_store(a: Path, b: Path, compare_sources: bool = True) -> None:
    arrays_a, arrays_b = store_arrays(a), store_arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        assert arrays_a[name].dtype == arrays_b[name].dtype, name
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    attrs_a, attrs_b = FeatureStore.open(a).attrs, FeatureStore.open(b).attrs
    for key in ("counts", "dims", "dtypes", "video_ids", "label_layout", "schema_version"):
        assert attrs_a[key] == attrs_b[key], key
    if compare_sources:  # the record of input files' sizes and times differs where a test changed one
        assert ({k: v for k, v in attrs_a.items() if k != "inputs"}
                == {k: v for k, v in attrs_b.items() if k != "inputs"})


def reference_i3d(paths) -> list[tuple[str, int, dict[str, np.ndarray]]]:
    """Every keyframe of an I3D source, read with h5py directly (independent of the converter)."""
    out = []
    with h5py.File(paths.objects_file, "r") as objects:
        for clip in sorted(p for p in paths.actors_dir.iterdir()):
            for file in sorted(clip.iterdir()):
                ts = int(file.stem)
                with h5py.File(file, "r") as f:
                    feats = f["features"][()]
                    rows = {"actors/features": feats.mean(axis=(2, 3, 4)), "actors/spatial": feats,
                            "actors/boxes": f["boxes"][()], "actors/labels": f["labels"][()][:, 1:]}
                key = f"{clip.name}_{ts}"
                rows.update({"objects/features": objects[f"{key}_features"][()],
                             "objects/boxes": objects[f"{key}_boxes"][()],
                             "objects/cls_prob": objects[f"{key}_cls_prob"][()]})
                out.append((clip.name, ts, rows))
    return out


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_i3d_round_trip_every_value(split, tmp_path, dtype, capsys):
    out = tmp_path / "train.zarr"
    extra = ["--keep-spatial"] if dtype == "float32" else []
    assert main(i3d_args(split, out) + SMALL + ["--dtype", dtype, "--verify"] + extra) == 0
    assert "verified 24 keyframes: 0 mismatches" in capsys.readouterr().out
    store = FeatureStore.open(out)
    reference = reference_i3d(split)
    assert store.num_keyframes == len(reference) == 24
    assert store.video_ids == sorted({v for v, _, _ in reference})
    assert store.attrs["dtypes"]["features"] == dtype and store.attrs["split"] == "train"
    zero_actor_keyframes = 0
    for k, (video_id, ts, rows) in enumerate(reference):
        window = store.read_keyframes(k, k + 1)
        assert (window.video_id, int(window.timestamps[0])) == (video_id, ts)
        np.testing.assert_array_equal(window.actor_features, rows["actors/features"].astype(dtype))
        np.testing.assert_array_equal(window.actor_boxes, rows["actors/boxes"])
        np.testing.assert_array_equal(window.actor_labels, rows["actors/labels"].astype(np.uint8))
        np.testing.assert_array_equal(window.object_features, rows["objects/features"].astype(dtype))
        np.testing.assert_array_equal(window.object_boxes, rows["objects/boxes"])
        o0, o1 = store.object_ptr[k], store.object_ptr[k + 1]
        np.testing.assert_array_equal(store.read_array("objects/cls_prob", o0, o1),
                                      rows["objects/cls_prob"].astype(dtype))
        if extra:
            a0, a1 = store.actor_ptr[k], store.actor_ptr[k + 1]
            np.testing.assert_array_equal(store.read_array("actors/spatial", a0, a1), rows["actors/spatial"])
        zero_actor_keyframes += len(window.actor_boxes) == 0
    assert zero_actor_keyframes > 0  # the synthetic data has some, and they are kept


def test_slowfast_store_equals_i3d_store(split, tmp_path, capsys):
    i3d, sf = tmp_path / "i3d.zarr", tmp_path / "sf.zarr"
    assert main(i3d_args(split, i3d) + SMALL + ["--split", "train"]) == 0
    assert main(slowfast_args(split, sf) + SMALL + ["--split", "train", "--verify"]) == 0
    assert "0 mismatches" in capsys.readouterr().out
    assert_same_store(i3d, sf, compare_sources=False)
    assert FeatureStore.open(sf).attrs["source"]["label_width"] == 80


def test_slowfast_without_objects_warns_and_has_no_objects(split, tmp_path, caplog):
    out = tmp_path / "sf.zarr"
    assert main(slowfast_args(split, out, objects=False) + SMALL) == 0
    assert "zero objects" in caplog.text
    store = FeatureStore.open(out)
    assert store.num_objects == 0 and store.num_actors > 0
    window = store.read_keyframes(0, 3)
    assert window.object_features.shape == (0, store.object_dim)
    np.testing.assert_array_equal(window.object_ptr, [0, 0, 0, 0])


def test_parallel_run_equals_serial_run(split, tmp_path):
    serial, parallel = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert main(i3d_args(split, serial) + SMALL + ["--split", "x"]) == 0
    assert main(i3d_args(split, parallel) + SMALL + ["--split", "x", "--workers", "2"]) == 0
    assert_same_store(serial, parallel)


def test_rerun_of_complete_store_does_nothing_and_other_args_refused(split, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert main(i3d_args(split, out) + SMALL) == 0
    capsys.readouterr()
    assert main(i3d_args(split, out) + SMALL) == 0
    assert "done by an earlier run" in capsys.readouterr().out
    assert main(i3d_args(split, out) + SMALL + ["--dtype", "float32"]) == EXIT_BAD_INPUT
    assert "--overwrite" in capsys.readouterr().err
    assert main(i3d_args(split, out) + SMALL + ["--dtype", "float32", "--overwrite"]) == 0
    assert FeatureStore.open(out).attrs["dtypes"]["features"] == "float32"


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_features.py"), *args],
                          capture_output=True, text=True, start_new_session=True, timeout=120)


# Runs the converter with its shard recording wrapped: once `shards` shards are recorded, the
# next finished shard SIGKILLs the whole process group (the forked workers inherit the wrapper),
# after its rows are written and before its record is.
_KILLED_CONVERTER = """
import os, sys
from stage_dist import convert
from stage_dist.ingest import conversion
record = conversion.record_shard_done
def record_or_die(out, *args, **kwargs):
    if len(list((out / "_progress").glob("*.json"))) >= {shards}:
        os.killpg(os.getpgid(0), 9)
    record(out, *args, **kwargs)
conversion.record_shard_done = record_or_die
sys.exit(convert.main(sys.argv[1:]))
"""


def _cli_killed_after(shards: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILLED_CONVERTER.format(shards=shards), *args],
                          capture_output=True, text=True, start_new_session=True, timeout=120)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(split, tmp_path):
    reference, killed = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    args = SMALL[:-2] + ["--workers", "2", "--split", "train"]
    assert main(i3d_args(split, reference) + args) == 0
    # the whole process group is SIGKILLed after the 3rd shard is written, before it is recorded
    run = _cli_killed_after(2, i3d_args(split, killed) + args)
    assert run.returncode == -signal.SIGKILL, run.stderr
    records = list((killed / "_progress").glob("*.json"))
    assert len(records) >= 2
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(killed)
    rerun = _cli(i3d_args(split, killed) + args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(records)} done by an earlier run)" in rerun.stdout
    assert not (killed / "_progress").exists()
    assert_same_store(reference, killed)


# --------------------------------------------------------------------------- bad input


def rewrite_h5(path: Path, **changes) -> None:
    """Rewrite an h5 file with some datasets replaced (None deletes one)."""
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f.keys()}
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)


def first_actor_file(paths) -> Path:
    """A keyframe file with at least two actors."""
    for file in sorted(paths.actors_dir.rglob("*.h5")):
        with h5py.File(file, "r") as f:
            if len(f["boxes"]) >= 2:
                return file
    raise AssertionError("no keyframe with two actors")


def run_bad(args: list[str], capsys) -> str:
    assert main(args) == EXIT_BAD_INPUT
    return capsys.readouterr().err


def test_truncated_actor_file(split, tmp_path, capsys):
    file = first_actor_file(split)
    file.write_bytes(file.read_bytes()[:300])
    err = run_bad(i3d_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert str(file) in err and "truncated or corrupt" in err


def test_truncated_objects_file(split, tmp_path, capsys):
    data = split.objects_file.read_bytes()
    split.objects_file.write_bytes(data[: len(data) // 2])
    err = run_bad(i3d_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert str(split.objects_file) in err and "truncated or corrupt" in err


def test_corrupt_h5(split, tmp_path, capsys):
    file = first_actor_file(split)
    raw = bytearray(file.read_bytes())
    raw[:8] = b"garbage!"  # destroy the HDF5 signature
    file.write_bytes(bytes(raw))
    err = run_bad(i3d_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert str(file) in err and "cannot open as HDF5" in err


@pytest.mark.parametrize("missing", ["features", "boxes", "labels"])
def test_actor_file_without_dataset(split, tmp_path, capsys, missing):
    file = first_actor_file(split)
    rewrite_h5(file, **{missing: None})
    err = run_bad(i3d_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert str(file) in err and f"missing dataset '{missing}'" in err


def test_label_width_not_80_or_81(split, tmp_path, capsys):
    file = first_actor_file(split)
    with h5py.File(file, "r") as f:
        labels = f["labels"][()]
    rewrite_h5(file, labels=labels[:, :79])
    err = run_bad(i3d_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert str(file) in err and "79 columns" in err


def test_row_counts_disagree(split, tmp_path, capsys):
    file = first_actor_file(split)
    with h5py.File(file, "r") as f:
        feats = f["features"][()]
    rewrite_h5(file, features=feats[:-1])
    err = run_bad(i3d_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert str(file) in err and "row counts disagree" in err and "'features'" in err


def test_object_row_counts_disagree(split, tmp_path, capsys):
    with h5py.File(split.objects_file, "a") as f:
        key = next(k for k in sorted(f.keys()) if k.endswith("_boxes") and len(f[k]) >= 2)
        boxes = f[key][()]
        del f[key]
        f[key] = boxes[:-1]
    err = run_bad(i3d_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert str(split.objects_file) in err and key[: -len("_boxes")] in err and "row counts disagree" in err


@pytest.mark.parametrize("case", ["outside", "flipped", "nan"])
def test_bad_boxes(split, tmp_path, capsys, case):
    file = first_actor_file(split)
    with h5py.File(file, "r") as f:
        boxes = f["boxes"][()]
    if case == "outside":
        boxes[1, 2] = 1.5
    elif case == "flipped":
        boxes[1, [0, 2]] = [0.8, 0.2]
    else:
        boxes[1, 0] = np.nan
    rewrite_h5(file, boxes=boxes)
    err = run_bad(i3d_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    expected = {"outside": "outside [0, 1]", "flipped": "x1 > x2", "nan": "NaN or Inf"}[case]
    assert str(file) in err and expected in err


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_features(split, tmp_path, capsys, value):
    file = first_actor_file(split)
    with h5py.File(file, "r") as f:
        feats = f["features"][()]
    feats[0, 3, 1, 0, 1] = value
    rewrite_h5(file, features=feats)
    err = run_bad(i3d_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert str(file) in err and "'features' contains NaN or Inf" in err
    with pytest.raises(StoreError, match="incomplete"):  # what was written cannot be used
        FeatureStore.open(tmp_path / "s.zarr")


def test_non_finite_object_features(split, tmp_path, capsys):
    with h5py.File(split.objects_file, "a") as f:
        key = next(k for k in sorted(f.keys()) if k.endswith("_features") and len(f[k]))
        f[key][0, 0] = np.inf
    err = run_bad(i3d_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert str(split.objects_file) in err and key in err and "NaN or Inf" in err


def test_float16_overflow_refused(split, tmp_path, capsys):
    file = first_actor_file(split)
    with h5py.File(file, "r") as f:
        feats = f["features"][()]
    feats[0, 0] = 1e6
    rewrite_h5(file, features=feats)
    err = run_bad(i3d_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert "float16 range" in err and "--dtype float32" in err
    assert main(i3d_args(split, tmp_path / "f32.zarr") + SMALL + ["--dtype", "float32"]) == 0


def test_missing_objects_error_or_empty(split, tmp_path, capsys):
    file = first_actor_file(split)
    video_id, ts = file.parent.name, int(file.stem)
    with h5py.File(split.objects_file, "a") as f:
        for suffix in ("_features", "_boxes", "_cls_prob"):
            del f[f"{video_id}_{ts}{suffix}"]
    err = run_bad(i3d_args(split, tmp_path / "a.zarr") + SMALL, capsys)
    assert str(split.objects_file) in err and f"{video_id}_{ts}_features" in err
    assert "--missing-objects empty" in err
    out = tmp_path / "b.zarr"
    assert main(i3d_args(split, out) + SMALL + ["--missing-objects", "empty", "--verify"]) == 0
    assert "keyframes without objects accepted as empty: 1" in capsys.readouterr().out
    store = FeatureStore.open(out)
    k = next(i for i in range(store.num_keyframes)
             if store.video_ids[store.keyframe_clip[i]] == video_id and store.timestamps[i] == ts)
    assert store.object_ptr[k] == store.object_ptr[k + 1]
    assert store.attrs["missing_objects_keyframes"] == 1


@pytest.mark.parametrize("bad_id", ["..", "a/b", "has space"])
def test_unsafe_clip_id_in_video_list(split, tmp_path, capsys, bad_id):
    lines = split.video_list.read_text().splitlines()
    lines[1] = bad_id
    split.video_list.write_text("\n".join(lines) + "\n")
    err = run_bad(slowfast_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert str(split.video_list) in err and "line 2" in err and "not a safe path component" in err


def test_unsafe_clip_dir_in_actors_dir(split, tmp_path, capsys):
    clip = next(split.actors_dir.iterdir())
    clip.rename(split.actors_dir / "bad:id")
    err = run_bad(i3d_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert "'bad:id'" in err and "not a safe path component" in err


def test_slowfast_bad_key_and_clip_number(split, tmp_path, capsys):
    with h5py.File(split.slowfast_file, "a") as f:
        f.create_group("999_902")
    err = run_bad(slowfast_args(split, tmp_path / "s.zarr") + SMALL, capsys)
    assert str(split.slowfast_file) in err and "'999_902'" in err and "clip number 999" in err


def test_no_source_given(tmp_path, capsys):
    err = run_bad(["--out", str(tmp_path / "s.zarr")], capsys)
    assert "--actors-dir" in err and "--slowfast-file" in err


def test_output_that_is_not_a_store_is_refused(split, tmp_path, capsys):
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    for overwrite in ([], ["--overwrite"]):
        err = run_bad(i3d_args(split, out) + SMALL + overwrite, capsys)
        assert str(out) in err and "files this project did not write (precious.txt)" in err
        assert (out / "precious.txt").read_text() == "x"


def test_verify_reports_mismatch(split, tmp_path, capsys):
    import zarr

    out = tmp_path / "s.zarr"
    assert main(i3d_args(split, out) + SMALL) == 0
    file = first_actor_file(split)
    store = FeatureStore.open(out)
    k = next(i for i in range(store.num_keyframes) if store.video_ids[store.keyframe_clip[i]] == file.parent.name
             and store.timestamps[i] == int(file.stem))
    boxes = zarr.open_group(out, mode="r+")["actors/boxes"]
    row = int(store.actor_ptr[k])
    # zarr types a selection as any of its results (a scalar here)
    boxes[row, 0] = boxes[row, 0] / 2  # type: ignore[operator]  # the store is damaged, the sources are not: the rerun only verifies
    assert main(i3d_args(split, out) + SMALL + ["--verify-sample", "1000"]) == 1
    text = capsys.readouterr().out
    assert "verified 24 keyframes: 1 mismatches" in text
    assert f"MISMATCH {file.parent.name} {int(file.stem)}: actors/boxes" in text
    meta = json.loads((out / "zarr.json").read_text())
    assert meta["attributes"]["stage_dist"]["complete"] is True


def test_objects_keys_without_leading_dash_are_accepted(split, tmp_path, capsys):
    """The published objects file drops a clip id's leading '-' (README: 5KQ66BBWC4_902_features)."""
    reference, stripped = tmp_path / "ref.zarr", tmp_path / "stripped.zarr"
    assert main(i3d_args(split, reference) + SMALL + ["--split", "train"]) == 0
    video_id = next(p.name for p in sorted(split.actors_dir.iterdir()) if p.name.startswith("-"))
    with h5py.File(split.objects_file, "a") as f:
        keys = [k for k in f.keys() if k.startswith(f"{video_id}_")]
        for key in keys:
            f.move(key, key[1:])
    assert len(keys) == 3 * 8
    capsys.readouterr()
    assert main(i3d_args(split, stripped) + SMALL + ["--split", "train", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "verified 24 keyframes: 0 mismatches" in text
    assert text.count("objects of 8 keyframes found under keys without the clip id's leading '-'") == 1
    assert "skipped: nothing" in text  # the stripped keys are used, not reported as unknown keyframes
    assert_same_store(reference, stripped)


def test_leading_dash_rule_never_takes_another_clips_objects(split):
    from stage_dist.ingest.published_hdf5 import ObjectsFile, ReaderError

    with h5py.File(split.objects_file, "a") as f:
        f["5KQ66BBWC4_902_features"] = np.zeros((1, 32), np.float32)
        f["5KQ66BBWC4_902_boxes"] = np.array([[0.1, 0.1, 0.2, 0.2]], np.float32)
    objects = ObjectsFile(split.objects_file, "error")
    objects.clip_ids = frozenset({"-5KQ66BBWC4"})
    assert objects.key_prefix("-5KQ66BBWC4", 902) == ("5KQ66BBWC4_902", True)
    assert objects.read("-5KQ66BBWC4", 902).count == 1
    objects.clip_ids = frozenset({"-5KQ66BBWC4", "5KQ66BBWC4"})  # the key is clip 5KQ66BBWC4's own
    with pytest.raises(ReaderError, match="no key -5KQ66BBWC4_902_features"):
        objects.key_prefix("-5KQ66BBWC4", 902)
    assert ObjectsFile(split.objects_file, "empty").key_prefix("--none", 902) is None


def test_format_webdataset_writes_shards_equal_to_the_store(tmp_path):
    from stage_dist.convert import main as convert_main
    from stage_dist.ingest.synthetic import SynthConfig, synthesize
    from stage_dist.store.feature_store import FeatureStore
    from stage_dist.store.tar_shards import load_manifest, read_clip_samples, shard_pattern
    from stage_dist.store.window import WindowSpec

    data = synthesize(tmp_path / "synth", SynthConfig(seed=3, train_clips=3, val_clips=1, keyframes_per_clip=6,
                                                      actor_dim=8, object_dim=16, actor_thw=(1, 1, 1)))
    paths = data.splits["train"]
    common = ["--actors-dir", str(paths.actors_dir), "--objects-file", str(paths.objects_file),
              "--workers", "1", "--no-progress"]
    assert convert_main([*common, "--out", str(tmp_path / "both.zarr"), "--format", "zarr,webdataset"]) == 0
    store = FeatureStore.open(tmp_path / "both.zarr")
    manifest = load_manifest(tmp_path / "both.shards" / "manifest.json")
    clips = list(read_clip_samples(shard_pattern(manifest, tmp_path / "both.shards")))
    assert [c.video_id for c in clips] == store.video_ids
    for clip in clips:
        expected = store.read_window(WindowSpec(clip.clip, 0, int(store.clip_lengths[clip.clip])))
        np.testing.assert_array_equal(clip.actor_features, expected.actor_features)
        np.testing.assert_array_equal(clip.object_boxes, expected.object_boxes)

    assert convert_main([*common, "--out", str(tmp_path / "only.zarr"), "--format", "webdataset",
                         "--shards-out", str(tmp_path / "only")]) == 0
    assert not (tmp_path / "only.zarr").exists()
    assert load_manifest(tmp_path / "only" / "manifest.json")["num_keyframes"] == store.num_keyframes


# --------------------------------------------------------------------------- outputs and resume


def _touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_changed_actor_file_is_converted_again(split, tmp_path, caplog):
    """Same shapes, new values and mtime: the rerun re-converts what depends on the file."""
    out = tmp_path / "s.zarr"
    assert main(i3d_args(split, out) + SMALL + ["--split", "train"]) == 0
    file = first_actor_file(split)
    with h5py.File(file, "r") as f:
        boxes, feats = f["boxes"][()], f["features"][()]
    rewrite_h5(file, boxes=boxes * 0.5, features=feats + 1)
    _touch_later(file)
    caplog.clear()
    assert main(i3d_args(split, out) + SMALL + ["--split", "train", "--verify"]) == 0
    assert str(file.parent) in caplog.text and "changed since the store was written" in caplog.text
    assert "already complete" not in caplog.text
    fresh = tmp_path / "fresh.zarr"
    assert main(i3d_args(split, fresh) + SMALL + ["--split", "train"]) == 0
    assert_same_store(fresh, out)
    store = FeatureStore.open(out)
    k = next(i for i in range(store.num_keyframes) if store.video_ids[store.keyframe_clip[i]] == file.parent.name
             and store.timestamps[i] == int(file.stem))
    np.testing.assert_array_equal(store.read_keyframes(k, k + 1).actor_boxes, boxes * 0.5)


def test_changed_objects_file_converts_objects_again(split, tmp_path, caplog):
    out = tmp_path / "s.zarr"
    assert main(i3d_args(split, out) + SMALL) == 0
    with h5py.File(split.objects_file, "a") as f:
        key = next(k for k in sorted(f.keys()) if k.endswith("_features") and len(f[k]))
        f[key][0, 0] = 7.0
    _touch_later(split.objects_file)
    caplog.clear()
    assert main(i3d_args(split, out) + SMALL + ["--verify"]) == 0  # verify: 0 mismatches, so rows are new
    assert str(split.objects_file) in caplog.text
    assert_same_store(out, _fresh(split, tmp_path), compare_sources=False)


def _fresh(split, tmp_path) -> Path:
    fresh = tmp_path / "fresh.zarr"
    assert main(i3d_args(split, fresh) + SMALL) == 0
    return fresh


def test_interrupted_run_with_changed_input_redoes_its_done_shards(split, tmp_path):
    out = tmp_path / "killed.zarr"
    args = SMALL[:-2] + ["--workers", "2"]
    run = _cli_killed_after(2, i3d_args(split, out) + args)
    assert run.returncode == -signal.SIGKILL, run.stderr
    with h5py.File(split.objects_file, "a") as f:
        key = next(k for k in sorted(f.keys()) if k.endswith("_features") and len(f[k]))
        f[key][0, 0] = -3.0
    _touch_later(split.objects_file)
    rerun = _cli(i3d_args(split, out) + args)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_store(out, _fresh(split, tmp_path), compare_sources=False)


def test_overwrite_keeps_the_directory_and_its_mode(split, tmp_path):
    out = tmp_path / "s.zarr"
    assert main(i3d_args(split, out) + SMALL) == 0
    os.chmod(out, 0o2750)
    inode = out.stat().st_ino
    assert main(i3d_args(split, out) + SMALL + ["--dtype", "float32", "--overwrite"]) == 0
    assert out.stat().st_ino == inode and (out.stat().st_mode & 0o7777) == 0o2750
    assert FeatureStore.open(out).attrs["dtypes"]["features"] == "float32"


def test_symlinked_out_writes_into_its_target(split, tmp_path):
    target = tmp_path / "disk" / "s.zarr"
    target.parent.mkdir()
    link = tmp_path / "link.zarr"
    link.symlink_to(target)
    assert main(i3d_args(split, link) + SMALL) == 0
    assert main(i3d_args(split, link) + SMALL + ["--dtype", "float32", "--overwrite"]) == 0
    assert link.is_symlink() and FeatureStore.open(target).attrs["dtypes"]["features"] == "float32"


def test_stale_lock_of_a_dead_converter_is_taken_over(split, tmp_path, caplog):
    import socket

    from stage_dist.core.outputs import lock_path

    out = tmp_path / "s.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "time": 0}))
    assert main(i3d_args(split, out) + SMALL) == 0
    assert f"lock left by pid {pid}" in caplog.text and "no longer running" in caplog.text
    assert not lock.exists()  # released: removed


def test_keyframe_files_are_read_under_their_listed_names(split, tmp_path, capsys):
    """A file listed as 00902.h5 is read as such, and a file gone since the listing is named as
    listed (0902.h5), not as a guessed 902.h5."""
    from stage_dist.ingest.published_hdf5 import I3DReader, ReaderError

    reference = _fresh(split, tmp_path)
    file = first_actor_file(split)
    renamed = file.with_name(f"0{file.name}")
    file.rename(renamed)
    out = tmp_path / "renamed.zarr"
    assert main(i3d_args(split, out) + SMALL) == 0
    assert_same_store(reference, out, compare_sources=False)

    source = I3DReader(split.actors_dir, split.objects_file)
    source.list_keyframes()
    other = next(p for p in sorted(split.actors_dir.rglob("*.h5")) if p != renamed)
    other.unlink()
    with pytest.raises(ReaderError, match=f"{other}: file not found"):
        source.read_actors(other.parent.name, int(other.stem))


def test_boxes_within_the_tolerance_are_clipped_and_counted(split, tmp_path, capsys):
    file = first_actor_file(split)
    with h5py.File(file, "r") as f:
        boxes = f["boxes"][()]
    boxes[0, 2], boxes[1, 0] = 1.004, -0.003
    rewrite_h5(file, boxes=boxes)
    out = tmp_path / "s.zarr"
    assert main(i3d_args(split, out) + SMALL + ["--verify"]) == 0
    text = capsys.readouterr().out
    assert "box coordinates clipped into [0, 1] (within --box-tolerance 0.01): 2" in text
    assert "0 mismatches" in text
    store = FeatureStore.open(out)
    stored = store.read_array("actors/boxes", 0, store.num_actors)
    assert stored.min() >= 0 and stored.max() <= 1
    expected = np.clip(boxes, 0, 1)
    assert any(np.array_equal(stored[i: i + len(expected)], expected) for i in range(len(stored)))
    err = run_bad(i3d_args(split, tmp_path / "t.zarr") + SMALL + ["--box-tolerance", "0.001"], capsys)
    assert str(file) in err and "--box-tolerance" in err


def test_verify_sample_reads_only_the_sampled_rows(split, tmp_path, monkeypatch):
    """--verify-sample N costs O(N): counted as rows read from the store's row arrays."""
    import zarr

    from stage_dist.ingest import conversion as conv

    out = tmp_path / "s.zarr"
    assert main(i3d_args(split, out) + SMALL) == 0
    store = FeatureStore.open(out, cache_mb=0)
    source = conv.open_feature_reader(conv.ConvertConfig(out=out, split="train", actors_dir=split.actors_dir,
                                                  objects_file=split.objects_file))
    source.list_keyframes()
    rows_read: list[int] = []
    original_get, original_sel = zarr.Array.__getitem__, zarr.Array.get_orthogonal_selection

    def getitem(self, key):
        values = original_get(self, key)
        rows_read.append(len(values) if np.ndim(values) else 1)  # type: ignore[arg-type]  # an array when ndim > 0
        return values

    def selection(self, key, *args, **kwargs):
        values = original_sel(self, key, *args, **kwargs)
        rows_read.append(len(values))  # type: ignore[arg-type]  # an orthogonal selection is an array
        return values

    monkeypatch.setattr(zarr.Array, "__getitem__", getitem)
    monkeypatch.setattr(zarr.Array, "get_orthogonal_selection", selection)
    monkeypatch.setattr(FeatureStore, "_load_window_arrays", lambda *a: pytest.fail("verify loaded whole arrays"))
    runner = conv.Runner(1)
    for sample in (1, 4):
        rows_read.clear()
        checked, problems = conv.verify(store, source, False, runner, sample=sample, seed=sample)
        assert checked == sample and problems == []
        ks = np.sort(np.random.default_rng(sample).choice(store.num_keyframes, size=sample, replace=False))
        actors = sum(int(store.actor_ptr[k + 1] - store.actor_ptr[k]) for k in ks)
        objects = sum(int(store.object_ptr[k + 1] - store.object_ptr[k]) for k in ks)
        # each row array read once, just the sampled keyframes' rows
        assert sum(rows_read) == 3 * actors + 3 * objects, (rows_read, actors, objects)
    assert store.num_actors + store.num_objects > 10 * (actors + objects) / 4


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_streamed_shards_read_back_as_zarr_writes_them(tmp_path, compression):
    """The converter's chunk-at-a-time shard writer against zarr's own writer: same values,
    including a last shard and chunk cut by the array's end and a 5-d array."""
    import zarr

    from stage_dist.store.feature_store import _compressors
    from stage_dist.store.zarr_shards import ShardStreamWriter

    rng = np.random.default_rng(0)
    root = zarr.open_group(tmp_path / "s", mode="w", zarr_format=3)
    for name, shape, chunks, shards in (("a", (203, 7), 16, 64), ("b", (100, 3, 2, 2, 2), 4, 8)):
        values = rng.standard_normal(shape).astype(np.float16)
        streamed = root.create_array(name, shape=shape, dtype="float16", chunks=(chunks, *shape[1:]),
                                     shards=(shards, *shape[1:]), compressors=_compressors(compression), fill_value=0)
        reference = root.create_array(f"{name}_ref", shape=shape, dtype="float16", chunks=(chunks, *shape[1:]),
                                      shards=(shards, *shape[1:]), compressors=_compressors(compression), fill_value=0)
        assert ShardStreamWriter.supports(streamed, tmp_path / "s")
        for start in range(0, shape[0], shards):  # one writer per shard, rows in uneven pieces
            stop = min(start + shards, shape[0])
            writer = ShardStreamWriter(streamed, tmp_path / "s", start, stop)
            cuts = sorted({start, stop, *rng.integers(start, stop, 3).tolist()})
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                writer.append(values[lo:hi])
            writer.close(name)
        reference[:] = values
        np.testing.assert_array_equal(zarr.open_group(tmp_path / "s", mode="r")[name][:], values)
        np.testing.assert_array_equal(reference[:], values)
        np.testing.assert_array_equal(streamed[17:150], values[17:150])


def test_programming_error_keeps_its_traceback(split, tmp_path, monkeypatch):
    """Only the project's input/output errors become one-line exit-2 messages."""
    from stage_dist.ingest import conversion as conv

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(conv, "make_plan", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(i3d_args(split, tmp_path / "s.zarr") + SMALL)
    assert not (tmp_path / "s.zarr").exists()  # the run's new directory is not left behind


def test_second_converter_on_the_same_out_stops_at_once(split, tmp_path, monkeypatch, capsys):
    """While one conversion runs (here: paused in its scan), a second one on the same --out
    exits 2 at once naming the holder; the first then finishes a correct store."""
    from stage_dist.ingest import conversion as conv

    out = tmp_path / "s.zarr"
    real_make_plan = conv.make_plan
    second: dict[str, Any] = {}

    def make_plan_with_a_rival(*args, **kwargs):
        if not second:
            second["code"] = main(i3d_args(split, out) + SMALL)
            second["err"] = capsys.readouterr().err
        return real_make_plan(*args, **kwargs)

    monkeypatch.setattr(conv, "make_plan", make_plan_with_a_rival)
    assert main(i3d_args(split, out) + SMALL + ["--verify"]) == 0
    assert second["code"] == EXIT_BAD_INPUT
    assert f"another process is writing it (pid {os.getpid()} on" in second["err"]
    assert len(second["err"].strip().splitlines()) == 1 and str(out) in second["err"]
    assert "0 mismatches" in capsys.readouterr().out


def test_changed_slowfast_file_converts_actors_again(split, tmp_path, caplog):
    out = tmp_path / "sf.zarr"
    assert main(slowfast_args(split, out) + SMALL) == 0
    with h5py.File(split.slowfast_file, "a") as f:
        key = next(k for k in sorted(f.keys()) if len(f[k]["features"]))
        f[key]["features"][0, 0] = 5.0
    _touch_later(split.slowfast_file)
    caplog.clear()
    assert main(slowfast_args(split, out) + SMALL + ["--verify"]) == 0
    assert str(split.slowfast_file.resolve()) in caplog.text and "converting the" in caplog.text
    fresh = tmp_path / "fresh.zarr"
    assert main(slowfast_args(split, fresh) + SMALL) == 0
    assert_same_store(out, fresh, compare_sources=False)


# --------------------------------------------------------------------------- rerun by stats, faults


def _summary_lines(text: str) -> list[str]:
    """The summary without what differs between a first run and a rerun (bytes read, seconds,
    shards resumed, phase times)."""
    return [line for line in text.splitlines() if not line.startswith(("MB in", "shards ", "seconds by"))]


@pytest.mark.parametrize("layout", ["i3d", "slowfast"])
def test_rerun_of_unchanged_store_opens_no_source_file(split, tmp_path, capsys, caplog, layout):
    """A complete store whose sources kept their sizes and mtimes: the rerun compares the recorded
    stats only (no HDF5 open) and reports what the first run did; --verify still reads the sources."""
    from tests.counting import count_h5_opens

    caplog.set_level("INFO", logger="stage_dist.convert")
    out = tmp_path / "s.zarr"
    args = (i3d_args(split, out) if layout == "i3d" else slowfast_args(split, out)) + SMALL
    assert main(args) == 0
    first = capsys.readouterr().out
    shards = int(next(line for line in first.splitlines() if line.startswith("shards ")).split()[1])
    with count_h5_opens() as opened:
        assert main(args) == 0
    rerun = capsys.readouterr().out
    assert opened == []
    assert "store already complete, nothing to convert" in caplog.text
    assert f"shards {shards} ({shards} done by an earlier run)" in rerun
    assert _summary_lines(rerun) == _summary_lines(first)
    mb_in = next(line for line in first.splitlines() if line.startswith("MB in")).split()[2]
    assert f"MB in {mb_in}  MB read 0.0" in rerun
    with count_h5_opens() as opened:
        assert main(args + ["--verify"]) == 0
    assert opened and "verified 24 keyframes: 0 mismatches" in capsys.readouterr().out


def test_rerun_by_stats_still_sees_touched_and_added_files(split, tmp_path, capsys, caplog):
    """A touched actor file (same bytes, new mtime) is found by its stat and its shards are converted
    again (the next rerun opens nothing); an added keyframe file is another plan (refused)."""
    from tests.counting import count_h5_opens

    out = tmp_path / "s.zarr"
    args = i3d_args(split, out) + SMALL + ["--split", "train"]
    assert main(args) == 0
    capsys.readouterr()
    file = first_actor_file(split)
    _touch_later(file)
    caplog.clear()
    with count_h5_opens() as opened:
        assert main(args) == 0
    assert str(file) in opened
    assert str(file.parent) in caplog.text and "changed since the store was written" in caplog.text
    resumed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("shards "))
    total, earlier = int(resumed.split()[1]), int(resumed.split()[2].lstrip("("))
    assert 0 < total - earlier < total  # some shards converted again, not all
    assert_same_store(_fresh(split, tmp_path), out, compare_sources=False)
    with count_h5_opens() as opened:
        assert main(args) == 0
    assert opened == []
    shutil.copy(file, file.with_name("9999.h5"))
    assert main(args) == EXIT_BAD_INPUT  # the new file is scanned: its keyframe has no objects
    assert "9999" in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only; skipped where it cannot be mounted), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _partial_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]


@pytest.mark.parametrize("free_fraction,workers", [(0.1, 1), (0.6, 1), (0.6, 2)])
def test_disk_full_during_conversion_exits_2_and_resumes(split, tmp_path, small_disk, capsys, free_fraction, workers):
    """ENOSPC at creation or mid-shards: one line naming --out and the reason, exit 2, no partial
    file left, the finished shards kept; with space freed the rerun completes the same store."""
    reference = tmp_path / "ref.zarr"
    args = SMALL[:-2] + ["--workers", str(workers), "--split", "train"]
    assert main(i3d_args(split, reference) + args) == 0
    need = sum(-(-f.stat().st_size // 4096) * 4096 for f in reference.rglob("*") if f.is_file())
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - int(need * free_fraction)))
    out = small_disk / "s.zarr"
    capsys.readouterr()
    assert main(i3d_args(split, out) + args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"convert_features: error: {out}: cannot write --out: ")
    assert "No space left on device" in err and "rerun the same command to resume" in err
    assert not out.exists() or _partial_files(out) == []  # at creation: the directory made by the run is removed
    with pytest.raises(StoreError, match="incomplete|not a stage_dist feature store"):
        FeatureStore.open(out)
    done = len(list((out / "_progress").glob("*.json")))
    if free_fraction > 0.5:
        assert done > 0  # stopped mid-shards, with finished shards recorded
    filler.unlink()
    assert main(i3d_args(split, out) + args + ["--verify"]) == 0
    text = capsys.readouterr().out
    assert f"({done} done by an earlier run)" in text and "verified 24 keyframes: 0 mismatches" in text
    assert_same_store(reference, out)


# Runs the converter with its shard recording wrapped: once `shards` shards are recorded, the next
# finished shard sends `signal` to the converter's main process (or, with `group`, to its whole process
# group, as a terminal's Ctrl-C does); the conversion goes on until the signal is handled.
_SIGNALLED_CONVERTER = """
import os, signal, sys
from stage_dist import convert
from stage_dist.ingest import conversion
record, main_pid, sent = conversion.record_shard_done, os.getpid(), []
def record_and_signal(out, *args, **kwargs):
    if not sent and len(list((out / "_progress").glob("*.json"))) >= {shards}:
        sent.append(1)
        (os.killpg(os.getpgid(0), {signum}) if {group} else os.kill(main_pid, {signum}))
    record(out, *args, **kwargs)
conversion.record_shard_done = record_and_signal
sys.exit(convert.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum,group,workers", [(signal.SIGTERM, False, 2), (signal.SIGINT, True, 2),
                                                  (signal.SIGTERM, False, 1)])
def test_sigterm_or_sigint_mid_conversion_leaves_a_resumable_store(split, tmp_path, signum, group, workers):
    from stage_dist.core.outputs import lock_path

    reference, out = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    args = SMALL[:-2] + ["--workers", str(workers), "--split", "train"]
    assert main(i3d_args(split, reference) + args) == 0
    script = _SIGNALLED_CONVERTER.format(shards=2, signum=int(signum), group=group)
    run = subprocess.run([sys.executable, "-c", script, *i3d_args(split, out), *args], capture_output=True,
                         text=True, start_new_session=True, timeout=120, check=False)
    assert run.returncode == 128 + signum, run.stderr
    assert f"stopped by {signal.Signals(signum).name}" in run.stderr and "Traceback" not in run.stderr
    assert not lock_path(out).exists() and _partial_files(out) == []
    records = list((out / "_progress").glob("*.json"))
    assert len(records) >= 2
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(out)
    rerun = _cli(i3d_args(split, out) + args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(records)} done by an earlier run)" in rerun.stdout
    assert_same_store(reference, out)
