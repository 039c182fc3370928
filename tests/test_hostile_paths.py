"""Hostile output paths for every command: the OS refuses the path a user gave.

For each command and each output flag, five classes of path the filesystem refuses:

- ``read_only``: a directory on a filesystem mounted read-only (a tmpfs remounted ``ro``; as a
  non-root user a ``chmod 0555`` directory instead);
- ``name_too_long``: a file-name component of 300 bytes (ENAMETOOLONG);
- ``no_space``: a directory on a full filesystem (a 64 KiB tmpfs filled up: ENOSPC);
- ``through_a_file``: a path whose parent is a regular file (ENOTDIR);
- ``symlink_loop``: a path through two symlinks that point at each other (ELOOP).

Each case runs the command's ``main`` in this process and asserts, with :mod:`hostile`: exit 2,
one error line naming the flag and the path, no traceback, and nothing under the case's
directory or the inputs changed, created or deleted (an earlier output in the read-only
directory included). Mounting needs root (CAP_SYS_ADMIN): where it is refused, the classes that
need it are skipped with the reason; the unit tests at the end cover the same logic without it
(monkeypatched at the OS boundary).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from stage_dist import convert, demo, evaluate, infer, shards, synth, train
from stage_dist.core.paths import PathError, check_target, ensure_free_space, path_error, user_path_errors
from stage_dist.store.feature_store import FeatureStore
from tests.conftest import Stores
from tests.hostile import assert_clean_failure, run_main, snapshot

CLASSES = ("read_only", "name_too_long", "no_space", "through_a_file", "symlink_loop")


pytestmark = pytest.mark.usefixtures("restore_logging")


def _mount_tmpfs(at: Path, options: str) -> bool:
    at.mkdir()
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(at)],
                          capture_output=True, check=False).returncode == 0


def _umount(at: Path) -> None:
    subprocess.run(["umount", str(at)], check=True)


def _mount_refused(kind: str) -> None:
    pytest.skip(f"cannot mount a {kind} tmpfs here (needs root or CAP_SYS_ADMIN); the unit tests below "
                "cover the logic")


class Places:
    """Builds, under ``root``, a parent directory of each class (made on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounts: list[Path] = []
        self.chmodded: list[Path] = []

    def parent(self, kind: str) -> Path:
        """A directory in which a new output of ``kind`` is refused (its path is ``parent / name``;
        for ``name_too_long`` the name is the problem, so the parent is an ordinary directory)."""
        if kind == "read_only":
            folder = self.root / "ro"
            if _mount_tmpfs(folder, "size=64k"):
                self.mounts.append(folder)
                (folder / "earlier_output.csv").write_text("an earlier run's output\n")
                remount = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, check=False)
                if remount.returncode:
                    _mount_refused("read-only")
            elif os.geteuid() != 0:  # a non-root user: a directory without write permission does it
                (folder / "earlier_output.csv").write_text("an earlier run's output\n")
                folder.chmod(0o555)
                self.chmodded.append(folder)
            else:
                _mount_refused("read-only")
            return folder
        if kind in ("no_space", "small_disk"):  # a full one, or one with 64 KiB free
            folder = self.root / ("full" if kind == "no_space" else "small")
            if not _mount_tmpfs(folder, "size=64k"):
                _mount_refused("size-limited")
            self.mounts.append(folder)
            if kind == "small_disk":
                return folder
            with open(folder / "filler", "wb", buffering=0) as filler:  # every block taken
                try:
                    while True:
                        filler.write(b"\0" * 4096)
                except OSError as err:
                    assert err.errno == errno.ENOSPC
            return folder
        if kind == "through_a_file":
            (self.root / "notes.txt").write_text("a file, not a directory\n")
            return self.root / "notes.txt"
        if kind == "symlink_loop":
            (self.root / "loop_a").symlink_to(self.root / "loop_b")
            (self.root / "loop_b").symlink_to(self.root / "loop_a")
            return self.root / "loop_a"
        return self.root

    def target(self, kind: str, name: str) -> Path:
        parent = self.parent(kind)
        if kind == "name_too_long":
            _, dot, suffix = name.partition(".")
            return parent / ("n" * 300 + dot + suffix)
        return parent / name

    def close(self) -> None:
        for folder in self.chmodded:
            folder.chmod(0o755)
        for folder in reversed(self.mounts):
            _umount(folder)


@pytest.fixture
def places(tmp_path):
    made = Places(tmp_path / "case")
    made.root.mkdir()
    try:
        yield made
    finally:
        made.close()


