"""Hostile input to the shard tools: every bad shard, sample, manifest or output path is a
one-line error naming it (exit code 2 from the command line), never a traceback or lost data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from stage_dist.data.batch import Padding
from stage_dist.data.tar_windows import TarWindowStream
from stage_dist.shards import main
from stage_dist.store.feature_store import FeatureStore, StoreError
from stage_dist.store.tar_shards import ShardError, expand_urls, shard_pattern, shards_to_store, write_shards
from tests.test_shards import LENGTHS, build_store


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("hostile")
    store = build_store(root / "train.zarr", LENGTHS)
    return shard_pattern(write_shards(store, root / "shards", max_shard_bytes=1), root / "shards")


def one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def copy_shards(pattern: str, target: Path) -> list[Path]:
    target.mkdir()
    src = Path(expand_urls(pattern)[0]).parent
    for path in src.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return sorted(target.glob("*.tar"))


def rewrite_member(shard: Path, member: str, data: bytes) -> None:
    """Replace one tar member's bytes (the shard is rewritten)."""
    with tarfile.open(shard) as tar:
        entries = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for info, payload in entries:
            payload = data if info.name == member else payload
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def test_to_store_refuses_to_replace_what_is_not_an_empty_dir_or_a_store(shards, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main(["--to-store", shards, str(precious)]) == 2
    one_line_error(capsys, str(precious), "exists")
    assert main(["--to-store", "--overwrite", shards, str(precious)]) == 2
    one_line_error(capsys, str(precious), "not a feature store")
    assert (precious / "notes.txt").read_text() == "keep me"
    assert main(["--to-store", shards, str(tmp_path / "back.zarr")]) == 0
    assert main(["--to-store", "--overwrite", shards, str(tmp_path / "back.zarr")]) == 0  # a store: replaced


def test_missing_or_foreign_manifest(shards, tmp_path, capsys):
    assert main(["--to-store", str(tmp_path / "none" / "train-000000.tar"), str(tmp_path / "o.zarr")]) == 2
    one_line_error(capsys, "manifest.json")
    copied = copy_shards(shards, tmp_path / "foreign")
    (tmp_path / "foreign" / "manifest.json").write_text(json.dumps({"format": "other", "version": 9}))
    assert main(["--to-store", str(copied[0]), str(tmp_path / "o.zarr")]) == 2
    one_line_error(capsys, "not a stage_dist.shards v1 manifest")


def test_truncated_shard_is_named(shards, tmp_path, capsys):
    copied = copy_shards(shards, tmp_path / "cut")
    copied[2].write_bytes(copied[2].read_bytes()[:1500])
    pattern = shard_pattern(json.loads((tmp_path / "cut" / "manifest.json").read_text()), tmp_path / "cut")
    assert main(["--to-store", pattern, str(tmp_path / "o.zarr")]) == 2
    one_line_error(capsys, str(copied[2]))
    with pytest.raises(ShardError, match=str(copied[2])):
        for rank in range(2):
            for _ in TarWindowStream(pattern, rank=rank, world_size=2):
                pass


def test_inconsistent_sample_is_named(shards, tmp_path, capsys):
    copied = copy_shards(shards, tmp_path / "bad")
    key = f"c{0:06d}"
    rewrite_member(copied[0], f"{key}.actor_ptr.npy", npy(np.arange(LENGTHS[0] + 1, dtype=np.int64) * 1000))
    pattern = shard_pattern(json.loads((tmp_path / "bad" / "manifest.json").read_text()), tmp_path / "bad")
    assert main(["--to-store", pattern, str(tmp_path / "o.zarr")]) == 2
    one_line_error(capsys, f"sample {key}", "actor_ptr", "does not describe")
    with pytest.raises(StoreError, match="incomplete"):  # what was written refuses to open
        FeatureStore.open(tmp_path / "o.zarr")


def test_foreign_sample_key_is_named(shards, tmp_path):
    copied = copy_shards(shards, tmp_path / "keys")
    with tarfile.open(copied[0]) as tar:
        entries = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(copied[0], "w") as tar:
        for info, payload in entries:
            info.name = info.name.replace("c000000", "clip_a")
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ShardError, match="clip_a: not a stage_dist sample key"):
        shards_to_store(str(tmp_path / "keys" / "train-{000000..000006}.tar"), tmp_path / "o.zarr")


def test_partial_shard_list_cannot_rebuild_or_infer(shards, tmp_path, capsys):
    urls = expand_urls(shards)
    assert main(["--to-store", urls[0], str(tmp_path / "o.zarr")]) == 2
    one_line_error(capsys, "must read every shard", "train-000001.tar")
    with pytest.raises(ShardError, match="inference must read every shard"):
        next(iter(TarWindowStream(urls[:2]).inference_batches(0, 1, window=4, context=2, windows_per_batch=2,
                                                                  padding=Padding())))


def test_shard_that_disagrees_with_its_manifest_is_named(shards, tmp_path):
    copy_shards(shards, tmp_path / "lie")
    manifest_path = tmp_path / "lie" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["clip_lengths"][0] += 12  # clip 0 holds 14 keyframes; the manifest now says 26
    manifest_path.write_text(json.dumps(manifest))
    pattern = shard_pattern(manifest, tmp_path / "lie")
    with pytest.raises(ShardError, match=r"train-000000\.tar: clip 0 gives \d+ windows, its manifest length 26"):
        list(TarWindowStream(pattern))
    manifest["clip_lengths"][0] -= 12
    manifest["shards"][0]["first_clip"], manifest["shards"][0]["stop_clip"] = 1, 2  # clip 0 claimed as clip 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"train-000000\.tar: holds clip 0, its manifest entry clips 1\.\.1"):
        list(TarWindowStream(pattern))
