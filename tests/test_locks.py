"""The one-writer lock on filesystems without flock (Lustre without ``-o flock``, NFS without
lockd): simulated by making ``fcntl.flock`` fail as those filesystems do."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stage_dist.core import outputs
from stage_dist.core.outputs import OutputError, lock_output, lock_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP], ids=["ENOSYS", "ENOLCK", "EOPNOTSUPP"])
def no_flock(request, monkeypatch):
    def flock(fd, operation):
        raise OSError(request.param, os.strerror(request.param))
    monkeypatch.setattr(outputs.fcntl, "flock", flock)
    return request.param


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_lock_is_taken_with_a_warning_and_removed_on_release(no_flock, tmp_path, caplog):
    out = tmp_path / "store.zarr"
    with caplog.at_level(logging.WARNING, logger="stage_dist.core.outputs"):
        with lock_output(out):
            holder = json.loads(lock_path(out).read_text())
            assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert "does not support flock" in caplog.text and os.strerror(no_flock) in caplog.text
    assert not lock_path(out).exists()


def test_second_writer_is_refused_naming_the_holder(no_flock, tmp_path):
    out = tmp_path / "results.csv"
    with lock_output(out):
        with pytest.raises(OutputError, match=rf"another process is writing it \(pid {os.getpid()} on "
                                              rf"{socket.gethostname()}.*remove the lock file by hand"):
            lock_output(out)
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()  # the holder's record is untouched


def test_a_dead_holders_lock_is_taken_over(no_flock, tmp_path, caplog):
    out = tmp_path / "run"
    dead = _dead_pid()
    lock_path(out).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "time": time.time()}))
    with caplog.at_level(logging.WARNING, logger="stage_dist.core.outputs"):
        with lock_output(out, "--output-dir"):
            assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert f"stale lock file left by pid {dead}" in caplog.text
    assert not lock_path(out).exists()


def test_a_holder_on_another_host_is_never_taken_over(no_flock, tmp_path):
    out = tmp_path / "run"
    record = json.dumps({"pid": _dead_pid(), "host": "some-other-node", "time": time.time()})
    lock_path(out).write_text(record)
    with pytest.raises(OutputError, match="on some-other-node"):
        lock_output(out)
    assert lock_path(out).read_text() == record


def test_an_empty_lock_file_is_held_while_young_and_stale_when_old(no_flock, tmp_path):
    out = tmp_path / "run"
    lock_path(out).touch()  # a holder between creating the file and writing its record
    with pytest.raises(OutputError, match="another process is writing it"):
        lock_output(out)
    old = time.time() - 2 * outputs.UNWRITTEN_LOCK_GRACE_SECONDS
    os.utime(lock_path(out), (old, old))
    with lock_output(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()


_NO_FLOCK_HOLDER = """
import errno, fcntl, os, sys, time
def flock(fd, operation):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
fcntl.flock = flock
from stage_dist.core.outputs import lock_output
lock = lock_output(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_killed_holder_does_not_block_the_next_run(no_flock, tmp_path):
    out = tmp_path / "store.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _NO_FLOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            lock_output(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock_output(out):  # the file is still there, but its holder is dead
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("rank,removed", [(None, True), ("0", True), ("1", False)])
def test_only_rank_zero_removes_the_output_dir_a_failed_run_created(tmp_path, monkeypatch, rank, removed):
    """A rank that fails at once must not remove the new --output-dir: rank 0 may be about to
    write its config.json there (a race seen in CI as ENOENT on rank 0)."""
    from stage_dist.core.config import from_flat
    from stage_dist.engine.train_config import TrainConfig
    from stage_dist.engine.trainer import run_lock

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    out = tmp_path / "run"
    config = from_flat(TrainConfig, train_store=str(tmp_path / "train.zarr"), output_dir=str(out))
    with pytest.raises(RuntimeError, match="rank failed"):
        with run_lock(config):
            assert out.is_dir()
            raise RuntimeError("rank failed")
    assert out.exists() is not removed
