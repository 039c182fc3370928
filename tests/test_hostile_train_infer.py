"""Hostile and careless inputs to train and infer: each case asserts the exit code, that the
one-line message names the file (or step and window), and that no input changed (sha256)."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from stage_dist.core.errors import EXIT_NON_FINITE
from stage_dist.data.sampler import ClipWindowSampler
from stage_dist.engine.checkpoint import read_checkpoint
from stage_dist.infer import main as infer_main
from stage_dist.model.stage import ModelConfig, build_model
from stage_dist.store.feature_store import FeatureStore
from stage_dist.train import main as train_main
from tests.conftest import Stores

pytestmark = pytest.mark.usefixtures("restore_logging")


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
    lines = [line for line in stderr.replace("\r", "\n").splitlines()
             if line.startswith("error: ") or ": error: " in line]  # ours, or argparse's "PROG: error: ..."
    assert len(lines) == 1, stderr
    return lines[0]


def exit_code(main, argv: list[str]) -> int:
    """A CLI's exit code, whether its main returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code  # type: ignore[return-value]  # argparse and the CLIs exit with a number


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
    row = np.asarray(features[actor])  # one row: an array (zarr types a selection as any of its results)
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
    from stage_dist.store.tar_shards import shard_pattern, write_shards

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


# -- inference ----------------------------------------------------------------------------------


def infer_args(store: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["--store", str(store), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
            "--workers", "0", *extra]


def _notes(tmp: Path) -> Path:
    path = tmp / "notes.txt"
    path.write_text("my notes, not a results file\n")
    return path


def _link(tmp: Path, target: Path) -> Path:
    (tmp / "link.csv").symlink_to(target)
    return tmp / "link.csv"


def _labelmap_with_id_99(tmp: Path) -> Path:
    path = tmp / "labels.pbtxt"
    path.write_text('item {\n  name: "bend/bow (at the waist)"\n  id: 1\n}\nitem {\n  name: "x"\n  id: 99\n}\n')
    return path


# (name, how to build the argv from (val store, checkpoint, tmp), the path the message must name)
INFER_CASES = {
    "out is the checkpoint": lambda v, c, t: (infer_args(v, c, c), c),
    "out is the store": lambda v, c, t: (infer_args(v, c, v), v),
    "out is a symlink to the checkpoint": lambda v, c, t: (infer_args(v, c, _link(t, c)), t / "link.csv"),
    "out inside the store": lambda v, c, t: (infer_args(v, c, v / "results.csv"), v / "results.csv"),
    "out is a user's file": lambda v, c, t: (infer_args(v, c, _notes(t)), t / "notes.txt"),
    "out is a directory": lambda v, c, t: (infer_args(v, c, t), t),
    "out under a file": lambda v, c, t: (infer_args(v, c, _notes(t) / "r.csv"), t / "notes.txt"),
    "out is the label map": lambda v, c, t: (
        infer_args(v, c, _labelmap_with_id_99(t), "--labelmap", str(t / "labels.pbtxt")), t / "labels.pbtxt"),
    "topk 0": lambda v, c, t: (infer_args(v, c, t / "r.csv", "--topk", "0"), "--topk"),
    "topk 81": lambda v, c, t: (infer_args(v, c, t / "r.csv", "--topk", "81"), "--topk"),
    "min-score 2": lambda v, c, t: (infer_args(v, c, t / "r.csv", "--min-score", "2"), "--min-score"),
    "window 0": lambda v, c, t: (infer_args(v, c, t / "r.csv", "--window", "0"), "--window"),
    "label id 99": lambda v, c, t: (
        infer_args(v, c, t / "r.csv", "--labelmap", str(_labelmap_with_id_99(t))), t / "labels.pbtxt"),
    "checkpoint is a CSV": lambda v, c, t: (infer_args(v, _notes(t), t / "r.csv"), t / "notes.txt"),
    "checkpoint missing": lambda v, c, t: (infer_args(v, t / "absent.pt", t / "r.csv"), t / "absent.pt"),
    "store missing": lambda v, c, t: (infer_args(t / "absent.zarr", c, t / "r.csv"), t / "absent.zarr"),
    "checkpoint of other dims": lambda v, c, t: (infer_args(v, _other_dims(t), t / "r.csv"), t / "other.pt"),
    "device tpu": lambda v, c, t: (infer_args(v, c, t / "r.csv", "--device", "tpu"), "tpu"),
}


def _other_dims(tmp: Path) -> Path:
    config = ModelConfig(actor_dim=16, object_dim=16, num_heads=1)
    path = tmp / "other.pt"
    torch.save({"model_state": build_model("stage", config).state_dict(), "model_kind": "stage",
                "model_config": asdict(config)}, path)
    return path


@pytest.mark.parametrize("case", sorted(INFER_CASES))
def test_infer_refuses_before_work(tiny_stores, model_checkpoint, tmp_path, capsys, case):
    store = tmp_path / "val.zarr"
    shutil.copytree(tiny_stores.val, store)
    checkpoint = tmp_path / "model.pt"
    shutil.copyfile(model_checkpoint, checkpoint)
    work = tmp_path / "work"
    work.mkdir()
    argv, named = INFER_CASES[case](store, checkpoint, work)
    before = digest(tmp_path)
    assert exit_code(infer_main, argv) == 2
    error = error_line(capsys.readouterr().err)
    assert str(named) in error, error
    assert "weights_only" not in error
    assert digest(tmp_path) == before, "an input or an unrelated file changed"
    assert not (work / "r.csv").exists()


def test_infer_out_equal_to_a_shard_is_refused(tiny_stores, model_checkpoint, tmp_path, capsys):
    from stage_dist.store.tar_shards import shard_pattern, write_shards

    manifest = write_shards(FeatureStore.open(tiny_stores.val), tmp_path / "shards", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "shards").glob("*.tar"))[0]
    before = digest(tmp_path)
    for out in (shard, tmp_path / "shards" / "manifest.json"):
        argv = ["--shards", shard_pattern(manifest, tmp_path / "shards"), "--checkpoint", str(model_checkpoint),
                "--out", str(out), "--device", "cpu"]
        assert exit_code(infer_main, argv) == 2
        assert str(out) in error_line(capsys.readouterr().err)
    assert digest(tmp_path) == before


