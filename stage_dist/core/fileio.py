"""Atomic file writes: a crash never leaves a partial file under the final name.

Checkpoints, ``best.json`` and ``results.csv`` are written to a temporary file in the target's
directory (named ``.tmp-<name>.*``, so listings can skip it), flushed and fsynced, then renamed
over the target; the directory is fsynced so the rename survives a power loss. A full disk
(ENOSPC, or a quota: EDQUOT) is a :class:`NoSpaceError`, one line naming the file: the temporary
file is removed and the previous file under the name is untouched.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from stage_dist.core.errors import UserInputError

TMP_PREFIX = ".tmp-"
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class NoSpaceError(UserInputError):
    """The disk (or quota) filled up while writing a file; nothing under its name changed."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail  # what happened and what was kept, without the path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{target.name}.", dir=target.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the result should look like any new file
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
            kept = "the previous file is kept" if target.exists() else "nothing was written"
            raise NoSpaceError(target, f"no space left on the device while writing it ({err.strerror}); {kept}; "
                                       "free some space and rerun") from None
        raise
    _fsync_directory(target.parent)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer of ``path`` left beside it (call only while
    holding the path's one-writer lock); returns them."""
    target = Path(path)
    stale = sorted(target.parent.glob(f"{TMP_PREFIX}{target.name}.*")) if target.parent.is_dir() else []
    for temporary in stale:
        temporary.unlink(missing_ok=True)
    return stale


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform or filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