def check_refused(main: Callable, argv: list[str], flag: str, target: Path, capsys, *,
                  watched: tuple[Path, ...] = (), own_output: Path | None = None) -> str:
    """Run ``main(argv)``: exit 2, one line naming ``flag`` and ``target``, and nothing changed
    under the case's directory or ``watched`` (``own_output``, what the run was asked to write, aside)."""
    case_root = next(p for p in target.parents if p.name == "case")
    ignore = [own_output] if own_output is not None else []
    before = snapshot(case_root, *watched, ignore=ignore)
    outcome = run_main(main, argv, capsys)
    return assert_clean_failure(outcome, before, snapshot(case_root, *watched, ignore=ignore), code=2,
                                names=[flag, str(target)])


# --------------------------------------------------------------------------- inputs of the cases


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    files = {"gt": "vid,0902,0.1,0.1,0.5,0.9,1,0\nvid,0902,0.6,0.1,0.9,0.9,2,1\n",
             "det": "vid,0902,0.1,0.1,0.5,0.9,1,0.9\nvid,0902,0.6,0.1,0.9,0.9,2,0.8\n",
             "labels": 'item {\n  name: "one"\n  id: 1\n}\nitem {\n  name: "two"\n  id: 2\n}\n'}
    for name, text in files.items():
        (root / name).write_text(text)
    return {name: root / name for name in files}


def _train_argv(stores: Stores, *extra: str) -> list[str]:
    return ["--train-store", str(stores.train), "--lr", "1e-3", "--device", "cpu", "--workers", "0",
            "--amp", "off", "--epochs", "1", *extra]


# --------------------------------------------------------------------------- every command, every class


@pytest.mark.parametrize("kind", CLASSES)
def test_convert_out(kind, places, tiny_dataset, capsys):
    paths = tiny_dataset.splits["train"]
    target = places.target(kind, "s.zarr")
    argv = ["--actors-dir", str(paths.actors_dir), "--objects-file", str(paths.objects_file), "--out", str(target),
            "--workers", "1", "--no-progress"]
    check_refused(convert.main, argv, "--out", target, capsys, watched=(paths.actors_dir.parent,),
                  own_output=target if kind == "no_space" else None)  # its (empty) store: resumable


@pytest.mark.parametrize("kind", CLASSES)
def test_shards_out_dir(kind, places, tiny_stores, capsys):
    target = places.target(kind, "shards")
    check_refused(shards.main, [str(tiny_stores.train), str(target)], "OUT_DIR", target, capsys,
                  watched=(tiny_stores.train,))


@pytest.mark.parametrize("kind", CLASSES)
def test_shards_to_store_out_dir(kind, places, tiny_stores, tmp_path_factory, capsys):
    from stage_dist.store.tar_shards import shard_pattern, write_shards

    made = tmp_path_factory.getbasetemp() / "paths_shards"  # made once per session
    if not made.exists():
        write_shards(FeatureStore.open(tiny_stores.train), made)
    pattern = shard_pattern(json.loads((made / "manifest.json").read_text()), made)
    target = places.target(kind, "back.zarr")
    check_refused(shards.main, ["--to-store", pattern, str(target)], "OUT_DIR", target, capsys, watched=(made,),
                  own_output=target if kind == "no_space" else None)


@pytest.mark.parametrize("kind", CLASSES)
def test_train_output_dir(kind, places, tiny_stores, capsys):
    target = places.target(kind, "run")
    check_refused(train.main, _train_argv(tiny_stores, "--output-dir", str(target)), "--output-dir", target, capsys,
                  watched=(tiny_stores.train,))


@pytest.mark.parametrize("kind", CLASSES)
def test_train_memmap_dir(kind, places, tiny_stores, capsys):
    target = places.target(kind, "shm")
    run = places.root / "run"
    message = check_refused(train.main, _train_argv(tiny_stores, "--output-dir", str(run), "--memmap-dir", str(target)),
                            "--memmap-dir", target, capsys, watched=(tiny_stores.train,),
                            own_output=target if kind == "no_space" else None)
    assert not run.exists() or not any(run.rglob("*.pt")), message


@pytest.mark.parametrize("kind", CLASSES)
def test_train_tensorboard_dir(kind, places, tiny_stores, capsys):
    target = places.target(kind, "tb")
    run = places.root / "run"
    check_refused(train.main, _train_argv(tiny_stores, "--output-dir", str(run), "--tensorboard-dir", str(target)),
                  "--tensorboard-dir", target, capsys, watched=(tiny_stores.train,))


@pytest.mark.parametrize("kind", CLASSES)
def test_train_resume_input(kind, places, tiny_stores, capsys):
    """--resume is an input: a path the OS refuses to look up (a name too long, through a file, a
    symlink loop) or that is not there is one line naming the flag and the path, before any work."""
    target = places.target(kind, "model.pt")
    run = places.root / "run"
    check_refused(train.main, _train_argv(tiny_stores, "--output-dir", str(run), "--resume", str(target)),
                  "--resume", target, capsys, watched=(tiny_stores.train,))
    assert not run.exists()