def test_infer_replaces_its_own_results_csv(tiny_stores, model_checkpoint, tmp_path, capsys):
    """Positive control: an existing results CSV (the previous run's) is replaced as before."""
    out = tmp_path / "results.csv"
    out.write_text("old,0902,0.1,0.1,0.5,0.5,1,0.5\n")
    assert infer_main(infer_args(tiny_stores.val, model_checkpoint, out)) == 0
    assert len(out.read_text().splitlines()) == FeatureStore.open(tiny_stores.val).num_actors * 80


def test_second_inference_on_the_same_out_stops_at_once(tiny_stores, model_checkpoint, tmp_path, capsys):
    """One writer per --out: while another job holds it, inference exits 2 naming the holder and
    leaves the file alone."""
    from stage_dist.core.outputs import lock_output

    out = tmp_path / "results.csv"
    out.write_text("old,0902,0.1,0.1,0.5,0.5,1,0.5\n")
    with lock_output(out):
        assert infer_main(infer_args(tiny_stores.val, model_checkpoint, out)) == 2
    error = error_line(capsys.readouterr().err)
    assert str(out) in error and "another process is writing it" in error, error
    assert out.read_text() == "old,0902,0.1,0.1,0.5,0.5,1,0.5\n"


def test_infer_names_the_keyframe_with_non_finite_scores(tiny_stores, model_checkpoint, tmp_path, capsys):
    path = tmp_path / "nan.zarr"
    shutil.copytree(tiny_stores.val, path)
    store = FeatureStore.open(path)
    keyframe = int(store.clip_ptr[1]) + 2
    features = zarr.open_group(path, mode="r+")["actors/features"]
    row = np.asarray(features[int(store.actor_ptr[keyframe])])
    row[0] = np.inf
    features[int(store.actor_ptr[keyframe])] = row
    out = tmp_path / "results.csv"
    before = digest(path, model_checkpoint)
    assert infer_main(infer_args(path, model_checkpoint, out)) == 3
    error = error_line(capsys.readouterr().err)
    assert str(path) in error and "non-finite scores" in error
    assert f"video {store.video_ids[1]} keyframes" in error, error
    first, last = map(int, error.split("(keyframe rows ")[1].split(")")[0].split("-"))
    assert first <= keyframe <= last and last - first <= 4, "the poisoned keyframe and its receptive field"
    assert not out.exists()
    assert digest(path, model_checkpoint) == before


# -- training -----------------------------------------------------------------------------------


def _foreign_config(tmp: Path) -> Path:
    run = tmp / "mine"
    run.mkdir()
    (run / "config.json").write_text('{"theme": "dark"}\n')
    return run


