"""Which keyframe windows each rank reads: the training batch sampler and the inference planner.

Training (:class:`ClipWindowSampler`): every epoch, each clip is cut into windows of ``W``
consecutive keyframes starting from a random offset, so window boundaries move between epochs;
the keyframes before the offset and the remainder at the end of the clip become shorter windows,
and a clip shorter than ``W`` is one window. Every keyframe is thus in exactly one window per
epoch. The windows of all clips are shuffled with a generator seeded ``seed + epoch`` (the same
on every rank) and dealt out step by step: global step ``s`` takes the next
``world_size * windows_per_step`` windows of the shuffled list and rank ``r`` gets the ``r``-th
group of ``windows_per_step``. Every rank runs the same number of steps (DDP hangs otherwise):
the list is padded by repeating windows from its start (:meth:`ClipWindowSampler.padded_windows`).

Inference (:func:`plan_inference_windows`, :func:`rank_slice`): windows of ``W`` *owned*
keyframes, each read with up to ``context`` extra keyframes on either side. STAGE has two
one-hop graph layers, so a keyframe's output depends on keyframes within +/-2 of it; with
``context >= 2`` the owned predictions do not depend on the window size or on the number of
ranks. Windows are split into contiguous, unpadded shards, so every keyframe is predicted once
and the gathered shards, concatenated in rank order, are in store order.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence, TypeVar

import numpy as np

from stage_dist.store.window import InferenceWindow, WindowSpec

T = TypeVar("T")

log = logging.getLogger(__name__)


def _check_clip_lengths(clip_lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    lengths = np.asarray(clip_lengths, dtype=np.int64).reshape(-1)
    if len(lengths) and lengths.min() < 0:
        bad = int(np.argmin(lengths))
        raise ValueError(f"clip {bad} has a negative length ({int(lengths[bad])})")
    return lengths


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def clip_windows(clip_lengths: Sequence[int] | np.ndarray, window: int, offsets: np.ndarray) -> np.ndarray:
    """Cut every clip into windows; returns an ``(N, 3)`` int64 array of (clip, start, length).

    Clip ``c`` (length ``L``) with offset ``o``: if ``L <= window`` it is a single window;
    otherwise windows start at ``0`` (when ``o > 0``) and at ``o, o + W, o + 2W, ...``, each
    running to the next start or to the clip's end. Windows are in clip order.
    """
    lengths = _check_clip_lengths(clip_lengths)
    offsets = np.where(lengths > window, np.asarray(offsets, dtype=np.int64), 0)
    rows = []
    for clip in np.flatnonzero(lengths):
        length, offset = int(lengths[clip]), int(offsets[clip])
        starts = np.arange(offset, length, window, dtype=np.int64)
        if offset > 0:
            starts = np.concatenate(([0], starts))
        stops = np.append(starts[1:], length)
        rows.append(np.stack([np.full_like(starts, clip), starts, stops - starts], axis=1))
    if not rows:
        return np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(rows)


def epoch_generator(seed: int, epoch: int) -> np.random.Generator:
    """The generator of an epoch's window offsets and shuffle, identical on every rank."""
    return np.random.default_rng(seed + epoch)


def window_offsets(rng: np.random.Generator, num_clips: int, window: int) -> np.ndarray:
    """Each clip's first window boundary for the epoch (the generator's first draw)."""
    return rng.integers(0, window, size=num_clips)


