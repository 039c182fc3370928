"""What the project's writers may write over: output checks, ownership markers, one-writer locks.

Every tool that writes (the converter's store, the shard writer, train's output directory,
infer's ``--out``) calls these before it does any work, so that:

- an output never is, contains or lies inside one of the run's inputs (:func:`check_not_input`);
- a directory is only emptied when this project made it: it holds a marker file
  (:data:`MARKER_NAME`, written by :func:`write_marker` at creation) naming its *kind* (or,
  for outputs older than markers, a store's zarr.json or a shards manifest), or it is empty. A
  directory holding anything else, or an output of another kind, is never touched
  (:func:`prepare_output_dir`, :func:`clear_output_dir`); the directory itself is kept when
  it is emptied, so its permissions and ownership stay the user's;
- one process writes an output at a time (:func:`lock_output`): an advisory ``flock`` on a lock
  file beside the output (``.<name>.lock`` in its parent; inside an existing directory whose
  parent is read-only) that records the holder's pid, host and start time. A second writer
  stops at once naming the holder; the kernel releases the lock of a dead process, so a lock
  left by a killed run is taken over (and said so). The file is removed on release. On a
  filesystem without ``flock`` (Lustre mounted without ``-o flock``, NFS without lockd: ENOSYS,
  ENOLCK, EOPNOTSUPP) the lock file's exclusive creation is the lock instead, with a warning; a
  file left by a dead holder on the same host is stale and removed, one from another host is
  reported with its holder (remove it by hand once that job is gone).

:func:`claim_output_dir` does all of it for a directory output (the shard writer, the demo);
the converter uses the parts (its store is marked by its zarr.json), and so does the trainer
(:func:`check_not_input`, then :func:`lock_output` on ``--output-dir`` by rank 0);
:func:`check_output_file` and :func:`lock_output` serve a file output (infer's ``--out``).

Paths are resolved first (a symlinked output writes into its target, under the same rules).
Problems are :class:`OutputError`, a one-line message naming the path; the CLIs print it and exit 2.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

from stage_dist.core.errors import UserInputError
from stage_dist.core.paths import check_target

log = logging.getLogger(__name__)

MARKER_NAME = ".stage_dist-output.json"  # inside a directory this project created: {"kind": ...}
LOCK_NAME = ".stage_dist.lock"  # inside a directory output whose parent is not writable
KEEP_WHEN_CLEARING = frozenset({LOCK_NAME})


class OutputError(UserInputError):
    """An output that cannot be written as asked; the message names the path and why."""


def resolve_output(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` absolute with every symlink resolved (it need not exist yet)."""
    try:
        return Path(path).expanduser().resolve(strict=False)
    except (RuntimeError, OSError) as e:  # symlink loop (RuntimeError before Python 3.13)
        raise OutputError(f"{what} {path}: cannot resolve the path ({e})") from None


def _resolved_inputs(inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> list[tuple[str, Path]]:
    out = []
    for name, value in inputs:
        if value is not None:
            out.append((name, resolve_output(value, name)))
    return out


def check_not_input(out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]],
                    what: str = "--out") -> None:
    """Refuse an output that equals, contains or lies inside one of ``inputs`` ((flag, path) pairs).

    Paths are compared resolved, so a symlink to an input is the input.
    """
    target = resolve_output(out, what)
    shown = f"{what} {out}" + (f" (-> {target})" if Path(out).absolute() != target else "")
    for name, source in _resolved_inputs(inputs):
        if target == source:
            raise OutputError(f"{shown} is the input {name} {source}: refusing to write over an input")
        if source.is_relative_to(target):
            raise OutputError(f"{shown} contains the input {name} {source}: refusing to write there")
        if target.is_relative_to(source):
            raise OutputError(f"{shown} lies inside the input {name} {source}: refusing to write there")


# --------------------------------------------------------------------------- markers


