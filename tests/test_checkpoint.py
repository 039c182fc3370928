"""Checkpoint files: round trip, atomic writes under a crash, fallback, rotation, RNG state."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from stage_dist import checkpoint as ckpt_module
from stage_dist.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


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
    assert_equal_states(load_checkpoint(path), state)
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
    with pytest.raises(CheckpointError, match="numpy") as err:
        save_checkpoint(tmp_path / "x.pt", bad)
    assert where in str(err.value)
    assert not list(tmp_path.iterdir())


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    path = tmp_path / "state.pt"
    save_checkpoint(path, training_state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="state.pt.*truncated or corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="state.pt"):
        load_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"version": torch.tensor(1)})

    def crashing_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt_module.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"version": torch.tensor(2)})
    assert load_checkpoint(path)["version"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"], "temporary file removed"


KILLED_WRITER = """
import sys, time, torch
from stage_dist.checkpoint import CheckpointManager

def stalling_save(obj, f):
    f.write(b"PK\\x03\\x04 first bytes of a large checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)

manager = CheckpointManager(sys.argv[1])
torch.save = stalling_save
manager.save({"step": torch.tensor(2)}, epoch=0, step=2)
"""


@pytest.mark.slow
def test_killed_writer_leaves_no_partial_checkpoint(tmp_path):
    """A real SIGKILL while writing: the older checkpoint stays the newest loadable one."""
    manager = CheckpointManager(tmp_path)
    first = manager.save({"step": torch.tensor(1)}, epoch=0, step=1)
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
    state, path = manager.load_latest()
    assert path == first and state["step"].item() == 1
    second = manager.save({"step": torch.tensor(3)}, epoch=0, step=3)
    assert sorted(tmp_path.iterdir()) == [first, second], "stale temporary file cleaned up"


def test_truncated_newest_falls_back_with_a_warning(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=3)
    assert manager.latest() is None and manager.load_latest() is None
    for step in (10, 20, 30):
        manager.save({"step": torch.tensor(step)}, epoch=1, step=step)
    newest = manager.latest()
    assert newest.name == "ckpt_e0001_s000030.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="stage_dist.checkpoint"):
        state, path = manager.load_latest()
    assert path.name == "ckpt_e0001_s000020.pt" and state["step"].item() == 20
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
    assert load_checkpoint(manager.best_path)["tag"].tolist() == [0, 200]  # its source is pruned
    assert {p.name for p in tmp_path.iterdir()} == {
        "ckpt_e0001_s000100.pt", "ckpt_e0002_s000000.pt", "best.pt", "best.json"
    }

    again = CheckpointManager(tmp_path, keep_last=2)  # a restarted run keeps the best so far
    again.save({"tag": torch.tensor([3, 0])}, epoch=3, step=0, metric=0.29)
    assert load_checkpoint(again.best_path)["tag"].tolist() == [0, 200]
    again.save({"tag": torch.tensor([4, 0])}, epoch=4, step=0, metric=0.31)
    assert load_checkpoint(again.best_path)["tag"].tolist() == [4, 0]
    again.save({"tag": torch.tensor([5, 0])}, epoch=5, step=0, metric=float("nan"))
    assert again.best_metric() == pytest.approx(0.31)


def test_saving_an_earlier_point_discards_the_abandoned_newer_ones(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save({"s": torch.tensor(1)}, epoch=1, step=0)
    manager.save({"s": torch.tensor(2)}, epoch=2, step=0)
    manager.latest().write_bytes(b"corrupt")  # the run resumes from epoch 1 and goes on
    with caplog.at_level(logging.WARNING, logger="stage_dist.checkpoint"):
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
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draw() == expected


def test_malformed_rng_state():
    with pytest.raises(CheckpointError, match="RNG"):
        set_rng_state({"python": {}})

