"""How every command's ``main`` ends: its exit code, and what stopped it as one line on stderr.

Each command (train, infer, convert, shards, evaluate, synth, demo, curves) declares a
:class:`Command` and runs its body through :meth:`Command.run`:

- bad input a user can fix is one line, the command's prefix and the message, and exit code
  :data:`~stage_dist.core.errors.EXIT_BAD_INPUT`: a :class:`~stage_dist.core.errors.UserInputError`, an
  OSError about one of the user paths the command names (its flag, :mod:`stage_dist.core.paths`), the
  OS's verdict on a path the user gave (:data:`~stage_dist.core.errors.INPUT_ERRORS`) and, for a
  command whose writes all lie inside its output, any other OSError (naming its file);
- each exception class a command registers as a :class:`Stop` (a non-finite loss, a preemption,
  a signal, a failed step) is one line with its own prefix and exit code;
- anything else is a programming error and passes with its traceback (under torchrun the entry
  point's ``@record`` puts it into the failure summary).

Under torchrun a command that asks for it also writes its line as the worker's error file
(:func:`report_to_launcher`), so torchrun's failure summary names it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, NoReturn, TypeVar

from stage_dist.core.errors import EXIT_BAD_INPUT, INPUT_ERRORS, UserInputError
from stage_dist.core.outputs import is_launch_rank_zero
from stage_dist.core.paths import UserPaths, user_path_message

log = logging.getLogger(__name__)

E = TypeVar("E", bound=BaseException)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class Stop(Generic[E]):
    """An exception class a command reports as ``prefix + message(error)`` with its own exit code."""

    error: type[E]
    code: int | Callable[[E], int]
    prefix: str = "error: "
    message: Callable[[E], str] = str
    main_rank_only: bool = False  # raised on every rank of a launch: only rank 0 prints it (all tell torchrun)

    def exit_code(self, error: E) -> int:
        return self.code(error) if callable(self.code) else self.code


@dataclass(frozen=True)
class Command:
    """How one command reports what stops it."""

    prefix: str = "error: "  # before every bad-input line
    stops: tuple[Stop[Any], ...] = ()
    every_os_error: bool = False  # an OSError about no user path is one line too, not a traceback
    disk_full_hint: str = ""  # appended to the line of an OSError of a full disk (ENOSPC, EDQUOT)
    to_launcher: bool = False  # torchrun entry points: write the line for its failure summary too

    def run(self, body: Callable[[], int], paths: UserPaths | None = None, writing: str | None = None) -> int:
        """``body()``'s exit code, or the exit code of what stopped it, after printing its line.
        ``paths`` ({flag: path}) are the user paths whose OSErrors name their flag; ``writing`` is
        the flag of the one output an OSError naming no file is about (as in
        :func:`~stage_dist.core.paths.user_path_errors`)."""
        paths = paths or {}
        try:
            try:
                return body()
            except (OSError, UserInputError) as error:
                line = self._bad_input_line(error, paths, writing)
                if line is None:
                    raise  # an OSError about no path the user gave: a traceback
                self._report(line, print_here=True)
                return EXIT_BAD_INPUT
        except tuple(stop.error for stop in self.stops) as error:  # outside: also one raised while reporting
            stop = next(stop for stop in self.stops if isinstance(error, stop.error))
            print_here = not stop.main_rank_only or is_launch_rank_zero()
            self._report(stop.prefix + stop.message(error), print_here=print_here)
            return stop.exit_code(error)

    def _bad_input_line(self, error: BaseException, paths: UserPaths, writing: str | None) -> str | None:
        line = user_path_message(error, paths, writing=writing)
        if line is None and isinstance(error, OSError) and self.every_os_error:
            line = f"{error.filename or (paths.get(writing) if writing else None)}: {error.strerror or error}"
        if line is None and isinstance(error, INPUT_ERRORS):
            line = str(error)
        if line is None:
            return None
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            line += self.disk_full_hint
        return self.prefix + line

    def _report(self, line: str, *, print_here: bool) -> None:
        if print_here:
            print(line, file=sys.stderr)
        if self.to_launcher:
            report_to_launcher(line)


def report_to_launcher(message: str) -> None:
    """Write ``message`` as this worker's error for torchrun's failure summary (the file named by
    ``TORCHELASTIC_ERROR_FILE``, in the format of torch.distributed.elastic's error handler), so
    that a rank that stops with a one-line error (bad input, non-finite numbers, preemption) is
    named with that line instead of ``error_file: <N/A>``. An uncaught exception is written by
    the entry points' ``@record`` instead, with its traceback. Outside torchrun: nothing."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as handle:
            json.dump(data, handle)
    except OSError as err:  # the summary is a convenience: never fail the exit over it
        log.debug("could not write torchrun's error file %s: %s", path, err)


def exit_process(code: int | None) -> NoReturn:
    """End a command's process with ``code`` (its ``__main__``; None is 0, as for ``sys.exit``):
    ``sys.exit`` for a plain run; under torchrun (``WORLD_SIZE`` > 1), after flushing the logs and
    streams, ``os._exit``, skipping the interpreter's finalization. A rank's interpreter teardown
    after ``destroy_process_group`` (Gloo's C++ threads and what they still hold) aborted it
    (SIGABRT/SIGSEGV, "terminate called without an active exception") after a successful run in
    about 1 of 40 two-rank runs on the development machine, and torchrun then reports the whole
    job as failed. Every output is closed (and fsynced) before ``main`` returns."""
    try:
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        distributed = False
    if not distributed:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can be said on it
            pass
    os._exit(code or 0)
