"""What both forms of a split share to make DataLoaders: the training loader that moves the
split's position, the inference collate, and the worker settings.

:mod:`stage_dist.data.store_windows` (a zarr store, random access) and :mod:`stage_dist.data.tar_windows`
(tar shards, streaming) build their loaders from these, so both hand the trainer and inference
the same kinds of batches.
"""

from __future__ import annotations

import signal
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from stage_dist.data.batch import Batch, Padding, collate
from stage_dist.data.sampler import EpochPosition
from stage_dist.data.window_source import InferenceBatch, WindowKeyframes
from stage_dist.store.window import InferenceWindow, Window

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")  # what a training loader worker ignores


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A training DataLoader worker's ``worker_init_fn``: ignore the signals a scheduler sends to
    every process, so that the rank (which handles them: :mod:`stage_dist.engine.preemption`)
    finishes its step and checkpoints."""
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class TrainLoader(DataLoader):
    """A DataLoader of one epoch's training steps per iteration that moves its split's
    :class:`~stage_dist.data.sampler.EpochPosition`: each batch it hands out is one step taken, and
    when an iteration ends (exhausted, or closed, as a ``for`` loop left by ``break`` closes it)
    after the epoch's last step, the position moves to the next epoch.

    It gets its own generator so that creating an iterator (each epoch, or on a mid-epoch
    resume) never consumes the global torch RNG, which dropout uses: exact resume depends on it.
    """

    def __init__(self, position: EpochPosition, dataset: Dataset, **options: Any) -> None:
        super().__init__(dataset, generator=torch.Generator(), **options)
        self.position = position

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        try:
            for batch in super().__iter__():
                self.position.took_step()
                yield batch
        finally:
            self.position.ended_iteration()


def worker_options(num_workers: int, *, persistent: bool) -> dict:
    """DataLoader worker settings: workers ignore SIGTERM/SIGUSR1 (the rank handles them, see
    :mod:`stage_dist.engine.preemption`); persistent ones prefetch 4 batches each."""
    if num_workers == 0:
        return {"num_workers": 0}
    options: dict = {"num_workers": num_workers, "worker_init_fn": ignore_stop_signals}
    if persistent:
        options.update(persistent_workers=True, prefetch_factor=4)
    return options


def owned_actors(batch: Batch, plans: Sequence[InferenceWindow]) -> torch.Tensor:
    """Which actors of ``batch`` lie in the keyframes their window predicts."""
    keep_start = torch.tensor([plan.keep_start for plan in plans], dtype=torch.int64)
    keep_stop = torch.tensor([plan.keep_stop for plan in plans], dtype=torch.int64)
    frame, window_id = batch.actor_frame, batch.actor_window
    return (frame >= keep_start[window_id]) & (frame < keep_stop[window_id])


class InferenceCollate:
    """Collate inference windows with the inference's :class:`~stage_dist.data.batch.Padding` into an
    :class:`~stage_dist.data.window_source.InferenceBatch`: which actors each window owns (predicts),
    and the keyframes each read."""

    def __init__(self, padding: Padding) -> None:
        self.padding = padding

    def __call__(self, items: Sequence[tuple[Window, InferenceWindow]]) -> InferenceBatch:
        batch = collate([window for window, _ in items], self.padding)
        return InferenceBatch(batch, owned_actors(batch, [plan for _, plan in items]),
                              [WindowKeyframes(w.keyframe_start, w.video_id, w.timestamps) for w, _ in items])
