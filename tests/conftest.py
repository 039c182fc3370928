"""Shared fixtures: one small synthetic dataset and its converted stores per test session."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from stage_dist.ingest.synthetic import SynthConfig, SynthDataset, synthesize

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "ava"  # copied from the project's shared AVA fixtures; see its README

# Small enough to convert in a second or two, large enough for a model to learn something.
TINY = SynthConfig(seed=0, train_clips=6, val_clips=3, keyframes_per_clip=14, actor_dim=32,
                   object_dim=64, actor_thw=(2, 2, 2))
# Enough data for the graph to pay off: STAGE learns the object and interaction classes.
LEARNABLE = SynthConfig(seed=0, train_clips=16, val_clips=6, keyframes_per_clip=30, actor_dim=64,
                        object_dim=128, actor_thw=(1, 1, 1))


@dataclass
class Stores:
    dataset: SynthDataset
    train: Path
    val: Path


def convert_split(dataset: SynthDataset, split: str, out: Path, *extra: str) -> Path:
    from stage_dist.convert import main as convert_main

    paths = dataset.splits[split]
    argv = ["--actors-dir", str(paths.actors_dir), "--objects-file", str(paths.objects_file),
            "--out", str(out), "--workers", "1", *extra]
    assert convert_main(argv) == 0
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> SynthDataset:
    return synthesize(tmp_path_factory.mktemp("synth"), TINY)


@pytest.fixture(scope="session")
def tiny_stores(tiny_dataset, tmp_path_factory) -> Stores:
    root = tmp_path_factory.mktemp("stores")
    return Stores(
        dataset=tiny_dataset,
        train=convert_split(tiny_dataset, "train", root / "train.zarr"),
        val=convert_split(tiny_dataset, "val", root / "val.zarr"),
    )


@pytest.fixture(scope="session")
def learnable_stores(tmp_path_factory) -> Stores:
    root = tmp_path_factory.mktemp("learnable")
    dataset = synthesize(root / "synth", LEARNABLE)
    return Stores(
        dataset=dataset,
        train=convert_split(dataset, "train", root / "train.zarr"),
        val=convert_split(dataset, "val", root / "val.zarr"),
    )


def torchrun_command(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def subprocess_env() -> dict[str, str]:
    """One thread per process: torchrun tests start 2+ processes on a 2-core machine."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture
def restore_logging():
    """main() points the root logger at this test's stderr; give the next test a clean one."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # An earlier test's main() may have left a handler on a stream pytest has closed since.
    root.handlers[:] = [h for h in handlers if not getattr(getattr(h, "stream", None), "closed", False)]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def model_checkpoint(tiny_stores: Stores, tmp_path_factory) -> Path:
    """A randomly initialised STAGE checkpoint (seed 0) for the tiny val store's feature sizes."""
    from dataclasses import asdict

    import torch

    from stage_dist.model.stage import ModelConfig, build_model
    from stage_dist.store.feature_store import FeatureStore

    store = FeatureStore.open(tiny_stores.val)
    torch.manual_seed(0)
    config = ModelConfig(actor_dim=store.actor_dim, object_dim=store.object_dim)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"model_state": build_model("stage", config).state_dict(), "model_kind": "stage",
                "model_config": asdict(config)}, path)
    return path
