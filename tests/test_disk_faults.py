"""Faults of a shared machine in training and inference: a full disk while a checkpoint or
results.csv is written (one line, exit 2, the previous file intact, a rerun succeeds), and a
SIGTERM/SIGINT while they are written (no temporary file or lock left that blocks the next run).

The full disk is real: a size-limited tmpfs (``mount -t tmpfs -o size=...``), skipped where this
process may not mount one (not root)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stage_dist.core.config import to_argv
from stage_dist.engine.checkpoint import read_checkpoint
from stage_dist.infer import main as infer_main
from stage_dist.train import main as train_main
from tests.conftest import subprocess_env
from tests.test_train import make_config


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs at tmp_path/disk; ``resize(bytes)`` changes its size (it starts at 64 KiB)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def resize(size: int) -> None:
        size = -(-size // 4096) * 4096
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    try:
        yield mount_point, resize
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _used(directory: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in directory.rglob("*") if p.is_file())


def _temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.rglob(".tmp-*")]


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_a_rerun_succeeds(
        tiny_stores, tmp_path, small_disk, capsys):
    disk, resize = small_disk
    resize(64 << 20)
    out = disk / "run"
    argv = to_argv(make_config(tiny_stores, out, val_store=None, max_steps=6, checkpoint_every=3,
                               log_every=3, tensorboard_dir=str(tmp_path / "tb")))
    probe = make_config(tiny_stores, tmp_path / "probe", val_store=None, max_steps=3, log_every=3)
    assert train_main(to_argv(probe)) == 0
    checkpoint_bytes = next((tmp_path / "probe" / "checkpoints").glob("ckpt_*.pt")).stat().st_size
    resize(_used(tmp_path / "probe") - _used(tmp_path / "probe" / "tensorboard") + checkpoint_bytes // 2)
    capsys.readouterr()

    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: {out}: cannot write --output-dir: {out}/checkpoints/ckpt_e0000_s000006.pt: no space "
                       "left on the device while writing it (No space left on device); nothing was written; free "
                       "some space and rerun"), err
    (kept,) = sorted((out / "checkpoints").glob("ckpt_*.pt"))
    assert read_checkpoint(kept).training.global_step == 3
    assert _temporaries(out) == []

    resize(64 << 20)
    assert train_main(argv) == 0
    newest = sorted((out / "checkpoints").glob("ckpt_*.pt"))[-1]
    assert read_checkpoint(newest).training.global_step == 6


@pytest.fixture(scope="module")
def trained(tiny_stores, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train_main(to_argv(make_config(tiny_stores, out, val_store=None, max_steps=2))) == 0
    return out / "checkpoints"


def test_disk_full_during_results_csv_keeps_the_previous_file_and_a_rerun_succeeds(
        tiny_stores, trained, tmp_path, small_disk, capsys):
    disk, resize = small_disk
    resize(64 << 20)
    base = ["--store", str(tiny_stores.val), "--checkpoint", str(trained), "--device", "cpu", "--workers", "0"]
    assert infer_main([*base, "--out", str(tmp_path / "full.csv")]) == 0
    out = disk / "results.csv"
    assert infer_main([*base, "--out", str(out), "--topk", "1"]) == 0
    previous = out.read_bytes()
    full_size = (tmp_path / "full.csv").stat().st_size
    assert full_size > 2 * len(previous) + 8192
    resize(len(previous) + full_size // 2)
    capsys.readouterr()

    assert infer_main([*base, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: {out}: cannot write --out: no space left on the device while writing it "
                       "(No space left on device); the previous file is kept; free some space and rerun"), err
    assert out.read_bytes() == previous and _temporaries(disk) == []

    resize(64 << 20)
    assert infer_main([*base, "--out", str(out)]) == 0
    assert out.read_bytes() == (tmp_path / "full.csv").read_bytes()


def test_sigint_during_a_checkpoint_write_leaves_nothing_that_blocks_the_rerun(tiny_stores, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) while the checkpoint's bytes are being synced: the temporary file
    is removed, the lock released, and the rerun resumes from the previous checkpoint."""
    import stage_dist.core.fileio as fileio

    out = tmp_path / "run"
    argv = to_argv(make_config(tiny_stores, out, val_store=None, max_steps=6, checkpoint_every=3, log_every=3))
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).parent == out / "checkpoints":  # not metrics.jsonl's
            calls.append(fd)
            if len(calls) == 2:  # the step-3 checkpoint's file, then the step-6 checkpoint's file
                raise KeyboardInterrupt
        return real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        train_main(argv)
    monkeypatch.undo()
    assert _temporaries(out) == []
    assert [read_checkpoint(p).training.global_step for p in sorted((out / "checkpoints").glob("ckpt_*.pt"))] == [3]
    assert train_main(argv) == 0
    assert read_checkpoint(sorted((out / "checkpoints").glob("ckpt_*.pt"))[-1]).training.global_step == 6


SLOW_WRITE_DRIVER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import stage_dist.core.fileio as fileio
    marker, module = Path(sys.argv[1]), sys.argv[2]

    def fsync(fd):  # the process is killed while a file is half written
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".tmp-"):
            marker.touch()
            time.sleep(60)
        return os.fsync(fd)

    fileio.os = type(os)("os_with_slow_fsync")
    fileio.os.__dict__.update(os.__dict__, fsync=fsync)
    main = __import__(module, fromlist=["main"]).main
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/fd")
@pytest.mark.parametrize("job", ["train", "infer"])
def test_sigterm_while_writing_leaves_nothing_that_blocks_the_next_run(tiny_stores, trained, tmp_path, job):
    """SIGTERM kills the job (train with --preempt-signals none: the default action) while its
    checkpoint or results.csv is half written: the next run takes over the lock, removes the
    temporary file and completes."""
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_WRITE_DRIVER)
    marker = tmp_path / "writing"
    if job == "train":
        out = tmp_path / "run"
        args = to_argv(make_config(tiny_stores, out, val_store=None, max_steps=2, preempt_signals="none"))
        module, directory = "stage_dist.train", out / "checkpoints"
    else:
        out = tmp_path / "results.csv"
        args = ["--store", str(tiny_stores.val), "--checkpoint", str(trained), "--out", str(out), "--device", "cpu",
                "--workers", "0"]
        module, directory = "stage_dist.infer", tmp_path
    process = subprocess.Popen([sys.executable, str(driver), str(marker), module, *args], env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGTERM
    assert _temporaries(directory), "the killed job left its temporary file"
    rerun = subprocess.run([sys.executable, "-m", module, *args], env=subprocess_env(), capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _temporaries(directory) == []
