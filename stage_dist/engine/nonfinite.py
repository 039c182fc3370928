"""The trainer's non-finite guard: a NaN/Inf loss, gradient norm or weight stops the run, named.

Without a per-step host sync: each step ORs its ``~isfinite(loss)`` (and of the clipped gradient
norm) into a device flag that keeps the first bad step (:meth:`NonFiniteGuard.record`), and the
host notes the step's window (:meth:`NonFiniteGuard.stepped`). :meth:`NonFiniteGuard.check` -- at
log steps and before every checkpoint and validation, on every rank at the same steps -- reads
that flag and the finiteness of the weights back in one all-reduce (MIN), on which the preemption
and timer flags of :class:`~stage_dist.engine.preemption.RunControl` ride (no collective of their own),
and raises :class:`NonFiniteError` naming the first bad step, its window and the rank, or the
step range in which the weights went bad with a finite loss. The caller checks before it writes
a checkpoint, so no checkpoint ever holds non-finite weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stage_dist.engine.distributed import DistEnv, all_reduce_min, gather_to_main
from stage_dist.engine.preemption import RunControl


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or non-finite weights: the run stops (exit code 3) without
    writing them to a checkpoint; the message names the step and its window."""


class NonFiniteGuard:
    """One rank's record of the steps since the last check, and the check.

    ``describe_window(first, last)`` names a window by its first and last global keyframe rows
    (``(-1, -1)``: a window without actors); ``last_good()`` is the newest checkpoint, named in
    the error as the one kept."""

    def __init__(self, model: nn.Module, env: DistEnv, control: RunControl,
                 describe_window: Callable[[int, int], str], last_good: Callable[[], Path | None]) -> None:
        self.model, self.env, self.control = model, env, control
        self.describe_window, self.last_good = describe_window, last_good
        # The first bad step since the last check (-1: none), accumulated on the device.
        self._first_bad_step = torch.tensor(-1, dtype=torch.int64, device=env.device)
        self._unchecked: dict[int, tuple[int, int]] = {}  # step -> its window's first/last keyframe row

    def record(self, step: int, bad: torch.Tensor) -> None:
        """Step ``step``'s device flag (a bool tensor: its loss or gradient norm was not finite)."""
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), step, self._first_bad_step)

    def stepped(self, step: int, window: tuple[int, int]) -> None:
        """Step ``step`` was taken on the window of keyframe rows ``window`` (host bookkeeping)."""
        self._unchecked[step] = window

    def check(self) -> None:
        """Raise :class:`NonFiniteError` if a step since the last check had a non-finite loss (or
        clipped gradient norm), or the weights are no longer finite. One host read of the flags
        (a collective under DDP: every rank calls it at the same steps); the run control takes
        the ranks' agreed stop/save requests from the same reduction."""
        if not self._unchecked:
            return
        weights_bad = ~torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        never = torch.iinfo(torch.int64).max
        local_first = torch.where(self._first_bad_step < 0, never, self._first_bad_step)
        flags = all_reduce_min(torch.cat([torch.stack([local_first, -weights_bad.to(torch.int64)]),
                                          self.control.flags(local_first.device)]), self.env).tolist()
        first_bad, any_weights_bad = int(flags[0]), flags[1] < 0
        self.control.agree(flags[2:])
        checked = sorted(self._unchecked)
        windows, self._unchecked = self._unchecked, {}
        if first_bad == never and not any_weights_bad:
            return
        # Which rank's window went bad first (gathered only now, on failure).
        mine = None if int(local_first) != first_bad else windows.get(first_bad)
        reports = gather_to_main((self.env.rank, mine), self.env)
        last_good = self.last_good()
        kept = f"; the last good checkpoint is kept: {last_good}" if last_good else "; no checkpoint was written"
        if first_bad == never:
            message = (f"the weights became non-finite between steps {checked[0]} and {checked[-1]} with a finite "
                       f"loss (non-finite gradients?){kept}; lower --lr or set --grad-clip")
        else:
            where = ""
            for rank, window in reports or []:
                if window is not None:
                    where = f" in the window of {self.describe_window(*window)}"
                    where += f" (rank {rank})" if self.env.world_size > 1 else ""
                    break
            message = (f"non-finite loss or gradient at step {first_bad}{where}{kept}; check that window's "
                       "features for NaN/Inf, or lower --lr")
        raise NonFiniteError(message)
