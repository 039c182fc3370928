"""Tests of stage_dist.synth: determinism, both layouts and their consistency, AVA formats,
val false positives, the CLI, and that the graph-only classes are learnable only from context."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from stage_dist import synth
from stage_dist.ingest import synthetic
from stage_dist.ingest.synthetic import SynthConfig, SynthDataset, synthesize

FIXTURE_LABELMAP = Path(__file__).resolve().parent / "fixtures/ava/ava_action_list_v2.1_for_activitynet_2018.pbtxt"
SMALL = SynthConfig(
    seed=3,
    train_clips=5,
    val_clips=3,
    keyframes_per_clip=12,
    actor_dim=16,
    actor_thw=(2, 3, 2),  # 12 cells: the exact-mean property must not need a power of two
    object_dim=24,
    max_objects=5,
    num_classes=9,
    val_false_positives=0.3,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SynthDataset:
    return synthesize(tmp_path_factory.mktemp("small") / "data", SMALL)


def read_labelmap(path: Path) -> dict[int, str]:
    text = path.read_text()
    return {int(i): n for n, i in re.findall(r'item\s*{\s*name:\s*"([^"]*)"\s*id:\s*(\d+)\s*}', text)}


def read_video_list(path: Path) -> list[str]:
    return path.read_text().splitlines()


def read_groundtruth(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def keyframes(dataset: SynthDataset, split: str) -> list[tuple[int, str, int]]:
    """(clip_number, video_id, timestamp) of every keyframe, from videos.txt and the I3D files."""
    paths = dataset.splits[split]
    out = []
    for number, video_id in enumerate(read_video_list(paths.video_list)):
        for file in sorted((paths.actors_dir / video_id).iterdir()):
            out.append((number, video_id, int(file.stem)))
    return out


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4)."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_same_seed_same_bytes_and_arrays(tmp_path: Path, small: SynthDataset) -> None:
    again = synthesize(tmp_path / "again", SMALL)
    other = synthesize(tmp_path / "other", SynthConfig(**{**SMALL.__dict__, "seed": 4}))
    for rel in ["labelmap.pbtxt", "synth.json"] + [
        f"{s}/{p}" for s in ("train", "val") for p in ("groundtruth.csv", "slowfast/videos.txt")
    ]:
        assert (small.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel
    files = sorted(p.relative_to(small.root) for p in small.root.rglob("*.h5"))
    assert files == sorted(p.relative_to(again.root) for p in again.root.rglob("*.h5"))
    assert len(files) == (5 + 3) * 12 + 4
    for h5 in files:
        a, b = h5_arrays(small.root / h5), h5_arrays(again.root / h5)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), (h5, key)
        assert (small.root / h5).read_bytes() == (again.root / h5).read_bytes(), h5
    assert (small.root / "train/groundtruth.csv").read_bytes() != (
        other.root / "train/groundtruth.csv"
    ).read_bytes()


def test_layouts_hold_the_same_actors(small: SynthDataset) -> None:
    cfg = SMALL
    for split, paths in small.splits.items():
        with h5py.File(paths.slowfast_file) as sf, h5py.File(paths.objects_file) as objects:
            frames = keyframes(small, split)
            assert len(frames) == cfg.keyframes_per_clip * (cfg.train_clips if split == "train" else cfg.val_clips)
            assert set(sf) == {f"{n}_{ts}" for n, _, ts in frames}
            assert set(objects) == {f"{v}_{ts}_{k}" for _, v, ts in frames for k in ("features", "boxes", "cls_prob")}
            for number, video_id, ts in frames:
                with h5py.File(paths.actors_dir / video_id / f"{ts:04d}.h5") as f:
                    features, boxes, labels = f["features"][()], f["boxes"][()], f["labels"][()]
                n = len(boxes)
                assert features.shape == (n, cfg.actor_dim, *cfg.actor_thw) and features.dtype == np.float32
                assert boxes.shape == (n, 4) and boxes.dtype == np.float32
                assert labels.shape == (n, 81) and labels.dtype == np.float32
                group = sf[f"{number}_{ts}"]
                pooled = group["features"][()]
                assert pooled.shape == (n, cfg.actor_dim) and pooled.dtype == np.float32
                # exact in any summation order: numpy float32, float64, torch
                assert np.array_equal(features.mean(axis=(2, 3, 4)), pooled)
                assert np.array_equal(features.astype(np.float64).mean(axis=(2, 3, 4)), pooled)
                assert np.array_equal(torch.from_numpy(features).mean(dim=(2, 3, 4)).numpy(), pooled)
                assert np.array_equal(group["boxes"][()], boxes)
                assert np.array_equal(group["labels"][()], labels[:, 1:])
                assert np.array_equal(labels[:, 0], (labels[:, 1:].sum(1) == 0).astype(np.float32))
                m = len(objects[f"{video_id}_{ts}_boxes"])
                assert m <= cfg.max_objects
                assert objects[f"{video_id}_{ts}_features"].shape == (m, cfg.object_dim)
                assert objects[f"{video_id}_{ts}_cls_prob"].shape == (m, 81)
                if m:
                    np.testing.assert_allclose(objects[f"{video_id}_{ts}_cls_prob"][()].sum(1), 1, rtol=1e-5)


def test_key_and_file_name_formats(small: SynthDataset) -> None:
    paths = small.splits["train"]
    video_id = read_video_list(paths.video_list)[0]
    assert sorted(p.name for p in (paths.actors_dir / video_id).iterdir())[:2] == ["0902.h5", "0903.h5"]
    with h5py.File(paths.objects_file) as objects:
        assert f"{video_id}_902_features" in objects and f"{video_id}_0902_features" not in objects
    with h5py.File(paths.slowfast_file) as sf:
        assert "0_902" in sf and "0_913" in sf and "0_914" not in sf


def test_video_ids_are_ava_like_and_lists_unsorted(small: SynthDataset) -> None:
    train = read_video_list(small.splits["train"].video_list)
    val = read_video_list(small.splits["val"].video_list)
    ids = train + val
    assert len(set(ids)) == len(ids) == 8
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{11}", v) for v in ids)
    assert any(v.startswith("-") and "_" in v for v in ids)
    assert any(v.startswith("_") and "-" in v for v in ids)
    assert any(re.search(r"_\d{3}$", v) for v in ids)  # only splitting keys from the right works
    for listed, split in ((train, "train"), (val, "val")):
        assert listed != sorted(listed)
        assert sorted(listed) == sorted(p.name for p in small.splits[split].actors_dir.iterdir())
    make_video_ids = synthetic.make_video_ids
    assert make_video_ids(np.random.default_rng(0), 40) == make_video_ids(np.random.default_rng(0), 40)


def test_boxes_valid_and_moving_smoothly(small: SynthDataset) -> None:
    for split, paths in small.splits.items():
        arrays = h5_arrays(paths.objects_file)
        boxes = [a for k, a in arrays.items() if k.endswith("_boxes")]
        boxes += [h5_arrays(p)["boxes"] for p in paths.actors_dir.rglob("*.h5")]
        allb = np.concatenate(boxes)
        assert ((allb >= 0) & (allb <= 1)).all()
        assert (allb[:, 0] < allb[:, 2]).all() and (allb[:, 1] < allb[:, 3]).all()
    tracks: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}
    for row in read_groundtruth(small.splits["train"].groundtruth_csv):
        if len(row) == 8:
            tracks.setdefault((row[0], row[7]), []).append((int(row[1]), np.array(row[2:6], float)))
    steps = [
        np.abs(b2 - b1).max()
        for track in tracks.values()
        for (t1, b1), (t2, b2) in zip(track, track[1:])
        if t2 == t1 + 1
    ]
    assert steps and max(steps) < 0.1


def test_groundtruth_csv(small: SynthDataset) -> None:
    labelmap = read_labelmap(small.labelmap)
    for split, paths in small.splits.items():
        rows = read_groundtruth(paths.groundtruth_csv)
        assert {len(r) for r in rows} == {2, 8}
        assert all(re.fullmatch(r"\d{4}", r[1]) for r in rows)
        per_frame: dict[tuple[str, int], list[list[str]]] = {}
        for r in rows:
            per_frame.setdefault((r[0], int(r[1])), []).append(r)
        assert set(per_frame) == {(v, ts) for _, v, ts in keyframes(small, split)}
        for (video_id, ts), frame_rows in per_frame.items():
            full = [r for r in frame_rows if len(r) == 8]
            assert len(full) == len(frame_rows) or len(frame_rows) == 1  # a 2-column row stands alone
            assert all(int(r[6]) in labelmap for r in full)
            assert all(re.fullmatch(r"\d\.\d{3}", x) for r in full for x in r[2:6])
            with h5py.File(paths.actors_dir / video_id / f"{ts:04d}.h5") as f:
                boxes, labels = f["boxes"][()], f["labels"][()]
            if split == "train":  # actor rows are the true boxes, with the GT's actions
                for r in full:
                    match = np.flatnonzero(np.all(np.abs(boxes - np.array(r[2:6], np.float32)) < 1e-6, axis=1))
                    assert len(match) == 1 and labels[match[0], int(r[6])] == 1
                assert sum(len(np.flatnonzero(row[1:])) for row in labels) == len(full)
        empty = [k for k, rs in per_frame.items() if len(rs[0]) == 2]
        assert empty, f"{split} has no 2-column (empty keyframe) rows"


def test_val_has_jittered_detections_and_false_positives(small: SynthDataset) -> None:
    false_positives = jittered = 0
    paths = small.splits["val"]
    gt: dict[tuple[str, int], np.ndarray] = {}
    for r in read_groundtruth(paths.groundtruth_csv):
        gt.setdefault((r[0], int(r[1])), np.zeros((0, 4)))
        if len(r) == 8:
            gt[(r[0], int(r[1]))] = np.vstack([gt[(r[0], int(r[1]))], np.array(r[2:6], float)])
    for _, video_id, ts in keyframes(small, "val"):
        with h5py.File(paths.actors_dir / video_id / f"{ts:04d}.h5") as f:
            boxes, labels = f["boxes"][()], f["labels"][()]
        truth = gt[(video_id, ts)]
        best = iou(boxes.astype(float), truth).max(1) if len(truth) else np.zeros(len(boxes))
        labelled = labels[:, 1:].sum(1) > 0
        assert (best[labelled] >= 0.5).all()
        jittered += int(((best > 0.5) & (best < 0.999)).sum())
        fp = (best < 0.5) & ~labelled
        assert (labels[fp, 0] == 1).all()
        false_positives += int(fp.sum())
    assert false_positives >= 5 and jittered >= 20
    assert small.counts["val"].false_positives >= false_positives
    assert small.counts["train"].false_positives == 0


def test_zero_actor_and_zero_object_keyframes(small: SynthDataset) -> None:
    for split, paths in small.splits.items():
        actors = [len(h5_arrays(p)["boxes"]) for p in paths.actors_dir.rglob("*.h5")]
        objects = [len(a) for k, a in h5_arrays(paths.objects_file).items() if k.endswith("_boxes")]
        assert 0 < actors.count(0) < len(actors) / 4, split
        assert max(actors) <= SMALL.max_actors + (0 if split == "train" else 10)
        assert 0 < objects.count(0) < len(objects) / 2, split


def test_labelmap_uses_real_ava_names(small: SynthDataset) -> None:
    ours = read_labelmap(small.labelmap)
    assert len(ours) == SMALL.num_classes
    assert {a.id for a in small.actions} == set(ours)
    assert {a.kind for a in small.actions} == {"direct", "object", "interaction"}
    every = synthetic.choose_actions(synthetic.MAX_CLASSES)
    assert len({a.id for a in every}) == synthetic.MAX_CLASSES == 60
    # the 60 evaluated AVA v2.1 classes, names verbatim
    assert read_labelmap(FIXTURE_LABELMAP) == {a.id: a.name for a in every}


def test_cli_writes_summary_and_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--train-clips", "2", "--val-clips", "1", "--keyframes-per-clip", "4",
            "--actor-dim", "8", "--object-dim", "8", "--actor-thw", "1", "2", "2", "--num-classes", "4"]
    assert synth.main(argv) == 0
    printed = capsys.readouterr().out
    assert "train: 2 clips, 8 keyframes" in printed and "val: 1 clips, 4 keyframes" in printed
    with h5py.File(next((out / "train/i3d/actors").rglob("*.h5"))) as f:
        assert f["features"].shape[1:] == (8, 1, 2, 2)
    assert synth.main(argv) == 0  # a previous output is replaced
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        synth.main(["--out", str(tmp_path / "bad"), "--num-classes", "61"])
    assert exit_info.value.code == 2
    assert "--num-classes (num_classes): invalid value 61" in capsys.readouterr().err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    assert synth.main(["--out", str(tmp_path / "foreign")]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- learnability


def context_features(dataset: SynthDataset, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per actor row: own pooled feature, and graph-like context (distance-weighted mean of the
    actors and objects of keyframes t-1..t+1, max of the other actors of keyframe t)."""
    paths, ids = dataset.splits[split], np.array(sorted(a.id for a in dataset.actions))
    rows: dict[str, list[np.ndarray]] = {"own": [], "context": []}
    labels = []
    with h5py.File(paths.slowfast_file) as sf, h5py.File(paths.objects_file) as objects:
        video_ids = read_video_list(paths.video_list)
        frames = {}
        for key in sf:
            number, ts = key.rsplit("_", 1)
            vid = video_ids[int(number)]
            frames[(vid, int(ts))] = (
                sf[key]["features"][()], sf[key]["boxes"][()], sf[key]["labels"][()],
                objects[f"{vid}_{ts}_features"][()], objects[f"{vid}_{ts}_boxes"][()],
            )
    centre = lambda b: (b[:, :2] + b[:, 2:]) / 2  # noqa: E731
    for (vid, ts), (feats, boxes, labs, _, _) in frames.items():
        near = [frames[(vid, t)] for t in (ts - 1, ts, ts + 1) if (vid, t) in frames]
        all_actors = np.concatenate([f[0] for f in near])
        all_actor_c = np.concatenate([centre(f[1]) for f in near])
        all_objects = np.concatenate([f[3] for f in near])
        all_object_c = np.concatenate([centre(f[4]) for f in near])
        for i in range(len(feats)):
            c = centre(boxes[i : i + 1])
            wa = np.exp(-10 * np.linalg.norm(all_actor_c - c, axis=1))
            wo = np.exp(-10 * np.linalg.norm(all_object_c - c, axis=1))
            others = np.delete(feats, i, axis=0)
            rows["own"].append(feats[i])
            rows["context"].append(np.concatenate([
                wa @ all_actors / wa.sum(),
                wo @ all_objects / wo.sum() if len(wo) else np.zeros(all_objects.shape[1]),
                others.max(0) if len(others) else np.zeros(feats.shape[1]),
            ]))
            labels.append(labs[i, ids - 1])
    return {k: np.stack(v).astype(np.float32) for k, v in rows.items()}, np.stack(labels)