@pytest.mark.parametrize("kind", CLASSES)
def test_infer_checkpoint_input(kind, places, tiny_stores, capsys):
    target = places.target(kind, "model.pt")
    out = places.root / "results.csv"
    check_refused(infer.main, ["--store", str(tiny_stores.val), "--checkpoint", str(target), "--out", str(out),
                               "--device", "cpu", "--workers", "0"], "--checkpoint", target, capsys,
                  watched=(tiny_stores.val,))
    assert not out.exists()


@pytest.mark.parametrize("kind", CLASSES)
def test_train_config_input(kind, places, tiny_stores, capsys):
    """--config FILE is an input: one line naming the flag and the file, whatever the OS says."""
    target = places.target(kind, "config.json")
    run = places.root / "run"
    check_refused(train.main, _train_argv(tiny_stores, "--output-dir", str(run), "--config", str(target)),
                  "--config", target, capsys, watched=(tiny_stores.train,))
    assert not run.exists()


@pytest.mark.parametrize("kind", CLASSES)
def test_infer_out(kind, places, tiny_stores, model_checkpoint, capsys):
    target = places.target(kind, "results.csv")
    argv = ["--store", str(tiny_stores.val), "--checkpoint", str(model_checkpoint), "--out", str(target),
            "--device", "cpu", "--workers", "0"]
    check_refused(infer.main, argv, "--out", target, capsys, watched=(tiny_stores.val, model_checkpoint))


@pytest.mark.parametrize("flag", ["--json", "--plot"])
@pytest.mark.parametrize("kind", CLASSES)
def test_evaluate_outputs(kind, flag, places, eval_files, capsys):
    target = places.target(kind, "metrics.json" if flag == "--json" else "ap.png")
    argv = ["-g", str(eval_files["gt"]), "-d", str(eval_files["det"]), "-l", str(eval_files["labels"]),
            flag, str(target)]
    check_refused(evaluate.main, argv, flag, target, capsys, watched=(eval_files["gt"].parent,))


SYNTH_FLAGS = ["--train-clips", "2", "--val-clips", "1", "--keyframes-per-clip", "3", "--actor-dim", "8",
               "--object-dim", "8", "--actor-thw", "1", "1", "1", "--log-level", "WARNING"]


@pytest.mark.parametrize("kind", CLASSES)
def test_curves_out(kind, places, tmp_path, capsys):
    from stage_dist.curves import main as curves_main
    from tests.test_curves import make_run

    run = make_run(tmp_path / "run", {1: 0.7, 2: 0.5}, {2: 0.4})
    target = places.target(kind, "curves.png")
    check_refused(curves_main, [str(run), "--out", str(target)], "--out", target, capsys, watched=(run,))


@pytest.mark.parametrize("kind", CLASSES)
def test_synth_out(kind, places, capsys):
    target = places.target(kind, "data")
    check_refused(synth.main, ["--out", str(target), *SYNTH_FLAGS], "--out", target, capsys)


@pytest.mark.parametrize("kind", CLASSES)
def test_demo_out(kind, places, capsys):
    target = places.target(kind, "demo")
    check_refused(demo.main, ["--out", str(target), "--epochs", "1"], "--out", target, capsys)


def test_demo_on_a_small_disk_stops_at_its_first_step(places, capfd):
    """The demo's first step (synth, a subprocess) finds too little space: its one error line
    names synth's --out (inside the demo's), the demo says which step stopped, no traceback."""
    target = places.target("small_disk", "demo")
    before = snapshot(places.root)
    outcome = run_main(demo.main, ["--out", str(target), "--epochs", "1"], capfd)
    message = assert_clean_failure(outcome, before, snapshot(places.root), code=2, names=["--out", str(target)])
    assert "No space left on device" in message, message
    assert "demo stopped:" in outcome.err and "stage_dist.synth" in outcome.err


# --------------------------------------------------------------------------- the logic, without mounting


def test_name_too_long_counts_the_derived_lock_and_temporary_names(tmp_path):
    """A 250-byte name fits, its lock file ``.<name>.lock`` (256 bytes) does not: refused up front."""
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    fits = tmp_path / ("r" * (name_max - 5))
    with pytest.raises(PathError, match=rf"cannot write --out: the name \.r+\.\.\.r+\.lock is {name_max + 1} bytes"):
        check_target(fits, "--out", kind="file")
    check_target(tmp_path / ("r" * (name_max - 6 - 14)), "--out", kind="file")  # 6 for the lock, 14 for mkstemp


