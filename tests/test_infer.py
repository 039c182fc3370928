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

from stage_dist.ava.evaluation import evaluate
from stage_dist.ava.formats import read_labelmap
from stage_dist.data.store_windows import StoreWindowSource
from stage_dist.engine.checkpoint import load_model
from stage_dist.engine.distributed import init_distributed
from stage_dist.engine.inference import predict
from stage_dist.infer import main as infer_main
from stage_dist.model.stage import ModelConfig, build_model
from stage_dist.store.feature_store import FeatureStore
from tests.conftest import Stores, subprocess_env, torchrun_command


def save_random_model(path: Path, store: FeatureStore, seed: int, kind: str = "stage", **config) -> Path:
    """A randomly initialised model saved the way the trainer saves it."""
    torch.manual_seed(seed)
    model_config = ModelConfig(actor_dim=store.actor_dim, object_dim=store.object_dim, **config)
    model = build_model(kind, model_config)
    torch.save({"model_state": model.state_dict(), "model_kind": kind, "model_config": asdict(model_config)}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tiny_stores: Stores, tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("ckpt") / "model.pt", FeatureStore.open(tiny_stores.train), 0)


@pytest.fixture(scope="module")
def second_checkpoint(tiny_stores: Stores, tmp_path_factory) -> Path:
    """Another model for ensembles: the no-graph baseline (same outputs and features), other weights."""
    return save_random_model(tmp_path_factory.mktemp("ckpt") / "baseline.pt", FeatureStore.open(tiny_stores.train), 1,
                             kind="baseline")


def run_infer(stores: Stores, checkpoint: Path | list[Path], out: Path, *, ranks: int, window: int) -> bytes:
    checkpoints = checkpoint if isinstance(checkpoint, list) else [checkpoint]
    args = ["--store", str(stores.val), "--checkpoint", *map(str, checkpoints), "--out", str(out),
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
    # np.float64 of a list of strings is an array of them, parsed (numpy's stubs type only the scalar)
    written = sorted((row[0], int(row[1]), *np.round(np.float64(row[2:6]), 3)) for row in rows[::80])  # type: ignore[arg-type, misc]
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
    from stage_dist.data.batch import collate
    from stage_dist.model.stage import action_logits
    from stage_dist.store.window import WindowSpec

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
    from stage_dist.store.tar_shards import shard_pattern, write_shards

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


# -- ensembles ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_ensemble_results_identical_across_ranks_and_window_sizes(tiny_stores, checkpoint, second_checkpoint,
                                                                  tmp_path):
    """An ensemble of 2 writes the same bytes for any ranks and window size, and they are the mean
    of the two models' own scores (each model's predict, averaged here, written by the same writer)."""
    pair = [checkpoint, second_checkpoint]
    reference = run_infer(tiny_stores, pair, tmp_path / "r1_w6.csv", ranks=1, window=6)
    assert run_infer(tiny_stores, pair, tmp_path / "r3_w2.csv", ranks=3, window=2) == reference

    from stage_dist.engine.inference import write_predictions

    store = FeatureStore.open(tiny_stores.val)
    env = init_distributed("cpu")
    each = [predict(load_model(path, store.actor_dim, store.object_dim, torch.device("cpu")), StoreWindowSource(store),
                    env, window=6, windows_per_batch=3, progress=False) for path in pair]
    mean = each[0].predictions
    mean.scores = (each[0].predictions.scores + each[1].predictions.scores) / np.float32(2)
    write_predictions(tmp_path / "by_hand.csv", mean, each[0].keyframes)
    assert (tmp_path / "by_hand.csv").read_bytes() == reference