def average_precision(score: np.ndarray, truth: np.ndarray) -> float:
    hits = truth[np.argsort(-score, kind="stable")]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def logistic_regression_ap(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                           y_val: np.ndarray) -> np.ndarray:
    torch.manual_seed(0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xv = torch.from_numpy((x_train - mean) / std), torch.from_numpy((x_val - mean) / std)
    yt = torch.from_numpy(y_train)
    linear = torch.nn.Linear(xt.shape[1], yt.shape[1])
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(linear(xt), yt).backward()
        optimizer.step()
    with torch.no_grad():
        scores = linear(xv).numpy()
    return np.array([average_precision(scores[:, j], y_val[:, j]) for j in range(y_val.shape[1])])


def test_object_and_interaction_classes_need_the_graph(tmp_path: Path) -> None:
    dataset = synthesize(tmp_path / "default", SynthConfig(train_clips=12, val_clips=4))
    x_train, y_train = context_features(dataset, "train")
    x_val, y_val = context_features(dataset, "val")
    own = logistic_regression_ap(x_train["own"], y_train, x_val["own"], y_val)
    both = logistic_regression_ap(
        np.hstack([x_train["own"], x_train["context"]]), y_train,
        np.hstack([x_val["own"], x_val["context"]]), y_val,
    )
    prior = y_val.mean(0)
    kinds = np.array([a.kind for a in sorted(dataset.actions)])
    direct = kinds == "direct"
    assert (own[direct] > prior[direct] + 0.2).all()  # visible in the actor's own feature
    for kind in ("object", "interaction"):  # invisible without context, visible with it
        mask = kinds == kind
        assert own[mask].mean() < prior[mask].mean() + 0.08, kind
        assert both[mask].mean() > own[mask].mean() + 0.15, kind
