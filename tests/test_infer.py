"""Inference: exactly-once predictions, one results.csv independent of ranks and window size."""

from __future__ import annotations

import csv
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import Stores, subprocess_env, torchrun_command
from stage_dist.ava import read_labelmap
from stage_dist.distributed import init_distributed
from stage_dist.evaluate import evaluate
from stage_dist.data import StoreWindowSource
from stage_dist.infer import load_model, main as infer_main
from stage_dist.inference import predict
from stage_dist.model import ModelConfig, build_model
from stage_dist.store import FeatureStore


@pytest.fixture(scope="module")
def checkpoint(tiny_stores: Stores, tmp_path_factory) -> Path:
    """A randomly initialised model saved the way the trainer saves it."""
    store = FeatureStore.open(tiny_stores.train)
    torch.manual_seed(0)
    config = ModelConfig(actor_dim=store.actor_dim, object_dim=store.object_dim)
    model = build_model("stage", config)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model_state": model.state_dict(), "model_kind": "stage", "model_config": asdict(config)}, path)
    return path


def run_infer(stores: Stores, checkpoint: Path, out: Path, *, ranks: int, window: int) -> bytes:
    args = ["--store", str(stores.val), "--checkpoint", str(checkpoint), "--out", str(out),
            "--window", str(window), "--windows-per-batch", "3", "--device", "cpu", "--workers", "0"]
    if ranks == 1:  # a plain run, world size 1 without a process group
        command = [sys.executable, "-m", "stage_dist.infer", *args]
    else:
        command = torchrun_command(ranks, "-m", "stage_dist.infer", *args)
    # Same threads per process in every run: the CPU kernels' partitioning depends on it.
    subprocess.run(command, check=True, env=subprocess_env(), timeout=180)
    return out.read_bytes()


@pytest.mark.slow
def test_results_identical_across_ranks_and_window_sizes(tiny_stores, checkpoint, tmp_path):
    reference = run_infer(tiny_stores, checkpoint, tmp_path / "r1_w6.csv", ranks=1, window=6)
    assert run_infer(tiny_stores, checkpoint, tmp_path / "r1_w2.csv", ranks=1, window=2) == reference
    assert run_infer(tiny_stores, checkpoint, tmp_path / "r2_w6.csv", ranks=2, window=6) == reference
    assert run_infer(tiny_stores, checkpoint, tmp_path / "r3_w4.csv", ranks=3, window=4) == reference


def test_every_actor_predicted_once_with_its_box(tiny_stores, checkpoint, tmp_path):
    store = FeatureStore.open(tiny_stores.val)
    out = tmp_path / "results.csv"
    run_infer(tiny_stores, checkpoint, out, ranks=1, window=5)
    rows = list(csv.reader(out.open()))
    assert len(rows) == store.num_actors * 80
    assert {int(row[6]) for row in rows} == set(range(1, 81))
    written = sorted((row[0], int(row[1]), *np.round(np.float64(row[2:6]), 3)) for row in rows[::80])
    keyframes = np.repeat(np.arange(store.num_keyframes), np.diff(store.actor_ptr))
    clips = np.searchsorted(store.clip_ptr, keyframes, side="right") - 1
    expected = sorted(
        (store.video_ids[c], int(store.timestamps[k]), *np.round(box.astype(np.float64), 3))
        for c, k, box in zip(clips, keyframes, store.read_array("actors/boxes", 0, store.num_actors))
    )
    assert [w[:2] for w in written] == [e[:2] for e in expected]
    np.testing.assert_allclose([w[2:] for w in written], [e[2:] for e in expected], atol=1.5e-3)
    keys = [(row[0], row[1], tuple(row[2:6]), int(row[6])) for row in rows]
    assert keys == sorted(keys)
    assert all(len(row[1]) == 4 for row in rows)  # AVA writes 0902


def test_predict_matches_one_window_per_clip(tiny_stores, checkpoint):
    """With context 2, a keyframe's scores equal those of the model run on its whole clip."""
    store = FeatureStore.open(tiny_stores.val)
    env = init_distributed("cpu")
    model = load_model(checkpoint, store.actor_dim, store.object_dim, torch.device("cpu")).eval()
    predictions = predict(model, StoreWindowSource(store), env, window=3, windows_per_batch=2,
                          progress=False).predictions
    from stage_dist.batch import WindowSpec, collate
    from stage_dist.model import action_logits

    whole = []
    with torch.no_grad():
        for clip, length in enumerate(store.clip_lengths):
            batch = collate([store.read_window(WindowSpec(clip, 0, int(length)))])
            whole.append(torch.sigmoid(action_logits(model(batch))).numpy())
    np.testing.assert_allclose(predictions.scores, np.concatenate(whole), atol=1e-6)


def test_labelmap_topk_and_published_checkpoint(tiny_stores, checkpoint, tmp_path):
    published = tmp_path / "published.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({"model_state": state["model_state"], "optimizer_state": {}, "epoch": 3, "iteration": 100}, published)
    out = tmp_path / "results.csv"
    labelmap = tiny_stores.dataset.labelmap
    assert infer_main(["--store", str(tiny_stores.val), "--checkpoint", str(published), "--out", str(out),
                       "--labelmap", str(labelmap), "--topk", "2", "--device", "cpu", "--workers", "0"]) == 0
    rows = list(csv.reader(out.open()))
    classes = set(read_labelmap(labelmap))
    assert {int(row[6]) for row in rows} <= classes
    per_box: dict[tuple, int] = {}
    for row in rows:
        per_box[tuple(row[:6])] = per_box.get(tuple(row[:6]), 0) + 1
    assert max(per_box.values()) <= 2
    result = evaluate(tiny_stores.dataset.splits["val"].groundtruth_csv, out, labelmap)
    assert 0.0 <= result.mean_ap <= 1.0


@pytest.mark.slow
def test_shards_give_the_same_results_csv_as_the_store(tiny_stores, checkpoint, tmp_path):
    from stage_dist.shard_format import shard_pattern, write_shards

    manifest = write_shards(FeatureStore.open(tiny_stores.val), tmp_path / "shards", max_shard_bytes=20_000)
    assert manifest["num_shards"] == 3  # a count that 2 ranks do not divide
    reference = run_infer(tiny_stores, checkpoint, tmp_path / "store.csv", ranks=1, window=6)
    out = tmp_path / "shards.csv"
    command = torchrun_command(2, "-m", "stage_dist.infer", "--shards", shard_pattern(manifest, tmp_path / "shards"),
                               "--checkpoint", str(checkpoint), "--out", str(out), "--window", "4",
                               "--device", "cpu")
    subprocess.run(command, check=True, env=subprocess_env(), timeout=180)
    assert out.read_bytes() == reference


def test_bad_input_is_one_line_naming_the_file(tiny_stores, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert infer_main(["--store", str(tiny_stores.val), "--checkpoint", str(missing), "--out",
                       str(tmp_path / "r.csv"), "--device", "cpu"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()
