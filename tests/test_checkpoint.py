"""Checkpoints: round trip, atomic writes under a crash, fallback, rotation, RNG state, and reading
every accepted format (the project's own, the published code's) into one typed result."""

from __future__ import annotations

import logging
import pickle
import random
import signal
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from stage_dist.core.errors import UserInputError
from stage_dist.data.batch import collate
from stage_dist.engine import checkpoint as ckpt_module
from stage_dist.engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    TrainingState,
    checkpoint_state,
    read_checkpoint,
    read_latest_or_file,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from stage_dist.model.saved_model import SavedModel, load_model_state
from stage_dist.model.stage import STAGE, ModelConfig, build_model
from tests.reference_stage import ReferenceStage, random_window, reference_logits

SMALL = ModelConfig(actor_dim=60, object_dim=124)
TINY = ModelConfig(actor_dim=4, object_dim=8, num_heads=1)


def model_only(tag: int = 0) -> dict:
    """The smallest valid stage_dist checkpoint: weights and model description, no training state."""
    torch.manual_seed(tag)
    return {"model_state": build_model("stage", TINY).state_dict(), "model_kind": "stage",
            "model_config": asdict(TINY), "tag": torch.tensor(tag)}


def tag_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["tag"].item()


def training_state(seed: int = 0) -> dict:
    """A realistic state: model, Adam after a step, sampler position, RNG, config values."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.Adam(model.parameters(), lr=6.25e-5)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": {"scale": 65536.0, "growth_tracker": 3},
        "epoch": 2,
        "step": 17,
        "sampler": {"epoch": 2, "step": 17},
        "rng": [rng_state(), rng_state()],
        "config": {"lr": 6.25e-5, "amp": "bf16", "clip": None, "betas": (0.9, 0.999)},
    }


def assert_equal_states(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_states(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_states(x, y)
    else:
        assert a == b


def test_round_trip_loads_with_weights_only(tmp_path):
    state = training_state()
    path = tmp_path / "sub" / "state.pt"
    save_checkpoint(path, state)
    assert_equal_states(torch.load(path, weights_only=True), state)
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]


@pytest.mark.parametrize(
    "bad,where",
    [
        ({"x": np.zeros(3)}, "state['x']"),
        ({"a": [1, {"b": np.float64(1.0)}]}, "state['a'][1]['b']"),
        ({"rng": np.random.get_state()}, "state['rng'][1]"),
    ],
)
def test_save_refuses_what_weights_only_cannot_load(tmp_path, bad, where):
    with pytest.raises(TypeError, match="numpy") as err:  # a programming error, not a user's
        save_checkpoint(tmp_path / "x.pt", bad)
    assert where in str(err.value)
    assert not list(tmp_path.iterdir())


def _not_torch_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "a zip archive, but not torch's")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "checkpoint not found"),
    (lambda p: p.mkdir(), "not a file"),
    (lambda p: p.write_bytes(b""), "not a torch checkpoint"),
    (lambda p: p.write_text("video_id,timestamp\n-5KQ66BBWC4,0902\n"), "not a torch checkpoint"),
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not a torch checkpoint"),
    (_not_torch_zip, "not a loadable torch checkpoint"),
    (lambda p: p.write_bytes(_saved_bytes()[:200]), "truncated or corrupt"),
    (lambda p: torch.save([1, 2], p), "expected a dict, found list"),
    (lambda p: torch.save({"optimizer_state": {}}, p), "no 'model_state' dict"),
    (lambda p: torch.save({"model_state": {"x": torch.zeros(1)}}, p), "no 2-D tensor gat1.attention_0.W"),
])
def test_every_bad_file_is_one_line_naming_it(tmp_path, make, message):
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(CheckpointError, match=message) as err:
        read_checkpoint(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "\n" not in text
    assert "weights_only" not in text and "arbitrary code" not in text, "no advice to load unsafely"
    assert isinstance(err.value, UserInputError)


def _saved_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(model_only(), buffer)
    return buffer.getvalue()


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model_state": _RunsCode(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="evil.pth: refused") as err:
        read_checkpoint(path)
    assert not marker.exists()
    assert "weights_only" not in str(err.value)


def _published_checkpoint(path: Path, actor_dim: int = 1024, object_dim: int = 2048,
                          heads: int = 4) -> ReferenceStage:
    """Write a checkpoint the way the published utils/checkpoints.py does."""
    torch.manual_seed(1)
    reference = ReferenceStage(81, actor_dim, object_dim, heads)
    optimizer = torch.optim.Adam(reference.parameters(), lr=6.25e-5)
    batch = collate([random_window(np.random.default_rng(1), 2, actor_dim, object_dim, max_actors=2,
                                   max_objects=3)])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        reference_logits(reference, batch), torch.rand(batch.actor_features.shape[0], 81))
    loss.backward()
    optimizer.step()
    torch.save({"model_state": reference.state_dict(), "optimizer_state": optimizer.state_dict(),
                "epoch": 3, "iteration": 1234}, path)
    return reference


def test_published_checkpoint_reads_into_the_typed_result(tmp_path):
    path = tmp_path / "model_ep_003_iter_0001234.pth"
    reference = _published_checkpoint(path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.kind == "published" and checkpoint.model_kind == "stage" and checkpoint.training is None
    assert checkpoint.path == path
    assert checkpoint.model_config == ModelConfig(actor_dim=1024, object_dim=2048, num_heads=4, num_outputs=81)
    model = checkpoint.build_model().eval()
    reference.eval()
    batch = collate([random_window(np.random.default_rng(2), 4, 1024, 2048, max_actors=3, max_objects=6)])
    with torch.no_grad():
        torch.testing.assert_close(model(batch), reference_logits(reference, batch), atol=1e-5, rtol=0)
    with pytest.raises(dataclasses_frozen_error()):
        checkpoint.kind = "stage_dist"  # type: ignore[misc]  # the point: it cannot be set


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("actor_dim, object_dim, heads", [(60, 124, 2), (60, 124, 1), (64, 64, 4)])
def test_published_head_count_and_dims_come_from_the_weights(tmp_path, actor_dim, object_dim, heads):
    path = tmp_path / "published.pth"
    _published_checkpoint(path, actor_dim, object_dim, heads)
    config = read_checkpoint(path).model_config
    assert (config.actor_dim, config.object_dim, config.num_heads) == (actor_dim, object_dim, heads)


def test_stage_dist_checkpoint_with_and_without_training_state(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, model_only(3))
    checkpoint = read_checkpoint(path)
    assert checkpoint.kind == "stage_dist" and checkpoint.model_config == TINY and checkpoint.training is None
    training = {"optimizer_state": {"state": {}, "param_groups": []}, "scheduler_state": {}, "scaler_state": {},
                "epoch": 2, "step": 5, "global_step": 17, "best_map": 0.25, "history": [], "world_size": 2,
                "rng_per_rank": [rng_state(), rng_state()], "train_config": {"lr": 1e-3}}
    save_checkpoint(path, {**model_only(3), **training})
    checkpoint = read_checkpoint(path)
    assert (checkpoint.training.epoch, checkpoint.training.step, checkpoint.training.global_step) == (2, 5, 17)
    assert checkpoint.training.scaler_state is None, "a disabled GradScaler's {} reads as no scaler state"
    assert len(checkpoint.training.rng_per_rank) == 2
    del training["scheduler_state"], training["rng_per_rank"]
    save_checkpoint(path, {**model_only(3), **training})
    with pytest.raises(CheckpointError, match="model.pt: incomplete training state: missing scheduler_state, "
                                              "rng_per_rank"):
        read_checkpoint(path)
    save_checkpoint(path, {**model_only(3), "model_kind": "transformer"})
    with pytest.raises(CheckpointError, match="unknown model_kind 'transformer'"):
        read_checkpoint(path)
    save_checkpoint(path, {**model_only(3), "model_config": {"actor_dim": 4, "width": 9}})
    with pytest.raises(CheckpointError, match="malformed model_config"):
        read_checkpoint(path)


# The checkpoint layout of this project, key by key in the order written: a change here changes
# every checkpoint file (and what older ones resume as).
LAYOUT = ("model_state", "model_kind", "model_config", "optimizer_state", "scheduler_state", "scaler_state",
          "epoch", "step", "global_step", "best_map", "history", "world_size", "rng_per_rank", "train_config")


def test_the_layout_is_written_and_read_through_one_schema(tmp_path):
    torch.manual_seed(0)
    model = SavedModel("stage", TINY, build_model("stage", TINY).state_dict())
    training = TrainingState(optimizer_state={"state": {}, "param_groups": []}, scheduler_state={"last_epoch": 3},
                             scaler_state={"scale": 2.0}, epoch=1, step=2, global_step=9, best_map=None,
                             history=[{"epoch": 1}], world_size=1, rng_per_rank=[rng_state()],
                             train_config={"output_dir": "run"})
    state = checkpoint_state(model, training)
    assert tuple(state) == LAYOUT
    assert tuple(checkpoint_state(model)) == LAYOUT[:3]
    save_checkpoint(tmp_path / "run.pt", state)
    back = read_checkpoint(tmp_path / "run.pt")
    assert back.kind == "stage_dist" and back.model_kind == "stage" and back.model_config == TINY
    assert back.model.to_state().keys() == model.to_state().keys()
    assert back.training.to_state().keys() == training.to_state().keys()
    assert (back.training.global_step, back.training.scaler_state, back.training.history) == (9, {"scale": 2.0},
                                                                                             [{"epoch": 1}])


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    state = STAGE(SMALL).state_dict()
    missing = {k: v for k, v in state.items() if k != "gat_fc2.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys: gat_fc2\.bias"):
        load_model_state(STAGE(SMALL), missing)
    extra = dict(state, **{"gat1.attention_4.W": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: gat1\.attention_4\.W"):
        load_model_state(STAGE(SMALL), extra)
    wrong = dict(state, **{"logits.weight": torch.zeros(80, 64)})
    with pytest.raises(CheckpointError, match=r"logits\.weight has shape \(80, 64\)"):
        load_model_state(STAGE(SMALL), wrong)
    path = tmp_path / "published.pth"
    torch.save({"model_state": missing}, path)
    with pytest.raises(CheckpointError, match=r"published.pth: state dict does not match the model: missing keys: "
                                              r"gat_fc2\.bias"):
        read_checkpoint(path).build_model()


def test_a_run_directory_reads_its_newest_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(model_only(1), epoch=0, step=1)
    newest = manager.save(model_only(2), epoch=0, step=2)
    assert read_latest_or_file(tmp_path).path == newest
    assert read_latest_or_file(newest).path == newest
    with pytest.raises(CheckpointError, match="empty: checkpoint not found"):
        read_latest_or_file(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no checkpoint"):
        read_latest_or_file(tmp_path / "empty")


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"version": torch.tensor(1)})

    def crashing_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt_module.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"version": torch.tensor(2)})
    assert torch.load(path, weights_only=True)["version"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"], "temporary file removed"


KILLED_WRITER = """
import os, sys, time, torch
from stage_dist.engine.checkpoint import CheckpointManager

