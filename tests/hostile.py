"""Harness for hostile-input tests: run a tool on a bad case and check it failed cleanly.

A hostile case passes when the tool

- exits with the expected code (2 for bad input or output),
- prints an error that names what is wrong (the strings given, e.g. the path) and no traceback,
- changed no file it was not asked to write: every file under the watched trees has the same
  sha256, every directory the same mode, and nothing appeared or vanished
  (:func:`snapshot` before and after).

Used by ``tests/test_hostile_inputs.py`` (convert, shards) and the other tools'
``tests/test_hostile_<tool>.py``::

    from tests.hostile import Outcome, run_main, run_module, assert_clean_failure, snapshot

    before = snapshot(tmp_path)
    outcome = run_main(convert.main, argv, capsys)
    assert_clean_failure(outcome, before, snapshot(tmp_path), code=2, names=[str(bad_file)])
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Outcome:
    """What a tool run left: its exit code and its stderr (stdout for reference)."""

    code: int
    err: str
    out: str = ""


def snapshot(*roots: Path, ignore: Iterable[Path] = ()) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``roots`` (not following symlinks): files by sha256 and mode,
    directories by mode, symlinks by target. ``ignore`` paths (and what is under them) are left out."""
    skipped = [Path(p) for p in ignore]
    entries: dict[str, tuple[Any, ...]] = {}
    for root in roots:
        root = Path(root)
        if not os.path.lexists(root):
            continue
        todo = [root]
        while todo:
            path = todo.pop()
            if any(path == s or s in path.parents for s in skipped):
                continue
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                entries[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[str(path)] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
                todo.extend(path / name for name in os.listdir(path))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                entries[str(path)] = ("file", digest, stat.S_IMODE(st.st_mode))
    return entries


def diff(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """What changed between two snapshots, one line an entry."""
    lines = [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    lines += [f"created {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"changed {p}: {before[p]} -> {after[p]}" for p in sorted(before.keys() & after.keys())
              if before[p] != after[p]]
    return lines


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str], capsys: Any) -> Outcome:
    """Call a tool's ``main(argv)`` in this process (argparse's SystemExit becomes the code)."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return Outcome(int(code or 0), captured.err, captured.out)


def run_module(module: str, argv: Sequence[str], env: dict[str, str] | None = None,
               timeout: float = 300) -> Outcome:
    """Run ``python -m module argv`` in a subprocess with this checkout first on the path."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                          env=environment, timeout=timeout)
    return Outcome(proc.returncode, proc.stderr, proc.stdout)


def error_lines(err: str) -> list[str]:
    """The lines of stderr that report the error (log lines of other levels left out)."""
    return [line for line in err.splitlines()
            if line.strip() and not line.startswith(("INFO ", "WARNING ", "DEBUG "))]


def assert_clean_failure(outcome: Outcome, before: dict[str, tuple], after: dict[str, tuple], *,
                         code: int = 2, names: Iterable[str] = ()) -> str:
    """Assert the exit code, a one-line error naming each of ``names``, no traceback, and no
    change between the snapshots. Returns the error line."""
    assert outcome.code == code, f"exit code {outcome.code}, expected {code}; stderr:\n{outcome.err}"
    assert "Traceback" not in outcome.err, outcome.err
    lines = [line for line in error_lines(outcome.err) if "error:" in line]  # argparse adds usage lines
    assert len(lines) == 1, f"expected one error line; stderr:\n{outcome.err}"
    message = lines[0]
    for name in names:
        assert name in message, f"{name!r} not in the error: {message}"
    changes = diff(before, after)
    assert not changes, "files changed:\n" + "\n".join(changes)
    return message
