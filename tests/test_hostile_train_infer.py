"""Hostile and careless inputs to train and infer: each case asserts the exit code, that the
one-line message names the file (or step and window), and that no input changed (sha256)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import Stores
from stage_dist.checkpoint import read_checkpoint
from stage_dist.infer import main as infer_main
from stage_dist.model import ModelConfig, build_model
from stage_dist.sampler import ClipWindowSampler
from stage_dist.store import FeatureStore
from stage_dist.train import EXIT_NON_FINITE
from stage_dist.train import main as train_main


@pytest.fixture(autouse=True)
def restore_logging():
    """main() points the root logger at this test's stderr; give the next test a clean one."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths``."""
    found = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def error_line(stderr: str) -> str:
    """The CLI's one error line (progress bars and log lines aside); asserts there is exactly one."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def train_args(stores: Stores, output_dir: Path, *extra: str, train_store: Path | None = None) -> list[str]:
    return ["--train-store", str(train_store or stores.train), "--output-dir", str(output_dir), "--lr", "1e-3",
            "--device", "cpu", "--workers", "0", "--amp", "off", *extra]


@pytest.fixture
def nan_store(tiny_stores: Stores, tmp_path) -> tuple[Path, int]:
    """A copy of the tiny train store with one actor feature set to NaN; returns it and the NaN
    actor's keyframe row."""
    path = tmp_path / "nan.zarr"
    shutil.copytree(tiny_stores.train, path)
    store = FeatureStore.open(path)
    keyframe = int(store.clip_ptr[2]) + 3  # clip 2, its 4th keyframe
    actor = int(store.actor_ptr[keyframe])
    assert store.actor_ptr[keyframe + 1] > actor, "the keyframe has an actor"
    features = zarr.open_group(path, mode="r+")["actors/features"]
    row = features[actor]
    row[5] = np.nan
    features[actor] = row
    return path, keyframe


def first_step_with(store: FeatureStore, keyframe: int, window: int = 6, seed: int = 0) -> int:
    """The 1-based global step of epoch 0 whose window holds ``keyframe`` (the sampler, not the trainer)."""
    clip_start = store.clip_ptr
    for step, specs in enumerate(ClipWindowSampler(store.clip_lengths, window=window, seed=seed), start=1):
        for spec in specs:
            first = int(clip_start[spec.clip]) + spec.start
            if first <= keyframe < first + spec.length:
                return step
    raise AssertionError("keyframe never sampled")


@pytest.mark.parametrize("log_every, checkpoint_every", [(1, 1), (1000, 0)])
def test_nan_feature_stops_training_naming_step_and_window(tiny_stores, nan_store, tmp_path, capsys,
                                                           log_every, checkpoint_every):
    path, keyframe = nan_store
    store = FeatureStore.open(path)
    bad_step = first_step_with(store, keyframe)
    before = digest(path)
    output_dir = tmp_path / "run"
    code = train_main(train_args(tiny_stores, output_dir, "--epochs", "2", "--log-every", str(log_every),
                                 "--checkpoint-every", str(checkpoint_every), train_store=path))
    assert code == EXIT_NON_FINITE
    error = error_line(capsys.readouterr().err)
    assert f"at step {bad_step} " in error, error
    clip = int(np.searchsorted(store.clip_ptr, keyframe, side="right")) - 1
    assert f"clip {clip} (video {store.video_ids[clip]}" in error, error
    assert f"{int(store.timestamps[keyframe]):04d}" in error or "keyframe rows" in error
    checkpoints = sorted((output_dir / "checkpoints").glob("ckpt_*.pt"))
    if checkpoint_every:  # the last good checkpoint is the step before, finite, and named
        assert checkpoints and str(checkpoints[-1]) in error
        last = read_checkpoint(checkpoints[-1])
        assert last.training.global_step == bad_step - 1
        assert all(value.isfinite().all() for value in last.model_state.values())
    else:
        assert checkpoints == [] and "no checkpoint was written" in error
    assert digest(path) == before


def test_nan_in_shards_stops_training(tiny_stores, nan_store, tmp_path, capsys):
    """The issue's case: `train --train-shards` with a NaN in a shard ran to the end with loss nan."""
    from stage_dist.shards import shard_pattern, write_shards

    path, keyframe = nan_store
    manifest = write_shards(FeatureStore.open(path), tmp_path / "shards", max_shard_bytes=50_000)
    shards = tmp_path / "shards"
    before = digest(shards)
    output_dir = tmp_path / "run"
    args = ["--train-shards", shard_pattern(manifest, shards), "--output-dir", str(output_dir), "--lr", "1e-3",
            "--device", "cpu", "--workers", "0", "--epochs", "2", "--checkpoint-every", "1", "--amp", "off"]
    assert train_main(args) == EXIT_NON_FINITE
    error = error_line(capsys.readouterr().err)
    assert "non-finite loss or gradient at step" in error and "keyframe rows" in error
    clip = int(np.searchsorted(FeatureStore.open(path).clip_ptr, keyframe, side="right")) - 1
    assert f"clip {clip}, keyframe rows" in error, error
    for checkpoint in (output_dir / "checkpoints").glob("ckpt_*.pt"):
        assert all(value.isfinite().all() for value in read_checkpoint(checkpoint).model_state.values())
    assert digest(shards) == before