def stalling_fsync(fd):  # the checkpoint's bytes are in its temporary file, not yet renamed
    print("writing", flush=True)
    time.sleep(60)

manager = CheckpointManager(sys.argv[1])
os.fsync = stalling_fsync
manager.save({"step": torch.tensor(2)}, epoch=0, step=2)
"""


@pytest.mark.slow
def test_killed_writer_leaves_no_partial_checkpoint(tmp_path):
    """A real SIGKILL while writing: the older checkpoint stays the newest loadable one."""
    manager = CheckpointManager(tmp_path)
    first = manager.save(model_only(1), epoch=0, step=1)
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    leftovers = [p for p in tmp_path.iterdir() if p != first]
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)
    assert manager.latest() == first
    assert manager.load_latest().path == first
    second = manager.save(model_only(3), epoch=0, step=3)
    assert sorted(tmp_path.iterdir()) == [first, second], "stale temporary file cleaned up"


def test_truncated_newest_falls_back_with_a_warning(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=3)
    assert manager.latest() is None and manager.load_latest() is None
    for step in (10, 20, 30):
        manager.save(model_only(step), epoch=1, step=step)
    newest = manager.latest()
    assert newest.name == "ckpt_e0001_s000030.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="stage_dist.engine.checkpoint"):
        found = manager.load_latest()
    assert found.path.name == "ckpt_e0001_s000020.pt" and tag_of(found.path) == 20
    assert "ckpt_e0001_s000030.pt" in caplog.text
    for path in manager.checkpoints():
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none of 3 checkpoints loads"):
        manager.load_latest()


def test_keep_last_and_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    metrics = {(0, 100): 0.10, (0, 200): 0.30, (1, 0): 0.25, (1, 100): None, (2, 0): 0.20}
    for (epoch, step), metric in metrics.items():
        path = manager.save({"tag": torch.tensor([epoch, step])}, epoch=epoch, step=step, metric=metric)
        assert path.name == f"ckpt_e{epoch:04d}_s{step:06d}.pt"
    assert [p.name for p in manager.checkpoints()] == ["ckpt_e0001_s000100.pt", "ckpt_e0002_s000000.pt"]
    assert manager.best_metric() == pytest.approx(0.30)
    assert torch.load(manager.best_path, weights_only=True)["tag"].tolist() == [0, 200]  # its source is pruned
    assert {p.name for p in tmp_path.iterdir()} == {
        "ckpt_e0001_s000100.pt", "ckpt_e0002_s000000.pt", "best.pt", "best.json"
    }

    again = CheckpointManager(tmp_path, keep_last=2)  # a restarted run keeps the best so far
    again.save({"tag": torch.tensor([3, 0])}, epoch=3, step=0, metric=0.29)
    assert torch.load(again.best_path, weights_only=True)["tag"].tolist() == [0, 200]
    again.save({"tag": torch.tensor([4, 0])}, epoch=4, step=0, metric=0.31)
    assert torch.load(again.best_path, weights_only=True)["tag"].tolist() == [4, 0]
    again.save({"tag": torch.tensor([5, 0])}, epoch=5, step=0, metric=float("nan"))
    assert again.best_metric() == pytest.approx(0.31)


def test_saving_an_earlier_point_discards_the_abandoned_newer_ones(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save({"s": torch.tensor(1)}, epoch=1, step=0)
    manager.save({"s": torch.tensor(2)}, epoch=2, step=0)
    manager.latest().write_bytes(b"corrupt")  # the run resumes from epoch 1 and goes on
    with caplog.at_level(logging.WARNING, logger="stage_dist.engine.checkpoint"):
        manager.save({"s": torch.tensor(3)}, epoch=1, step=50)
    assert "ckpt_e0002_s000000.pt" in caplog.text
    assert [p.name for p in manager.checkpoints()] == ["ckpt_e0001_s000050.pt"]


def test_bad_keep_last():
    with pytest.raises(ValueError):
        CheckpointManager("unused", keep_last=0)


def draw() -> tuple:
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + [np.random.randn()],
        torch.rand(3).tolist() + torch.randn(2).tolist(),
    )


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in Python's and NumPy's generators
    np.random.randn()
    state = rng_state()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    expected = draw()
    draw()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert draw() == expected


def test_malformed_rng_state():
    with pytest.raises(CheckpointError, match="RNG"):
        set_rng_state({"python": {}})
