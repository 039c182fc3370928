"""The window-source contract: what training and inference need from a split, whatever its form.

A split is read either from a zarr feature store (random access:
:class:`~stage_dist.data.store_windows.StoreWindowSource`, a :class:`~stage_dist.data.sampler.ClipWindowSampler`
over a :class:`~stage_dist.store.feature_store.FeatureStore`) or from WebDataset tar shards (streaming:
:class:`~stage_dist.data.tar_windows.TarWindowStream`). Both implement :class:`WindowSource`, so
the trainer, validation and ``stage_dist.infer`` never ask which one they have. The window
itself and the rule that cuts it are :mod:`stage_dist.store.window`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader

from stage_dist.data.batch import Batch, Padding

#: Windows held for shuffling when streaming from shards (the default of every entry point).
SHUFFLE_BUFFER = 1000


class WindowKeyframes(NamedTuple):
    """The keyframes one inference window read: global row of the first, video id, timestamps."""

    start: int
    video_id: str
    timestamps: np.ndarray


class InferenceBatch(NamedTuple):
    """One inference batch: the collated windows, which of its actors the batch predicts (those in
    its windows' owned keyframes), and the keyframes each window read."""

    batch: Batch
    owned: torch.Tensor  # (A,) bool
    keyframes: list[WindowKeyframes]


@dataclass(frozen=True)
class KeyframeNamer:
    """Names global keyframe rows for messages: the clip (and, from a store, its video id and
    timestamps) they belong to."""

    clip_ptr: np.ndarray  # (clips + 1,) first keyframe row of every clip
    video_ids: list[str] | None = None
    timestamps: np.ndarray | None = None

    @classmethod
    def from_clip_lengths(cls, lengths: Iterable[int]) -> "KeyframeNamer":
        """Clips known by their lengths only (shards: no video ids in the manifest)."""
        return cls(np.concatenate([[0], np.cumsum(list(lengths), dtype=np.int64)]))

    def describe(self, first: int, last: int) -> str:
        if first < 0:
            return "a window without actors"
        clip = int(np.searchsorted(self.clip_ptr, first, side="right")) - 1
        rows = f"keyframe rows {first}-{last}"
        if self.video_ids is None or not 0 <= clip < len(self.video_ids):
            return f"clip {clip}, {rows}" if clip >= 0 else rows
        stamps = self.timestamps
        assert stamps is not None
        return (f"clip {clip} (video {self.video_ids[clip]}, timestamps {int(stamps[first]):04d}-"
                f"{int(stamps[last]):04d}), {rows}")


@runtime_checkable
class WindowSource(Protocol):
    """One split as training steps and as inference windows.

    Training: :meth:`train_loader` yields this rank's collated steps of the current epoch, as
    many as :meth:`steps_for_epoch` (``len``), the same on every rank. The source owns its
    position (``epoch``, ``step``): the loader counts each step it hands out, and once the
    epoch's last step has been handed out and the iteration ends, the source moves to the next
    epoch by itself. :meth:`state_dict` saves the position, :meth:`load_state_dict` restores it
    (the next iteration then starts at the saved step). Every keyframe of the split is in exactly
    one window per epoch; :meth:`padded_windows` more windows (repeats) make the steps equal
    across ranks. Inference: :meth:`inference_batches` gives rank ``rank`` its share of windows
    of ``window`` owned keyframes with ``context`` keyframes on each side; over all ranks every
    keyframe is owned exactly once.
    """

    actor_dim: int
    object_dim: int
    class_ids: tuple[int, ...]  # the class id of each label column (the store's class set)
    num_clips: int
    num_keyframes: int
    num_actors: int
    max_nodes_per_keyframe: int
    location: str  # the path or URL pattern, for messages

    @property
    def epoch(self) -> int:
        """The epoch being trained."""

    @property
    def step(self) -> int:
        """Steps of it the train loader handed out (trained, not prefetched)."""

    def steps_for_epoch(self, epoch: int) -> int:
        """Steps every rank yields in ``epoch``."""

    def padded_windows(self, epoch: int) -> int:
        """Windows of ``epoch`` repeated (all ranks together) to make the ranks' steps equal."""

    def __len__(self) -> int:
        """Steps of the current epoch."""

    def state_dict(self, step: int | None = None) -> dict:
        """The position ``{"epoch", "step"}``; ``step``: steps of the epoch trained (default: the
        steps the train loader handed out)."""

    def load_state_dict(self, state: dict) -> None:
        """Resume: select ``state["epoch"]``; its next iteration starts at ``state["step"]``."""

    def keyframe_namer(self) -> KeyframeNamer:
        """Names of the split's global keyframe rows, for messages."""

    def train_loader(self, *, num_workers: int, pin_memory: bool, padding: Padding) -> DataLoader:
        """A DataLoader of this rank's steps of the current epoch, one Batch (graph included,
        shaped by ``padding``) per step, that moves the source's position as it hands them out."""

    def inference_batches(
        self, rank: int, world_size: int, *, window: int, context: int, windows_per_batch: int,
        padding: Padding, num_workers: int, pin_memory: bool,
    ) -> Iterable[InferenceBatch]:
        """Rank ``rank``'s inference batches (see :class:`InferenceBatch`), collated with the
        inference's ``padding`` (its batch-invariant mode)."""


def batches_of(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    pending: list = []
    for item in items:
        pending.append(item)
        if len(pending) == size:
            yield pending
            pending = []
    if pending:
        yield pending
