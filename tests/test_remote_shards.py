"""Shards over http(s) and pipe: URLs, their manifest given with --shards-manifest: training and
inference read them exactly as local shards (same weights, byte-identical results.csv)."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest
import torch

from stage_dist.core.config import ConfigError
from stage_dist.engine.distributed import init_distributed
from stage_dist.engine.trainer import Trainer
from stage_dist.infer import main as infer_main
from stage_dist.store.feature_store import FeatureStore
from stage_dist.store.tar_shards import ShardError, shard_pattern, write_shards
from tests.test_train import final_weights, make_config


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="module")
def served(tiny_stores, tmp_path_factory):
    """Train and val shards in one directory tree, served on 127.0.0.1 (a port the OS picks)."""
    root = tmp_path_factory.mktemp("served")
    manifests = {split: write_shards(FeatureStore.open(store), root / split, max_shard_bytes=50_000)
                 for split, store in (("train", tiny_stores.train), ("val", tiny_stores.val))}
    assert all(m["num_shards"] >= 2 for m in manifests.values())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", manifests
    finally:
        server.shutdown()
        server.server_close()


def _forms(root, base_url, manifests, split):
    """(shards, shards_manifest) of one split: local, http (manifest found beside), http with an
    explicit manifest URL, and pipe:cat with the manifest's local path."""
    pattern = shard_pattern(manifests[split])
    return {
        "local": (f"{root}/{split}/{pattern}", None),
        "http": (f"{base_url}/{split}/{pattern}", None),
        "http-manifest": (f"{base_url}/{split}/{pattern}", f"{base_url}/{split}/manifest.json"),
        "pipe": (f"pipe:cat {root}/{split}/{pattern}", str(root / split / "manifest.json")),
    }


def test_remote_shards_train_and_infer_exactly_as_local_ones(tiny_stores, served, tmp_path):
    root, base_url, manifests = served
    env = init_distributed("cpu")
    weights, csv_bytes = {}, {}
    for form, (shards, manifest) in _forms(root, base_url, manifests, "train").items():
        if form == "http-manifest":
            continue  # the same reads as "http"; inference covers the explicit URL
        config = make_config(tiny_stores, tmp_path / form, train_store=None, train_shards=shards,
                             shards_manifest=manifest, val_store=None, epochs=1, shuffle_buffer=8)
        Trainer(config, env).fit()
        weights[form] = final_weights(tmp_path / form)
    for form in ("http", "pipe"):
        for name, value in weights["local"].items():
            assert torch.equal(value, weights[form][name]), (form, name)

    checkpoint = sorted((tmp_path / "pipe" / "checkpoints").glob("ckpt_*.pt"))[-1]
    for form, (shards, manifest) in _forms(root, base_url, manifests, "val").items():
        out = tmp_path / f"{form}.csv"
        argv = ["--shards", shards, "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                "--workers", "0"] + (["--shards-manifest", manifest] if manifest else [])
        assert infer_main(argv) == 0, form
        csv_bytes[form] = out.read_bytes()
    assert csv_bytes["local"].count(b"\n") > 10
    assert all(data == csv_bytes["local"] for data in csv_bytes.values()), {k: len(v) for k, v in csv_bytes.items()}


def test_pipe_shards_without_a_manifest_name_the_flag(served, tmp_path, capsys, tiny_stores):
    root, _, manifests = served
    argv = ["--shards", f"pipe:cat {root}/val/{shard_pattern(manifests['val'])}", "--checkpoint", "x.pt",
            "--out", str(tmp_path / "r.csv"), "--device", "cpu"]
    assert infer_main(argv) == 2
    assert "--shards-manifest" in capsys.readouterr().err
    with pytest.raises(ShardError, match="--shards-manifest"):
        Trainer(make_config(tiny_stores, tmp_path / "run", train_store=None, val_store=None,
                            train_shards=f"pipe:cat {root}/train/{shard_pattern(manifests['train'])}"),
                init_distributed("cpu"))


def test_shards_manifest_needs_shards(tiny_stores, tmp_path):
    with pytest.raises(ConfigError, match="--shards-manifest"):
        make_config(tiny_stores, tmp_path, shards_manifest="m.json")
