"""Preemption and time-based checkpoints: when every rank agrees to stop or to save.

A SLURM job that reaches its time limit or is preempted gets a signal (``SIGTERM``, or the one
``sbatch --signal`` asks for; ``launch/slurm.sbatch`` asks for ``SIGUSR1`` 120 s before the
limit), and ``torchrun`` forwards ``SIGTERM`` (and, with ``--signals-to-handle`` /
``PET_SIGNALS_TO_HANDLE``, ``SIGUSR1``) to its workers. :class:`RunControl` turns such a signal
into a checkpoint at one step that every rank agrees on, then a clean exit with
:data:`~stage_dist.core.errors.EXIT_PREEMPTED`; rerunning the same command resumes bit for bit.

How the ranks agree without a new host sync: a signal handler only sets a Python flag (the
signal may reach the ranks at different steps, or only some of them). The flags travel in the
one collective the trainer already makes at log steps (``--log-every``) and before every
checkpoint and validation: the all-reduce (MIN) of the non-finite flags
(:meth:`~stage_dist.engine.nonfinite.NonFiniteGuard.check`), which :meth:`RunControl.flags` extends by two
int64 elements. Every rank takes part in that reduction at the same steps, so every rank reads
the same reduced flags and stops (or saves) after the same step: a preemption costs at most
``--log-every`` - 1 further steps (10 by default; well inside the 120 s the script asks for) and
nothing per step. ``--checkpoint-every-minutes`` is agreed the same way: each rank's flag says
that its own monotonic clock has passed the interval since the last checkpoint, and the reduced
flag (any rank) triggers one collective checkpoint on all ranks, so ranks with different clocks
never disagree.

The handlers are installed for :meth:`RunControl.handling_signals` only (the training loop) and
the previous ones restored after; a process forked inside it inherits the handler, which does
nothing there (it checks the pid). Training DataLoader workers ignore the stop signals
(:func:`stage_dist.data.loaders.ignore_stop_signals`, their ``worker_init_fn``): SLURM signals every process of a job
step, and a worker that died of it (torch's workers exit on SIGTERM) would fail the step the
ranks must finish; a worker still exits when its rank does (torch's parent watchdog).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)

DEFAULT_PREEMPT_SIGNALS = "TERM,USR1"
_NEVER_HANDLED = {"KILL", "STOP"}


class PreemptedError(Exception):
    """Training stopped on a preemption signal after writing a checkpoint at ``global_step``: the
    entry point exits with :data:`~stage_dist.core.errors.EXIT_PREEMPTED`."""

    def __init__(self, signal_name: str, global_step: int, checkpoint: object) -> None:
        super().__init__(f"preempted by SIG{signal_name}: checkpoint {checkpoint} at step {global_step}; rerun the "
                         "same command to resume")
        self.signal_name, self.global_step, self.checkpoint = signal_name, global_step, checkpoint


def parse_signals(spec: str) -> tuple[signal.Signals, ...]:
    """``"TERM,USR1"`` (names with or without ``SIG``, case-insensitive; ``""`` or ``none``: no
    signal) as signals; ValueError naming a name that is not a catchable signal."""
    if spec.strip().lower() in ("", "none"):
        return ()
    found: list[signal.Signals] = []
    for raw in spec.split(","):
        name = raw.strip().upper().removeprefix("SIG")
        if name in _NEVER_HANDLED or not hasattr(signal, f"SIG{name}") or name.startswith("_"):
            raise ValueError(f"{raw.strip()!r} is not a signal that can be caught (e.g. TERM, USR1, USR2, INT, HUP)")
        sig = signal.Signals(getattr(signal, f"SIG{name}"))
        if sig not in found:
            found.append(sig)
    return tuple(found)


class RunControl:
    """This rank's stop and save requests (a signal, a timer) and the verdict all ranks agreed on.

    Call :meth:`flags` to get the two int64 elements to fold into an all-reduce(MIN) that every
    rank makes at the same steps, and :meth:`agree` with the reduced pair; :attr:`stop` and
    :attr:`save` then hold the same values on every rank.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (), checkpoint_every_minutes: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.signals = signals
        self.interval = checkpoint_every_minutes * 60.0
        self._clock = clock
        self._last_save = clock()
        self._pid = os.getpid()
        self.received: signal.Signals | None = None  # the first signal this rank received
        self.stop = False  # agreed: every rank stops after the current step
        self.save = False  # agreed: every rank checkpoints after the current step
        self.stop_signal = "?"  # the signal named in the message (this rank's, or another rank's)

    # -- the signal handler --------------------------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the rank's main process handles it
            return
        if self.received is None:
            self.received = signal.Signals(signum)
            log.warning("received %s: finishing the current step, then every rank checkpoints and stops",
                        self.received.name)

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator["RunControl"]:
        """Install the handlers (main thread only; elsewhere they stay as they are) and restore the
        previous ones on exit."""
        previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- the agreement -------------------------------------------------------------------------

    def flags(self, device: torch.device) -> torch.Tensor:
        """This rank's requests as ``[-stop, -save]`` (int64, for an all-reduce MIN: any rank's -1 wins)."""
        due = bool(self.interval) and self._clock() - self._last_save >= self.interval
        return torch.tensor([-int(self.received is not None), -int(due)], dtype=torch.int64, device=device)

    def agree(self, reduced: list[int]) -> None:
        """Take the reduced ``[-stop, -save]`` pair (the same on every rank)."""
        if reduced[0] < 0 and not self.stop:
            self.stop = True
            self.stop_signal = self.received.name.removeprefix("SIG") if self.received is not None else "(another rank)"
        self.save = self.save or reduced[1] < 0

    def saved(self) -> None:
        """A checkpoint was written (by any trigger): the timer starts again."""
        self._last_save = self._clock()
        self.save = False