def test_read_only_filesystem_is_found_up_front(tmp_path, monkeypatch):
    """Without a mount: statvfs says read-only (what a ro mount says), and nothing is created."""
    real = os.statvfs

    class ReadOnly:
        def __init__(self, result):
            self._result = result

        def __getattr__(self, name):
            value = getattr(self._result, name)
            return value | os.ST_RDONLY if name == "f_flag" else value

    monkeypatch.setattr(os, "statvfs",
                        lambda path: ReadOnly(real(path)) if str(path).startswith(str(tmp_path)) else real(path))
    with pytest.raises(PathError) as info:
        check_target(tmp_path / "shm", "--memmap-dir", kind="dir")
    assert str(info.value) == f"{tmp_path / 'shm'}: cannot write --memmap-dir: {tmp_path} is on a read-only file system"
    assert not (tmp_path / "shm").exists()


def test_no_space_up_front_for_train_and_synth(tiny_stores, tmp_path, monkeypatch, capsys):
    """Without a mount: a filesystem with 1 kB free (shutil.disk_usage) refuses the checkpoint of
    train and the arrays of synth before any step or file; the flag is named."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000)
                        if str(path).startswith(str(tmp_path)) else real(path))
    run = tmp_path / "run"
    outcome = run_main(train.main, _train_argv(tiny_stores, "--output-dir", str(run)), capsys)
    assert outcome.code == 2 and f"{run}: cannot write --output-dir: No space left on device (" in outcome.err
    assert "needed for a checkpoint, 1.0 kB free)" in outcome.err, outcome.err
    assert not run.exists(), "the directory the run made is removed again"
    outcome = run_main(synth.main, ["--out", str(tmp_path / "data"), *SYNTH_FLAGS], capsys)
    assert outcome.code == 2 and "cannot write --out: No space left on device" in outcome.err, outcome.err
    assert not (tmp_path / "data").exists()


def test_user_path_errors_names_only_user_paths(tmp_path):
    out = tmp_path / "out" / "results.csv"
    paths = {"--out": str(out), "--memmap-dir": None}
    # a file derived beside the output (lock, temporary), a missing ancestor, a file under it: named
    for file in (out.parent / ".results.csv.lock", out.parent / ".tmp-results.csv.abc123", out.parent, out):
        error = path_error(OSError(errno.EROFS, os.strerror(errno.EROFS), str(file)), paths)
        assert error is not None and str(error).startswith(f"{out}: cannot write --out: "), (file, error)
    # an error about another path, or one naming no file outside a block that writes only --out: not ours
    assert path_error(OSError(errno.ENOSPC, "No space left on device", "/elsewhere/x"), paths) is None
    assert path_error(OSError(errno.ENOSPC, "No space left on device"), paths) is None
    with pytest.raises(PathError, match=rf"^{out}: cannot write --out: No space left on device$"):
        with user_path_errors(paths, writing="--out"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="elsewhere"):  # passes unchanged, traceback kept
        with user_path_errors(paths, writing="--out"):
            raise OSError(errno.EACCES, "Permission denied", "/elsewhere/input.csv")
    with pytest.raises(KeyError):  # a programming error is not a path error
        with user_path_errors(paths, writing="--out"):
            raise KeyError("bug")


def test_infer_full_disk_at_the_point_of_use_leaves_no_file(tiny_stores, model_checkpoint, tmp_path, monkeypatch,
                                                            capsys):
    """Without a mount: results.csv's write fails with ENOSPC on the open file (no file name in
    the error): one line naming --out, the earlier results and the directory as they were."""
    from stage_dist.core import fileio

    out = tmp_path / "results.csv"
    out.write_text("old,0902,0.1,0.1,0.5,0.5,1,0.5\n")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", full)
    before = snapshot(tmp_path)
    outcome = run_main(infer.main, ["--store", str(tiny_stores.val), "--checkpoint", str(model_checkpoint),
                                    "--out", str(out), "--device", "cpu", "--workers", "0"], capsys)
    monkeypatch.setattr(fileio.os, "fsync", real_fsync)
    message = assert_clean_failure(outcome, before, snapshot(tmp_path), code=2, names=["--out", str(out)])
    assert message == (f"error: {out}: cannot write --out: no space left on the device while writing it (No space "
                       "left on device); the previous file is kept; free some space and rerun")


def test_ensure_free_space_of_a_path_not_made_yet(tmp_path):
    ensure_free_space(tmp_path / "a" / "b", 1)  # its filesystem is the nearest existing ancestor's
    with pytest.raises(OSError) as info:
        ensure_free_space(tmp_path / "a" / "b", 1 << 62, "the arrays")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "a" / "b")
    assert "needed for the arrays" in info.value.strerror