TRAIN_CASES = {
    "output is the train store": lambda s, t: (train_args(s, s.train), s.train),
    "output inside the val store": lambda s, t: (train_args(s, s.val / "run", "--val-store", str(s.val)), s.val),
    "output is a file": lambda s, t: (train_args(s, _notes(t)), t / "notes.txt"),
    "output holds another config.json": lambda s, t: (train_args(s, _foreign_config(t)), t / "mine" / "config.json"),
    "resume from a CSV": lambda s, t: (train_args(s, t / "run", "--resume", str(_notes(t))), t / "notes.txt"),
    "resume from a missing file": lambda s, t: (train_args(s, t / "run", "--resume", str(t / "x.pt")), t / "x.pt"),
    "log-every 0": lambda s, t: (train_args(s, t / "run", "--log-every", "0"), "--log-every"),
    "keep-last 0": lambda s, t: (train_args(s, t / "run", "--keep-last", "0"), "--keep-last"),
    "window 0": lambda s, t: (train_args(s, t / "run", "--window", "0"), "--window"),
    "lr nan": lambda s, t: (train_args(s, t / "run", "--lr", "nan"), "--lr"),
    "dist-timeout 0": lambda s, t: (train_args(s, t / "run", "--dist-timeout", "0"), "--dist-timeout"),
    "3 heads": lambda s, t: (train_args(s, t / "run", "--num-heads", "3"), "num_heads=3"),
    "device tpu": lambda s, t: (train_args(s, t / "run", "--device", "tpu"), "tpu"),
    "labelmap id 99 garbage": lambda s, t: (
        train_args(s, t / "run", "--labelmap", str(_garbage(t))), t / "garbage.pbtxt"),
}


def _garbage(tmp: Path) -> Path:
    path = tmp / "garbage.pbtxt"
    path.write_bytes(b"\x00\x01 not a label map {{{")
    return path


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_refuses_before_work(tiny_stores, tmp_path, capsys, case):
    argv, named = TRAIN_CASES[case](tiny_stores, tmp_path)
    before = digest(tiny_stores.train, tiny_stores.val, tmp_path)
    assert exit_code(train_main, argv) == 2
    error = error_line(capsys.readouterr().err)
    assert str(named) in error, error
    assert "weights_only" not in error
    assert digest(tiny_stores.train, tiny_stores.val, tmp_path) == before, "an input or another file changed"
    assert not list(tmp_path.rglob("ckpt_*.pt"))


def test_epochs_0_claims_no_checkpoint(tiny_stores, tmp_path, capsys):
    assert train_main(train_args(tiny_stores, tmp_path / "run", "--epochs", "0")) == 0
    out = capsys.readouterr().out
    assert "no checkpoint written" in out and "checkpoints in" not in out, out
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_nan_under_torchrun_stops_every_rank(tiny_stores, nan_store, tmp_path):
    """2 gloo ranks: the rank that meets the NaN and the one that does not both stop (no rank left
    waiting in a collective), rank 0 names the step and window, and no checkpoint is non-finite."""
    import subprocess

    from tests.conftest import subprocess_env, torchrun_command

    path, _ = nan_store
    output_dir = tmp_path / "run"
    command = torchrun_command(2, "-m", "stage_dist.train", *train_args(
        tiny_stores, output_dir, "--epochs", "2", "--log-every", "3", "--checkpoint-every", "2", train_store=path))
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "error: training stopped: non-finite loss or gradient at step" in result.stderr, result.stderr[-3000:]
    assert "(rank " in result.stderr and "keyframe rows" in result.stderr
    for checkpoint in (output_dir / "checkpoints").glob("ckpt_*.pt"):
        assert all(value.isfinite().all() for value in read_checkpoint(checkpoint).model_state.values())


def test_second_training_on_the_same_output_dir_stops_at_once(tiny_stores, tmp_path, capsys):
    """One writer per output directory: while a run holds it, another run exits 2 naming the holder."""
    from stage_dist.core.outputs import lock_output

    output_dir = tmp_path / "run"
    output_dir.mkdir()
    with lock_output(output_dir, "--output-dir"):
        assert train_main(train_args(tiny_stores, output_dir)) == 2
    error = error_line(capsys.readouterr().err)
    assert str(output_dir) in error and "another process is writing it" in error, error
    assert not (output_dir / "checkpoints").exists()