def read_marker(directory: Path) -> dict | None:
    """The marker of a directory this project wrote; None if there is none (or it is unreadable)."""
    try:
        marker = json.loads((Path(directory) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def write_marker(directory: Path, kind: str, **info: object) -> None:
    """Mark ``directory`` as an output of ``kind`` made by this project (atomic replace)."""
    from stage_dist import __version__

    target = Path(directory) / MARKER_NAME
    tmp = target.with_name(f"{MARKER_NAME}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"kind": kind, "version": __version__, "created": time.time(), **info}))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no temporary behind
        raise


def _visible_entries(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name not in KEEP_WHEN_CLEARING | {MARKER_NAME})


DirState = Literal["new", "empty", "ours"]


@dataclass(frozen=True)
class OutputDir:
    """A checked output directory: its resolved ``path`` and what was there (``state``)."""

    path: Path
    state: DirState  # new: did not exist; empty: existed, nothing in it; ours: holds an output of this kind


def _json_file(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def known_kind(directory: Path) -> str | None:
    """The kind of project output in ``directory`` by its marker, or by the signature of outputs
    written before markers existed (a store's zarr.json attributes, a shards manifest.json)."""
    marker = read_marker(directory)
    if marker is not None:
        return marker["kind"]
    if "stage_dist" in _json_file(Path(directory) / "zarr.json").get("attributes", {}):
        return "feature store"
    if _json_file(Path(directory) / "manifest.json").get("format") == "stage_dist.shards":
        return "webdataset shards"
    return None


def _kind_of(directory: Path, kind: str, recognise: Callable[[Path], bool] | None) -> str | None:
    """The kind of project output ``directory`` holds (``recognise`` may claim it as ``kind``)."""
    if recognise is not None and recognise(directory):
        return kind
    return known_kind(directory)


def prepare_output_dir(path: str | os.PathLike, kind: str, *,
                       inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
                       recognise: Callable[[Path], bool] | None = None,
                       what: str = "--out") -> OutputDir:
    """Check that ``path`` may be this run's output directory of ``kind``; nothing is written.

    Refused (:class:`OutputError`): a path that is, contains or lies inside an input; an existing
    file; a directory holding another kind of project output; a non-empty directory without
    this project's marker (``recognise(dir)`` may accept outputs written before markers
    existed); a missing parent or one that is not a writable directory.
    """
    target = resolve_output(path, what)
    check_not_input(path, inputs, what)
    shown = f"{what} {path}" + (f" (-> {target})" if Path(path).absolute() != target else "")
    if os.path.exists(target) and not os.path.isdir(target):
        raise OutputError(f"{shown}: is a file, not a directory")
    check_target(path, what, kind="dir")  # read-only, over-long names, a path through a file, symlink loops
    if not target.exists():
        parent = _existing_parent(target)
        if not parent.is_dir():
            raise OutputError(f"{shown}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{shown}: cannot create it, {parent} is not writable")
        return OutputDir(target, "new")
    if not os.access(target, os.R_OK | os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: directory is not writable")
    found = _kind_of(target, kind, recognise)
    if found is not None and found != kind:
        raise OutputError(f"{shown}: holds a {found}, not a {kind}; refusing to write over it")
    if found == kind:
        return OutputDir(target, "ours")
    entries = _visible_entries(target)
    if entries:
        listed = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutputError(f"{shown}: directory holds files this project did not write ({listed}); "
                          f"refusing to write there (give a new or empty directory)")
    return OutputDir(target, "empty")


def _existing_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def clear_output_dir(out: OutputDir, kind: str, recognise: Callable[[Path], bool] | None = None,
                     what: str = "--out") -> None:
    """Delete what is inside an output directory of ``kind`` this project wrote, keeping the
    directory (its permissions and owner) and its lock file. Anything else is refused."""
    if out.state == "new" or not out.path.exists():
        return
    found = _kind_of(out.path, kind, recognise)
    if found != kind and _visible_entries(out.path):
        raise OutputError(f"{what} {out.path}: not a {kind} this project wrote; refusing to delete it")
    empty_directory(out.path)
    log.info("%s: emptied the previous %s", out.path, kind)


def empty_directory(directory: Path) -> None:
    """Delete everything inside ``directory`` but its lock file, keeping the directory itself
    (its permissions and owner). No ownership check: callers check with :func:`prepare_output_dir`.
    A refused deletion is an :class:`OutputError` naming the entry."""
    for entry in os.scandir(directory):
        if entry.name in KEEP_WHEN_CLEARING:
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as e:
            raise OutputError(f"{entry.path}: cannot delete it ({e.strerror or e}) while emptying "
                              f"{directory}") from None


def check_output_file(path: str | os.PathLike, *,
                      inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
                      what: str = "--out") -> Path:
    """Check that ``path`` may be written as a file: not an input, not a directory, its parent a
    writable directory. Returns the resolved path. (Whether an existing file may be replaced is
    the caller's rule, e.g. never a checkpoint.)"""
    target = resolve_output(path, what)
    check_not_input(path, inputs, what)
    if os.path.isdir(target):
        raise OutputError(f"{what} {path}: is a directory, expected a file path")
    parent = _existing_parent(target)
    if not parent.is_dir():
        raise OutputError(f"{what} {path}: {parent} is not a directory")
    check_target(path, what, kind="file")  # read-only, over-long names (its lock's and temporary's too), loops
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise OutputError(f"{what} {path}: not writable ({parent if not target.exists() else target})")
    return target


# --------------------------------------------------------------------------- locks


def lock_path(output: Path) -> Path:
    """The lock file of an output: ``.<name>.lock`` beside it, or :data:`LOCK_NAME` inside an
    existing directory whose parent is not writable."""
    output = Path(output)
    beside = output.parent / f".{output.name}.lock"
    if output.is_dir() and not beside.exists() and not os.access(output.parent, os.W_OK | os.X_OK):
        return output / LOCK_NAME
    return beside


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(text: str) -> dict:
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


# flock errors that mean "this filesystem has no flock", not "someone holds it"
FLOCK_UNSUPPORTED = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})
UNWRITTEN_LOCK_GRACE_SECONDS = 30.0  # an empty lock file younger than this is being written by its holder


def _open_lock_file(path: Path) -> tuple[int, bool]:
    """Open (creating it if absent) the lock file; also say whether this call created it."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), True
    except FileExistsError:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC), False


def _is_current(path: Path, fd: int) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not removed or replaced since it was opened)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _stale_without_flock(holder: dict, mtime: float) -> str | None:
    """Why a lock file is stale when there is no flock to tell (None: it may be held).

    A holder on this host is stale when its pid is gone; a holder on another host cannot be
    checked from here and is held until removed by hand."""
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int) or not isinstance(host, str):
        age = time.time() - mtime
        return f"no holder recorded, {age:.0f} s old" if age > UNWRITTEN_LOCK_GRACE_SECONDS else None
    if host == socket.gethostname() and not _pid_alive(pid):
        return "no longer running"
    return None


class OutputLock:
    """An exclusive advisory lock on one output; use :func:`lock_output`. Context manager."""

    def __init__(self, output: Path, what: str = "--out") -> None:
        self.output = resolve_output(output, what)
        self.file = lock_path(self.output)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        while True:
            try:
                fd, created = _open_lock_file(self.file)
            except FileNotFoundError:
                continue  # the holder removed it between our two opens: try again
            except OSError as e:
                raise OutputError(f"{self.what} {self.output}: cannot create the lock file {self.file}: "
                                  f"{e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in FLOCK_UNSUPPORTED:
                    if self._acquire_without_flock(fd, created, e):
                        return self
                    continue
                holder = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(
                        f"{self.what} {self.output}: cannot lock {self.file}: {e.strerror or e}") from None
                raise self._held_by(holder) from None
            if _is_current(self.file, fd):  # the holder before us may have removed it after we opened it
                break
            os.close(fd)
        old = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        if old.get("pid"):
            log.warning("%s: taking over the lock left by pid %s on %s (it did not finish; %s)", self.output,
                        old.get("pid"), old.get("host"),
                        "still running but no longer holding it"
                        if old.get("host") == socket.gethostname() and _pid_alive(int(old["pid"]))
                        else "no longer running")
        self._own(fd)
        return self

    def _acquire_without_flock(self, fd: int, created: bool, error: OSError) -> bool:
        """The lock where ``flock`` is not available (Lustre without ``-o flock``, NFS without
        lockd): the lock file's exclusive creation is the lock, and its pid/host record decides
        whether an existing file is stale. Returns False when a stale file was removed (retry)."""
        if created:
            log.warning("%s: the filesystem of %s does not support flock (%s); locking by exclusive "
                        "creation of the lock file instead", self.output, self.file, error.strerror or error)
            self._own(fd)
            return True
        holder = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        stale = _stale_without_flock(holder, os.fstat(fd).st_mtime)
        if stale is None:
            os.close(fd)
            raise self._held_by(holder, "; no flock on this filesystem: once that job is gone, remove the "
                                        "lock file by hand")
        log.warning("%s: flock is not supported on %s's filesystem; removing the stale lock file left by "
                    "pid %s on %s (%s)", self.output, self.file, holder.get("pid", "?"), holder.get("host", "?"),
                    stale)
        if _is_current(self.file, fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file)
        os.close(fd)
        return False

    def _held_by(self, holder: dict, hint: str = "") -> OutputError:
        since = (f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['time']))}"
                 if isinstance(holder.get("time"), (int, float)) else "")
        return OutputError(f"{self.what} {self.output}: another process is writing it (pid "
                           f"{holder.get('pid', '?')} on {holder.get('host', '?')}{since}; lock file "
                           f"{self.file}{hint})")

    def _own(self, fd: int) -> None:
        try:
            os.ftruncate(fd, 0)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        except OSError as e:  # a full disk: no lock file left behind
            with contextlib.suppress(OSError):
                os.unlink(self.file)
            os.close(fd)
            raise OutputError(f"{self.what} {self.output}: cannot write the lock file {self.file}: "
                              f"{e.strerror or e}") from None
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and unlock (a writer that dies leaves the file, named as stale)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.file)
        except OSError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_output(output: str | os.PathLike, what: str = "--out") -> OutputLock:
    """Take the one-writer lock of ``output`` (a directory that exists, or a file path) or raise
    :class:`OutputError` naming the holder. Use as ``with lock_output(path): ...``."""
    return OutputLock(Path(output), what).acquire()


def launch_lock(output: str | os.PathLike, what: str = "--out") -> "OutputLock | contextlib.AbstractContextManager":
    """The output's lock for a job started by ``torchrun`` (or plainly): taken by the launch's rank 0
    (``RANK`` 0 or unset) for the whole job, so a second job writing the same output stops at once
    naming the holder; other ranks get a no-op context."""
    if not is_launch_rank_zero():
        return contextlib.nullcontext()
    return lock_output(output, what)


def is_launch_rank_zero() -> bool:
    """Whether this process is the launch's rank 0 (``RANK`` 0 or unset): the one that holds an
    output's lock and so the one that may remove what it created. Read without torch, before or
    after the process group; a malformed ``RANK`` counts as rank 0 (``init_distributed`` names it)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


@contextmanager
def claim_output_dir(path: str | os.PathLike, kind: str, *,
                     inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
                     overwrite: bool = False, recognise: Callable[[Path], bool] | None = None,
                     what: str = "--out") -> Iterator[OutputDir]:
    """Check, create (marked), lock and, with ``overwrite``, empty an output directory of ``kind``;
    yields it (``state`` as found: ``ours`` means an earlier output of this kind is there to
    resume or replace). The lock is held until the block ends. Raises :class:`OutputError`."""
    inputs = list(inputs)
    target = prepare_output_dir(path, kind, inputs=inputs, recognise=recognise, what=what)
    created = target.state == "new"
    try:
        target.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot create it: {e.strerror or e}") from None
    try:
        lock = lock_output(target.path, what)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                target.path.rmdir()  # leave nothing behind
        raise
    with lock:
        try:
            checked = prepare_output_dir(target.path, kind, inputs=inputs, recognise=recognise, what=what)
            if overwrite and checked.state == "ours":
                clear_output_dir(checked, kind, recognise, what)
            write_marker(checked.path, kind)
            yield OutputDir(checked.path, "new" if created else checked.state)
        except BaseException:
            if created and target.path.is_dir() and not _visible_entries(target.path):
                shutil.rmtree(target.path, ignore_errors=True)  # only our marker in it: leave nothing behind
            raise
