"""User paths: the one place where the OS's verdict on a path a user gave becomes one line.

Every path a user gives (a flag or config key: ``--output-dir``, ``--memmap-dir``, ``--out``,
``--json`` ...) and every file the project derives from one (lock files, temporary files,
checkpoints, memmap copies, val results, TensorBoard logs) is covered twice:

- up front, before any work, by :func:`check_target`: every existing ancestor is a directory (not
  a file: ENOTDIR; not a symlink loop: ELOOP), the directory the run writes in is on a filesystem
  mounted read-write (EROFS) and writable (EACCES), every name the run will create there (the
  path's missing components, and the derived names beside or inside it) fits the filesystem's
  ``PC_NAME_MAX`` and the whole path its ``PC_PATH_MAX`` (ENAMETOOLONG), and, where the caller
  knows how much it will write, that much is free (ENOSPC). :func:`ensure_free_space` is the free-
  space check at the point of use (before a write whose size is known);
- at the point of use, by :func:`user_path_errors`: an :class:`OSError` whose file is one of the
  user paths, lies under it, is a missing ancestor of it, or is derived beside it
  (``.<name>.lock``, ``.tmp-<name>.*``) becomes a :class:`PathError`.

Either way the message is one line, ``PATH: cannot write FLAG: [FILE: ]REASON``; the CLIs print it
and exit 2. An OSError about any other path, and every other exception (a programming error),
passes unchanged.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Mapping

from stage_dist.core.errors import UserInputError
from stage_dist.core.fileio import TMP_PREFIX, NoSpaceError

UserPaths = Mapping[str, "str | os.PathLike[str] | None"]  # flag (or config key) -> the path as given

MKSTEMP_SUFFIX = 8  # the random part of a tempfile.mkstemp name
NAME_MAX_DEFAULT = 255
PATH_MAX_DEFAULT = 4096


class PathError(UserInputError):
    """The OS refuses a path a user gave (or a file derived from it); the message names the path,
    the flag and why."""


def error_message(flag: str, path: str | os.PathLike[str], reason: str,
                  file: str | os.PathLike[str] | None = None) -> str:
    """``PATH: cannot write FLAG: [FILE: ]REASON`` (FILE when it is not PATH itself)."""
    shown = os.fspath(path)
    where = f"{os.fspath(file)}: " if file is not None and _absolute(file) != _absolute(shown) else ""
    return f"{shown}: cannot write {flag}: {where}{reason}"


def file_names(name: str) -> list[str]:
    """The names a file output ``name`` makes beside itself: its own, its lock file
    (:mod:`stage_dist.core.outputs`) and its atomic-write temporary (:mod:`stage_dist.core.fileio`)."""
    return [name, f".{name}.lock", f"{TMP_PREFIX}{name}.{'x' * MKSTEMP_SUFFIX}"]


def dir_names(name: str) -> list[str]:
    """The names a directory output ``name`` makes beside itself: its own and its lock file."""
    return [name, f".{name}.lock"]


# --------------------------------------------------------------------------- up front


def check_target(path: str | os.PathLike[str], flag: str, *, kind: Literal["file", "dir"],
                 inside: Iterable[str] = (), need_bytes: int = 0) -> None:
    """Refuse (:class:`PathError`), before any work, a ``path`` the run could not create or write.

    ``kind`` is what the run makes there: a ``file`` (replaced atomically, so its directory must be
    writable; its lock and temporary names must fit) or a ``dir`` (created, or written into;
    ``inside`` are the longest names it creates in it). ``need_bytes`` (0: unknown) is the least
    the run writes there. Nothing is created. Rules that are the caller's (an existing file may not
    be replaced, a directory holds foreign files, ...) are not checked here.
    """
    given = os.fspath(path)
    target = Path(_absolute(given))
    fail = _failer(flag, given)
    missing: list[str] = []  # the components to create, outermost first
    probe = target
    while True:
        try:
            found = os.stat(probe)
            break
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG) or probe == probe.parent:
                raise fail(err.strerror or str(err), probe) from None
            missing.insert(0, probe.name)
            probe = probe.parent
    if not stat.S_ISDIR(found.st_mode):
        if missing:
            raise fail(f"{probe} is not a directory ({os.strerror(errno.ENOTDIR)})")
        if kind == "dir":
            raise fail(f"exists and is not a directory ({os.strerror(errno.ENOTDIR)})")
        directory, names = target.parent, file_names(target.name)
    elif missing:
        first = probe / missing[0]
        if os.path.islink(first):  # a link whose target cannot be reached: a loop, or a dangling link
            try:
                os.stat(first)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise fail(f"a symlink loop ({err.strerror})", first) from None
        directory = probe
        names = missing[:-1] + (file_names(missing[-1]) if kind == "file" else dir_names(missing[-1]))
    else:
        if kind == "file":
            raise fail(f"is a directory ({os.strerror(errno.EISDIR)})")
        directory, names = target, []
    names += list(inside) if kind == "dir" else []
    name_max = _pathconf(directory, "PC_NAME_MAX", NAME_MAX_DEFAULT)
    for name in names:
        size = len(os.fsencode(name))
        if size > name_max:
            shown = name if len(name) <= 40 else f"{name[:20]}...{name[-12:]}"
            raise fail(f"the name {shown} is {size} bytes, the filesystem allows {name_max} "
                       f"({os.strerror(errno.ENAMETOOLONG)})")
    longest = max([len(os.fsencode(n)) + 1 for n in inside] if kind == "dir" else [0], default=0)
    path_max = _pathconf(directory, "PC_PATH_MAX", PATH_MAX_DEFAULT)
    if len(os.fsencode(str(target))) + longest >= path_max:
        raise fail(f"the path is longer than the {path_max} bytes the filesystem allows "
                   f"({os.strerror(errno.ENAMETOOLONG)})")
    try:
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise fail(f"{directory} is on a {os.strerror(errno.EROFS).lower()}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise fail(f"{directory} is not writable ({os.strerror(errno.EACCES)})")
    if need_bytes > 0:
        try:
            ensure_free_space(directory, need_bytes)
        except OSError as err:
            raise fail(err.strerror or str(err)) from None


def ensure_free_space(directory: str | os.PathLike[str], need_bytes: int, what: str = "") -> None:
    """Raise ``OSError(ENOSPC)`` naming ``directory`` unless ``need_bytes`` are free on its
    filesystem (:func:`user_path_errors` names the flag). ``what`` says what needs them."""
    existing = Path(_absolute(directory))
    while not os.path.isdir(existing) and existing != existing.parent:  # not made yet: its filesystem
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # cannot tell: the write itself will say
    if free < need_bytes:
        purpose = f" for {what}" if what else ""
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({_size(need_bytes)} needed{purpose}, "
                                    f"{_size(free)} free)", os.fspath(directory))


# --------------------------------------------------------------------------- at the point of use


@contextmanager
def user_path_errors(paths: UserPaths, *, writing: str | None = None) -> Iterator[None]:
    """Turn an :class:`OSError` about one of ``paths`` ({flag: path}) into a :class:`PathError`
    naming the flag, the path and the reason; any other exception passes unchanged.

    ``writing`` is the flag of the one path the block writes to: an OSError that names no file (a
    ``write`` on an open handle: ENOSPC, EIO) is about it. Without it such an error passes.
    """
    try:
        yield
    except OSError as err:
        error = path_error(err, paths, writing=writing)
        if error is None:
            raise
        raise error from None
    except NoSpaceError as err:  # an atomic write that filled the disk: name the flag too
        error = _no_space_error(err, paths)
        if error is None:
            raise
        raise error from None


def _no_space_error(err: NoSpaceError, paths: UserPaths) -> PathError | None:
    for flag, path in paths.items():
        if path is not None and _covers(os.fspath(path), os.fspath(err.path)):
            return PathError(error_message(flag, path, err.detail, err.path))
    return None


def path_error(err: OSError, paths: UserPaths, *, writing: str | None = None) -> PathError | None:
    """The :class:`PathError` for ``err`` if it is about one of ``paths``, else None."""
    reason = err.strerror or str(err)
    files = [f for f in (err.filename, err.filename2) if f is not None and not isinstance(f, int)]
    for file in files:
        for flag, path in paths.items():
            if path is not None and _covers(os.fspath(path), os.fsdecode(file)):
                return PathError(error_message(flag, path, reason, os.fsdecode(file)))
    if not files and writing is not None and paths.get(writing) is not None:
        return PathError(error_message(writing, paths[writing], reason))  # type: ignore[arg-type]
    return None


def user_path_message(error: BaseException, paths: UserPaths, *, writing: str | None = None) -> str | None:
    """The line naming the flag for an OSError (or an atomic write's full disk) about one of
    ``paths`` (``writing`` as in :func:`user_path_errors`); None for any other error."""
    problem = None
    if isinstance(error, OSError):
        problem = path_error(error, paths, writing=writing)
    elif isinstance(error, NoSpaceError):
        problem = _no_space_error(error, paths)
    return None if problem is None else str(problem)


# --------------------------------------------------------------------------- helpers


def _covers(user: str, file: str) -> bool:
    """``file`` is ``user``, lies under it, is a missing ancestor of it, or is one of the names
    derived beside it (``.<name>...``, ``.tmp-<name>...``); compared as given and resolved."""
    for mine in {_absolute(user), _real(user)}:
        for theirs in {_absolute(file), _real(file)}:
            if theirs == mine or theirs.startswith(mine.rstrip(os.sep) + os.sep):
                return True
            if mine.startswith(theirs.rstrip(os.sep) + os.sep) and not os.path.isdir(theirs):
                return True  # an ancestor the run was creating for the path
            parent, name = os.path.split(mine)
            their_parent, their_name = os.path.split(theirs)
            if their_parent == parent and their_name.startswith((f".{name}", f"{TMP_PREFIX}{name}")):
                return True
    return False


def _absolute(path: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def _real(path: str | os.PathLike[str]) -> str:
    try:
        return os.path.realpath(os.path.expanduser(os.fspath(path)))
    except (OSError, RuntimeError, ValueError):
        return _absolute(path)


def _pathconf(directory: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(directory, name)
    except (OSError, ValueError):
        return default
    return value if value and value > 0 else default


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _failer(flag: str, given: str) -> Callable[..., PathError]:
    def fail(reason: str, file: str | os.PathLike[str] | None = None) -> PathError:
        return PathError(error_message(flag, given, reason, file))
    return fail