def parse_position(state: dict, what: str) -> tuple[int, int]:
    """``(epoch, step)`` of a saved ``{"epoch", "step"}`` position, checked."""
    try:
        epoch, step = int(state["epoch"]), int(state["step"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{what} state needs integer 'epoch' and 'step', got {state!r}") from err
    if step < 0:
        raise ValueError(f"{what} state has a negative step ({step})")
    return epoch, step


class EpochPosition:
    """Where training is in its schedule, one contract for both training schedules
    (:class:`ClipWindowSampler`, :class:`~stage_dist.data.tar_windows.TarWindowStream`): the epoch
    being trained, the steps of it trained, and the step the next iteration starts at.

    ``step`` counts the steps handed to training, not the ones drawn: a DataLoader draws batches
    ahead. :class:`~stage_dist.data.loaders.TrainLoader` counts them (:meth:`took_step`) and ends the
    epoch (:meth:`ended_iteration`); :meth:`state_dict` and :meth:`load_state_dict` save and
    restore the position. Subclasses set ``rank``, ``world_size`` and ``windows_per_step`` and
    define ``steps_for_epoch(epoch)`` and ``padded_windows(epoch)``; rank 0 logs each epoch's
    padding.
    """

    epoch: int = 0
    step: int = 0
    _resume_step: int = 0
    _announced: int | None = None
    rank: int
    world_size: int
    windows_per_step: int

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate. A pending resume step is kept only for its own epoch."""
        if epoch != self.epoch:
            self._resume_step = self.step = 0
        self.epoch = epoch
        self._announce()

    def state_dict(self, step: int | None = None) -> dict:
        """``{"epoch", "step"}``: ``step`` is the number of steps of the epoch already trained
        (default: the steps handed to training, see :meth:`took_step`)."""
        return {"epoch": int(self.epoch), "step": int(self.step if step is None else step)}

    def load_state_dict(self, state: dict) -> None:
        """Resume: select ``state["epoch"]``; its next iteration starts at ``state["step"]``."""
        self.epoch, self._resume_step = parse_position(state, type(self).__name__)
        self.step = self._resume_step
        self._announce()

    def took_step(self) -> None:
        """Training took one more step of the epoch."""
        self.step += 1

    def ended_iteration(self) -> None:
        """An iteration over the epoch's steps ended: once every step was taken, the next epoch."""
        if self.step >= self.steps_for_epoch(self.epoch):
            self.set_epoch(self.epoch + 1)

    def _take_resume_step(self) -> int:
        """The step the next iteration starts at (only the first iteration after a resume)."""
        step, self._resume_step = self._resume_step, 0
        return step

    def _announce(self) -> None:
        if self.rank == 0 and self._announced != self.epoch:
            self._announced = self.epoch
            log.info("epoch %d: %d steps x %d rank(s) x %d window(s); %d windows repeated so that ranks run "
                     "equal steps", self.epoch, self.steps_for_epoch(self.epoch), self.world_size,
                     self.windows_per_step, self.padded_windows(self.epoch))

    def steps_for_epoch(self, epoch: int) -> int:
        raise NotImplementedError

    def padded_windows(self, epoch: int) -> int:
        raise NotImplementedError


class ClipWindowSampler(EpochPosition):
    """Batch sampler over clip windows: each item is one training step's windows for this rank.

    Use as ``DataLoader(dataset, batch_sampler=sampler, ...)`` with a dataset indexed by
    :class:`~stage_dist.store.window.WindowSpec`; a :class:`~stage_dist.data.loaders.TrainLoader` moves
    it from epoch to epoch, a plain DataLoader needs :meth:`set_epoch` before each epoch.
    ``len(sampler)`` is the number of steps of the current epoch (the same on every rank;
    it can differ by a little between epochs because window boundaries move: use
    :meth:`steps_for_epoch` to plan a schedule). After :meth:`load_state_dict`, the next
    iteration of that epoch starts at the saved step and yields only the remaining steps.
    """

    def __init__(
        self,
        clip_lengths: Sequence[int] | np.ndarray,
        window: int = 6,
        windows_per_step: int = 1,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if windows_per_step < 1:
            raise ValueError(f"windows_per_step must be >= 1, got {windows_per_step}")
        _check_rank(rank, world_size)
        self.clip_lengths = _check_clip_lengths(clip_lengths)
        self.window = window
        self.windows_per_step = windows_per_step
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self._cache: tuple[int, np.ndarray] | None = None  # (epoch, shuffled windows)

    @property
    def windows_per_global_step(self) -> int:
        """Windows consumed per step by all ranks together."""
        return self.world_size * self.windows_per_step

    def _windows(self, epoch: int) -> np.ndarray:
        """The epoch's shuffled windows as an ``(N, 3)`` array (offsets drawn first, then the shuffle)."""
        if self._cache is None or self._cache[0] != epoch:
            rng = epoch_generator(self.seed, epoch)
            offsets = window_offsets(rng, len(self.clip_lengths), self.window)
            windows = clip_windows(self.clip_lengths, self.window, offsets)
            self._cache = (epoch, windows[rng.permutation(len(windows))])
        return self._cache[1]

    def _steps(self, num_windows: int) -> int:
        return -(-num_windows // self.windows_per_global_step)

    def steps_for_epoch(self, epoch: int) -> int:
        """Steps of ``epoch`` (the same on every rank), without changing the sampler's state."""
        return self._steps(len(self._windows(epoch)))

    def padded_windows(self, epoch: int) -> int:
        """Windows of ``epoch`` repeated (all ranks together) to make the ranks' steps equal."""
        return self.steps_for_epoch(epoch) * self.windows_per_global_step - len(self._windows(epoch))

    def __len__(self) -> int:
        return self.steps_for_epoch(self.epoch)

    def epoch_windows(self, epoch: int | None = None) -> list[WindowSpec]:
        """All windows of an epoch (default: the current one) in shuffled order, before padding."""
        windows = self._windows(self.epoch if epoch is None else epoch)
        return [WindowSpec(int(c), int(s), int(n)) for c, s, n in windows]

    def _rank_steps(self) -> np.ndarray:
        """This rank's windows of the current epoch as a ``(steps, windows_per_step, 3)`` array."""
        windows = self._windows(self.epoch)
        steps = self._steps(len(windows))
        total = steps * self.windows_per_global_step
        if total > len(windows):  # pad by cycling from the start of the shuffled list
            windows = windows[np.arange(total) % len(windows)]
        grid = windows[:total].reshape(steps, self.world_size, self.windows_per_step, 3)
        return grid[:, self.rank]

    def __iter__(self) -> Iterator[list[WindowSpec]]:
        # A generator: the resume step is taken at the first ``next``, not by ``iter`` alone. A
        # DataLoader with workers calls ``iter`` twice on its first epoch and draws from the second.
        steps = self._rank_steps()
        for step in range(self._take_resume_step(), len(steps)):
            yield [WindowSpec(int(c), int(s), int(n)) for c, s, n in steps[step]]


def plan_inference_windows(
    clip_lengths: Sequence[int] | np.ndarray, window: int, context: int = 2
) -> list[InferenceWindow]:
    """Windows of ``window`` owned keyframes (the last of a clip may be shorter), in store order.

    Each is read with up to ``context`` extra keyframes on each side, clipped at the clip's
    ends; every keyframe of every clip is owned by exactly one window.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    plan = []
    for clip, length in enumerate(_check_clip_lengths(clip_lengths).tolist()):
        for own_start in range(0, length, window):
            own_stop = min(own_start + window, length)
            read_start = max(own_start - context, 0)
            read_stop = min(own_stop + context, length)
            plan.append(
                InferenceWindow(
                    spec=WindowSpec(clip, read_start, read_stop - read_start),
                    keep_start=own_start - read_start,
                    keep_stop=own_stop - read_start,
                )
            )
    return plan


def rank_slice(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s contiguous share of ``items``: sizes differ by at most one, the first
    ``len(items) % world_size`` ranks taking one more; no padding, no duplicates."""
    _check_rank(rank, world_size)
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return list(items[start:stop])
