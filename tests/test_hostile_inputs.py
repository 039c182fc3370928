"""Hostile inputs and outputs of the converter and the shard writer, table-driven.

Every case runs the tool's ``main`` on a private copy of a small synthetic split and asserts,
with :mod:`hostile`: exit code 2, one error line naming the path at fault, no traceback, and
not one file of the case's directory changed, created or deleted (sha256 and modes before and
after). Other tools' cases live in ``tests/test_hostile_<tool>.py`` with the same harness.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

from stage_dist import convert
from stage_dist.core.outputs import MARKER_NAME
from stage_dist.ingest.synthetic import SplitPaths, SynthConfig, synthesize
from tests.hostile import REPO, assert_clean_failure, run_main, snapshot

SMALL = ["--chunk-kb", "0.1", "--min-shards", "4", "--no-progress", "--workers", "1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    config = SynthConfig(seed=1, train_clips=2, val_clips=1, keyframes_per_clip=4, actor_dim=8,
                         object_dim=16, actor_thw=(1, 2, 2))
    return synthesize(tmp_path_factory.mktemp("synth"), config)


@dataclass
class Case:
    """A copy of the train split under ``root`` (``X = root/i3d`` holds actors/ and objects.h5)."""

    root: Path
    paths: SplitPaths

    @property
    def x(self) -> Path:
        return self.paths.actors_dir.parent

    def i3d(self, out: Path | str, *extra: str) -> list[str]:
        return ["--actors-dir", str(self.paths.actors_dir), "--objects-file", str(self.paths.objects_file),
                "--out", str(out), *SMALL, *extra]

    def slowfast(self, out: Path | str, *extra: str) -> list[str]:
        return ["--slowfast-file", str(self.paths.slowfast_file), "--video-list", str(self.paths.video_list),
                "--out", str(out), *SMALL, *extra]

    def first_actor_file(self) -> Path:
        return sorted(self.paths.actors_dir.rglob("*.h5"))[0]


@pytest.fixture
def case(dataset, tmp_path) -> Case:
    src = dataset.splits["train"]
    root = tmp_path / "case"
    shutil.copytree(src.actors_dir.parents[1], root / "train", symlinks=True)
    return Case(root, SplitPaths.under(root / "train"))


def _folder_with(c: Case, name: str, files: dict[str, str]) -> Path:
    folder = c.root / name
    folder.mkdir()
    for file, text in files.items():
        (folder / file).write_text(text)
    return folder


def _store(c: Case, name: str = "made.zarr") -> Path:
    out = c.root / name
    assert convert.main(c.i3d(out)) == 0
    return out


def _shards_dir(c: Case) -> Path:
    folder = _folder_with(c, "shards", {"train-000000.tar": "not really a tar"})
    (folder / MARKER_NAME).write_text('{"kind": "webdataset shards"}')
    return folder


def _box_far_outside(c: Case) -> Path:
    file = next(f for f in sorted(c.paths.actors_dir.rglob("*.h5")) if len(h5py.File(f, "r")["boxes"]))
    with h5py.File(file, "a") as f:
        boxes = f["boxes"][()]
        boxes[0, 2] = 1.05
        f["boxes"][...] = boxes
    return file


def _symlink_loop(c: Case, at: Path) -> Path:
    (at.parent / "loop_b").symlink_to(at)
    at.symlink_to(at.parent / "loop_b")
    return at


# Each case: id -> build(case) returning (argv, strings the error must name[, paths the run may
# write: its own output]). Setup happens before the snapshot; the run must leave everything
# else under the case root as it found it.
CONVERT_CASES: dict[str, Callable[[Case], tuple]] = {
    # the issue's example: --out the folder holding both inputs, with --overwrite
    "out_contains_inputs_overwrite": lambda c: (c.i3d(c.x, "--overwrite"), [str(c.x), "contains the input"]),
    "out_is_actors_dir_overwrite": lambda c: (c.i3d(c.paths.actors_dir, "--overwrite"),
                                              [str(c.paths.actors_dir), "is the input --actors-dir"]),
    "out_is_objects_file_overwrite": lambda c: (c.i3d(c.paths.objects_file, "--overwrite"),
                                                [str(c.paths.objects_file), "is the input --objects-file"]),
    "out_inside_actors_dir": lambda c: (c.i3d(c.paths.actors_dir / "s.zarr"),
                                        [str(c.paths.actors_dir / "s.zarr"), "inside the input --actors-dir"]),
    "out_symlink_to_actors_dir": lambda c: (
        (c.root / "link").symlink_to(c.paths.actors_dir) or c.i3d(c.root / "link", "--overwrite"),
        [str(c.root / "link"), "--actors-dir"]),
    "out_is_unrelated_file_overwrite": lambda c: (
        (c.root / "notes.txt").write_text("mine") and c.i3d(c.root / "notes.txt", "--overwrite"),
        [str(c.root / "notes.txt"), "is a file"]),
    "out_dir_with_other_files_overwrite": lambda c: (
        c.i3d(_folder_with(c, "mine", {"thesis.tex": "x", "data.csv": "y"}), "--overwrite"),
        [str(c.root / "mine"), "data.csv"]),
    "out_symlink_to_dir_with_other_files_overwrite": lambda c: (
        (c.root / "link").symlink_to(_folder_with(c, "mine", {"a.txt": "x"})) or c.i3d(c.root / "link", "--overwrite"),
        [str(c.root / "link"), "a.txt"]),
    "out_symlink_loop": lambda c: (c.i3d(_symlink_loop(c, c.root / "loop_a"), "--overwrite"),
                                   [str(c.root / "loop_a")]),
    "out_parent_is_a_file": lambda c: (
        (c.root / "plain").write_text("x") and c.i3d(c.root / "plain" / "s.zarr"), [str(c.root / "plain")]),
    "out_holds_webdataset_shards_overwrite": lambda c: (c.i3d(_shards_dir(c), "--overwrite"),
                                                        [str(c.root / "shards"), "webdataset shards"]),
    "out_holds_other_store_no_overwrite": lambda c: (
        c.i3d(_store(c), "--dtype", "float32"), [str(c.root / "made.zarr"), "--overwrite", "dtype"]),
    "actors_dir_missing": lambda c: (
        shutil.rmtree(c.paths.actors_dir) or c.i3d(c.root / "s.zarr"), [str(c.paths.actors_dir)]),
    "actors_dir_is_a_file": lambda c: (
        shutil.rmtree(c.paths.actors_dir) or c.paths.actors_dir.write_text("x") and c.i3d(c.root / "s.zarr"),
        [str(c.paths.actors_dir), "not a directory"]),
    "objects_file_missing": lambda c: (
        c.paths.objects_file.unlink() or c.i3d(c.root / "s.zarr"), [str(c.paths.objects_file), "not found"]),
    "objects_file_is_a_directory": lambda c: (
        c.paths.objects_file.unlink() or c.paths.objects_file.mkdir() or c.i3d(c.root / "s.zarr"),
        [str(c.paths.objects_file), "is a directory"]),
    "symlink_loop_in_actors_dir": lambda c: (
        _symlink_loop(c, c.paths.actors_dir / "clipX") and c.i3d(c.root / "s.zarr"),
        [str(c.paths.actors_dir / "clipX")]),
    "keyframe_file_is_a_directory": lambda c: (
        (c.first_actor_file().parent / "0999.h5").mkdir() or c.i3d(c.root / "s.zarr"),
        [str(c.first_actor_file().parent / "0999.h5"), "is a directory"]),
    "keyframe_file_not_numbered": lambda c: (
        (c.first_actor_file().parent / "frame.h5").write_text("x") and c.i3d(c.root / "s.zarr"),
        [str(c.first_actor_file().parent / "frame.h5"), "not a keyframe file"]),
    # found while converting: the run's own (incomplete, resumable) store may be left, nothing else
    "box_beyond_tolerance": lambda c: (c.i3d(c.root / "s.zarr", "--box-tolerance", "0.01"),
                                       [str(_box_far_outside(c)), "--box-tolerance"], [c.root / "s.zarr"]),
    "negative_box_tolerance": lambda c: (c.i3d(c.root / "s.zarr", "--box-tolerance", "-1"), ["--box-tolerance"]),
    "zero_workers": lambda c: (c.i3d(c.root / "s.zarr") + ["--workers", "0"], ["--workers"]),
    "zero_verify_sample": lambda c: (c.i3d(c.root / "s.zarr", "--verify-sample", "0"), ["--verify-sample"]),
    "shards_out_is_actors_dir": lambda c: (
        c.i3d(c.root / "s.zarr", "--format", "webdataset", "--shards-out", str(c.paths.actors_dir)),
        [str(c.paths.actors_dir), "--shards-out"]),
    "slowfast_file_missing": lambda c: (c.paths.slowfast_file.unlink() or c.slowfast(c.root / "s.zarr"),
                                        [str(c.paths.slowfast_file), "not found"]),
    "video_list_is_a_directory": lambda c: (
        c.paths.video_list.unlink() or c.paths.video_list.mkdir() or c.slowfast(c.root / "s.zarr"),
        [str(c.paths.video_list), "cannot read video list"]),
    "out_is_dev_null": lambda c: (c.i3d("/dev/null", "--overwrite"), ["/dev/null", "is a file"]),
    "slowfast_out_is_video_list": lambda c: (c.slowfast(c.paths.video_list, "--overwrite"),
                                             [str(c.paths.video_list), "--video-list"]),
    "slowfast_out_contains_slowfast_file": lambda c: (
        c.slowfast(c.paths.slowfast_file.parent, "--overwrite"), [str(c.paths.slowfast_file.parent), "contains"]),
}


@pytest.mark.parametrize("name", sorted(CONVERT_CASES))
def test_convert_hostile(name, case, capsys):
    argv, names, *own_output = CONVERT_CASES[name](case)
    ignore = own_output[0] if own_output else []
    before = snapshot(case.root, ignore=ignore)
    outcome = run_main(convert.main, argv, capsys)
    assert_clean_failure(outcome, before, snapshot(case.root, ignore=ignore), code=2, names=names)


def test_issue_example_keeps_every_input_file(case, capsys):
    """``--out X --overwrite`` where X holds actors/ and objects.h5: refused, not one byte lost."""
    before = snapshot(case.x)
    outcome = run_main(convert.main, case.i3d(case.x, "--overwrite"), capsys)
    assert_clean_failure(outcome, before, snapshot(case.x), names=[str(case.x), str(case.paths.actors_dir)])
    assert len([k for k in before if k.endswith(".h5")]) == 2 * 4 + 1  # the snapshot saw every input file


@pytest.fixture
def immutable_dir(case):
    """A directory nobody (root included) may create entries in: chattr +i (skipped if unsupported)."""
    folder = case.root / "readonly"
    folder.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_convert_read_only_parent(case, immutable_dir, capsys):
    out = immutable_dir / "s.zarr"
    before = snapshot(case.root)
    outcome = run_main(convert.main, case.i3d(out), capsys)
    assert_clean_failure(outcome, before, snapshot(case.root), names=[str(out)])


def test_convert_while_another_converter_holds_the_lock(case, capsys):
    out = case.root / "s.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, time; from stage_dist.core.outputs import lock_output; "
         f"os.mkdir({str(out)!r}); lock = lock_output({str(out)!r}); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(case.root)
        outcome = run_main(convert.main, case.i3d(out), capsys)
        assert_clean_failure(outcome, before, snapshot(case.root), names=[str(out), f"pid {holder.pid}"])
    finally:
        holder.kill()
        holder.wait()
    assert convert.main(case.i3d(out)) == 0  # the holder is gone: its lock went with it


# --------------------------------------------------------------------------- shard writer


@pytest.fixture
def store_case(case) -> tuple[Case, Path]:
    return case, _store(case, "train.zarr")


def _shards(argv: list[str], capsys):
    from stage_dist import shards

    return run_main(shards.main, argv, capsys)


SHARD_CASES: dict[str, Callable[[Case, Path], tuple[list[str], list[str]]]] = {
    "out_is_the_store": lambda c, s: ([str(s), str(s)], [str(s), "is the input store"]),
    "out_inside_the_store": lambda c, s: ([str(s), str(s / "shards")], [str(s / "shards"), "inside the input"]),
    "out_holds_users_tar_files": lambda c, s: (
        [str(s), str(_folder_with(c, "tars", {"train-000000.tar": "user data", "train-000001.tar": "more"}))],
        [str(c.root / "tars"), "train-000000.tar"]),
    # write_text returns the characters written (1): `and` gives the argument list
    "out_is_a_file": lambda c, s: ((c.root / "f.tar").write_text("x") and [str(s), str(c.root / "f.tar")],  # type: ignore[dict-item, return-value]
                                   [str(c.root / "f.tar"), "is a file"]),
    "out_is_another_feature_store": lambda c, s: ([str(s), str(_store(c, "other.zarr"))],
                                                  [str(c.root / "other.zarr"), "feature store"]),
    "out_symlink_to_the_store": lambda c, s: ((c.root / "link").symlink_to(s) or [str(s), str(c.root / "link")],
                                              [str(c.root / "link"), "is the input store"]),
    "store_is_not_a_store": lambda c, s: ([str(c.paths.actors_dir), str(c.root / "out")], [str(c.paths.actors_dir)]),
    "bad_window_leaves_nothing": lambda c, s: ([str(s), str(c.root / "new"), "--window", "0"], ["window"]),
}


@pytest.mark.parametrize("name", sorted(SHARD_CASES))
def test_shards_hostile(name, store_case, capsys):
    c, store = store_case
    argv, names = SHARD_CASES[name](c, store)
    before = snapshot(c.root)
    outcome = _shards(argv, capsys)
    assert_clean_failure(outcome, before, snapshot(c.root), code=2, names=names)


def test_shards_rewrite_own_directory_and_keep_its_mode(store_case, capsys):
    c, store = store_case
    out = c.root / "shards"
    assert _shards([str(store), str(out)], capsys).code == 0
    os.chmod(out, 0o750)
    assert _shards([str(store), str(out), "--max-shard-mb", "0.001"], capsys).code == 0  # ours: rewritten
    assert (out / MARKER_NAME).exists() and oct(os.stat(out).st_mode & 0o777) == oct(0o750)
    assert np.all([p.suffix in (".tar", ".json") for p in out.iterdir()])


def _chattr(flag: str, path: Path) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(["chattr", flag, str(path)]).returncode == 0


def test_convert_write_refused_inside_own_store_is_one_line(case, capsys):
    """The filesystem refuses a write inside --out (an immutable subdirectory): exit 2, one line
    naming the path; the inputs are untouched (the store itself is the run's to change)."""
    out = _store(case, "s.zarr")
    locked = out / "actors" / "features"
    if not _chattr("+i", locked):
        pytest.skip("chattr +i is not available here")
    try:
        before = snapshot(case.root, ignore=[out])
        outcome = run_main(convert.main, case.i3d(out, "--overwrite", "--dtype", "float32"), capsys)
        assert_clean_failure(outcome, before, snapshot(case.root, ignore=[out]), names=[str(out / "actors")])
    finally:
        _chattr("-i", locked)


# --------------------------------------------------------------------------- the outputs API (for train/infer)


def test_claim_output_dir_marks_locks_and_replaces_only_its_own(tmp_path):
    from stage_dist.core.outputs import OutputError, claim_output_dir, read_marker

    run = tmp_path / "runs" / "a"
    with claim_output_dir(run, "training run") as out:
        assert out.state == "new" and read_marker(run)["kind"] == "training run"
        with pytest.raises(OutputError, match=f"another process is writing it \\(pid {os.getpid()} on"):
            with claim_output_dir(run, "training run"):
                pass
        (run / "last.pt").write_text("weights")
    os.chmod(run, 0o2750)
    with claim_output_dir(run, "training run") as out:  # resume: kept
        assert out.state == "ours" and (run / "last.pt").exists()
    with claim_output_dir(run, "training run", overwrite=True) as out:  # replace: emptied, directory kept
        assert out.state == "ours" and sorted(os.listdir(run)) == [MARKER_NAME]
    assert (os.stat(run).st_mode & 0o7777) == 0o2750
    with pytest.raises(OutputError, match="holds a training run, not a webdataset shards"):
        with claim_output_dir(run, "webdataset shards", overwrite=True):
            pass
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="notes.txt"):
        with claim_output_dir(mine, "training run", overwrite=True):
            pass
    with pytest.raises(OutputError, match="contains the input --train-store"):
        with claim_output_dir(tmp_path, "training run", inputs=[("--train-store", mine / "notes.txt")]):
            pass
    assert (mine / "notes.txt").read_text() == "x"
    assert not any(p.name.endswith(".lock") for p in tmp_path.rglob(".*"))  # every lock released and removed


def test_check_output_file_and_its_lock(tmp_path):
    from stage_dist.core.outputs import OutputError, check_output_file, lock_output, lock_path

    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"PK")
    (tmp_path / "sub").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "ckpt_link").symlink_to(checkpoint)
    for path, message in ((checkpoint, "is the input --checkpoint"), (tmp_path / "ckpt_link", "is the input"),
                          (tmp_path / "sub", "is a directory"),
                          (tmp_path / "notes.txt" / "results.csv", "is not a directory")):
        with pytest.raises(OutputError, match=message):
            check_output_file(path, inputs=[("--checkpoint", checkpoint)])
    results = check_output_file(tmp_path / "out" / "results.csv", inputs=[("--checkpoint", checkpoint)])
    assert results == (tmp_path / "out" / "results.csv").resolve()
    results.parent.mkdir()  # the caller makes the parents, then locks
    with lock_output(results):
        assert lock_path(results) == tmp_path / "out" / ".results.csv.lock"
        with pytest.raises(OutputError, match="another process is writing it"):
            lock_output(results)
    assert not lock_path(results).exists()
