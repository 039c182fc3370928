"""The errors a user can fix (a bad path, file, flag or value) and the exit codes of every command.

Every command's ``main`` ends through :class:`stage_dist.core.cli.Command`: a :class:`UserInputError`
(and the OS's verdict on a path the user gave, :data:`INPUT_ERRORS`) is printed as one line
naming the file and what is wrong, with exit code :data:`EXIT_BAD_INPUT`. Nothing else is caught
unless a command says so: a programming error (a bare ``ValueError``, ``KeyError``, ``TypeError``
...) keeps its traceback.
"""

from __future__ import annotations


class UserInputError(Exception):
    """Bad input a user can fix; the message names the file, key or flag and what is wrong."""


class CheckpointError(UserInputError):
    """A checkpoint that cannot be written, read or loaded into the model; the message names the
    file (and the key). The project's only checkpoint error (here, below both the checkpoint file
    code and the model's side of a checkpoint, :mod:`stage_dist.model.saved_model`, which raise it)."""


EXIT_OK = 0
EXIT_FAILED = 1  # convert: --verify found a mismatch; demo: a step was killed by a signal (it has no exit code)
EXIT_BAD_INPUT = 2  # a user mistake, reported as one line (evaluate --check: the results file has a problem)
EXIT_NON_FINITE = 3  # train/infer: a NaN/Inf loss, weight or score (the run stops; nothing non-finite is saved)
EXIT_PREEMPTED = 4  # train: stopped by a --preempt-signals signal after writing a checkpoint; rerun to resume
EXIT_SIGNAL_BASE = 128  # convert: stopped by signal N exits 128 + N (the shell's convention: 130 SIGINT, 143 SIGTERM)

# What the command-line tools report as one line with exit code 2: the project's own user errors,
# and the OS's verdict on a path the user gave (it names the path).
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    UserInputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
)