def test_ensemble_reads_each_batch_once_and_averages_the_sigmoids(tiny_stores, checkpoint, second_checkpoint,
                                                                   monkeypatch):
    store = FeatureStore.open(tiny_stores.val)
    env = init_distributed("cpu")
    models = [load_model(path, store.actor_dim, store.object_dim, torch.device("cpu"))
              for path in (checkpoint, second_checkpoint)]
    alone = [predict(model, StoreWindowSource(store), env, window=4, windows_per_batch=2, progress=False)
             for model in models]
    assert np.array_equal(predict([models[0]], StoreWindowSource(store), env, window=4, windows_per_batch=2,
                                  progress=False).predictions.scores, alone[0].predictions.scores)

    source = StoreWindowSource(store)
    batches, forwards = [], []
    original = source.inference_batches

    def counted(*args, **kwargs):
        for item in original(*args, **kwargs):
            batches.append(item)
            yield item

    monkeypatch.setattr(source, "inference_batches", counted)
    for model in models:
        model.register_forward_hook(lambda module, inputs, output: forwards.append((id(module), id(inputs[0]))))
    ensemble = predict(models, source, env, window=4, windows_per_batch=2, progress=False)
    assert len(forwards) == 2 * len(batches) and len(batches) > 1
    assert all(forwards[2 * i][1] == forwards[2 * i + 1][1] for i in range(len(batches)))  # the same batch
    expected = (alone[0].predictions.scores + alone[1].predictions.scores) / np.float32(2)
    assert np.array_equal(ensemble.predictions.scores, expected)
    assert np.array_equal(ensemble.predictions.actor_index, np.arange(store.num_actors))


def test_single_checkpoint_in_a_list_writes_the_same_bytes(tiny_stores, checkpoint, tmp_path):
    args = ["--store", str(tiny_stores.val), "--out", str(tmp_path / "one.csv"), "--device", "cpu", "--workers", "0"]
    assert infer_main([*args, "--checkpoint", str(checkpoint)]) == 0
    one = (tmp_path / "one.csv").read_bytes()
    env = init_distributed("cpu")
    store = FeatureStore.open(tiny_stores.val)
    from stage_dist.engine.inference import write_predictions

    result = predict(load_model(checkpoint, store.actor_dim, store.object_dim, torch.device("cpu")),
                     StoreWindowSource(store), env, progress=False)
    write_predictions(tmp_path / "library.csv", result.predictions, result.keyframes)
    assert (tmp_path / "library.csv").read_bytes() == one


def test_the_same_model_twice_writes_the_single_models_bytes(tiny_stores, checkpoint, tmp_path):
    """The mean of two identical sigmoid scores is the score itself (x + x is exact, so is / 2): an
    ensemble of one checkpoint named twice, as its file and as a run's checkpoints/ directory
    holding it, writes the bytes of the one model."""
    import shutil

    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copyfile(checkpoint, run / "ckpt_e0001_s000010.pt")
    args = ["--store", str(tiny_stores.val), "--device", "cpu", "--workers", "0"]
    assert infer_main([*args, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "one.csv")]) == 0
    assert infer_main([*args, "--checkpoint", str(checkpoint), str(run), "--out", str(tmp_path / "two.csv")]) == 0
    one = (tmp_path / "one.csv").read_bytes()
    assert len(one.splitlines()) > 10 and (tmp_path / "two.csv").read_bytes() == one


@pytest.mark.parametrize("mismatch", [dict(num_outputs=61), dict(actor_dim=8)])
def test_incompatible_ensemble_is_one_line_naming_both_files(tiny_stores, checkpoint, tmp_path, capsys, mismatch):
    store = FeatureStore.open(tiny_stores.train)
    torch.manual_seed(2)
    model_config = ModelConfig(**{"actor_dim": store.actor_dim, "object_dim": store.object_dim, **mismatch})
    other = tmp_path / "other.pt"
    torch.save({"model_state": build_model("stage", model_config).state_dict(), "model_kind": "stage",
                "model_config": asdict(model_config)}, other)
    assert infer_main(["--store", str(tiny_stores.val), "--checkpoint", str(checkpoint), str(other), "--out",
                       str(tmp_path / "r.csv"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(checkpoint) in error and str(other) in error, error
    assert "cannot be ensembled" in error and "Traceback" not in error
    assert not (tmp_path / "r.csv").exists()
