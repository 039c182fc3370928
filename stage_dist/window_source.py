"""The window-source contract: what training and inference need from a split, whatever its form.

A split is read either from a zarr feature store (random access:
:class:`~stage_dist.data.StoreWindowSource`, a :class:`~stage_dist.sampler.ClipWindowSampler`
over a :class:`~stage_dist.store.FeatureStore`) or from WebDataset tar shards (streaming:
:class:`~stage_dist.shard_stream.ShardWindowStream`). Both implement :class:`WindowSource`, so
the trainer, validation and ``stage_dist.infer`` never ask which one they have.

This module also holds the two rules both forms share: how a window is cut out of rows
(:func:`cut_window`) and the most graph nodes in one keyframe (:func:`max_nodes_per_keyframe`,
the slot count that makes inference scores independent of batch-mates).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np

from stage_dist.schema import ACTOR_BOXES, ACTOR_FEATURES, ACTOR_LABELS, OBJECT_BOXES, OBJECT_FEATURES

if TYPE_CHECKING:  # batch imports torch; the shard writer and converter only need the cut
    import torch
    from torch.utils.data import DataLoader

    from stage_dist.batch import Batch, Padding, Window

# Store row arrays that make a Window, by Window field.
WINDOW_ROW_ARRAYS = {
    "actor_features": ACTOR_FEATURES,
    "actor_boxes": ACTOR_BOXES,
    "actor_labels": ACTOR_LABELS,
    "object_features": OBJECT_FEATURES,
    "object_boxes": OBJECT_BOXES,
}

#: Windows held for shuffling when streaming from shards (the default of every entry point).
SHUFFLE_BUFFER = 1000

#: One inference batch: the batch, which of its actors the batch predicts (its windows' owned
#: keyframes), and ``(first keyframe row, video id, timestamps)`` of each window read.
InferenceBatch = tuple["Batch", "torch.Tensor", list[tuple[int, str, np.ndarray]]]


@runtime_checkable
class WindowSource(Protocol):
    """One split as training steps and as inference windows.

    Training: call :meth:`set_epoch` before each epoch (or :meth:`load_state_dict` to resume
    mid-epoch); :meth:`train_loader` then yields this rank's collated steps of that epoch, as
    many as :meth:`steps_for_epoch` (``len``), the same on every rank. Every keyframe of the
    split is in exactly one window per epoch; :meth:`padded_windows` more windows (repeats)
    make the steps equal across ranks. Inference: :meth:`inference_batches` gives rank ``rank``
    its share of windows of ``window`` owned keyframes with ``context`` keyframes on each side;
    over all ranks every keyframe is owned exactly once.
    """

    actor_dim: int
    object_dim: int
    class_ids: tuple[int, ...]  # the class id of each label column (the store's class set)
    num_clips: int
    num_keyframes: int
    num_actors: int
    max_nodes_per_keyframe: int
    location: str  # the path or URL pattern, for messages

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a pending resume step is kept only for its own epoch."""

    def steps_for_epoch(self, epoch: int) -> int:
        """Steps every rank yields in ``epoch``."""

    def padded_windows(self, epoch: int) -> int:
        """Windows of ``epoch`` repeated (all ranks together) to make the ranks' steps equal."""

    def __len__(self) -> int:
        """Steps of the current epoch."""

    def state_dict(self, step: int) -> dict:
        """The resume position ``{"epoch", "step"}``; ``step`` = steps of the epoch trained."""

    def load_state_dict(self, state: dict) -> None:
        """Resume: select ``state["epoch"]``; its next iteration starts at ``state["step"]``."""

    def train_loader(self, *, num_workers: int, pin_memory: bool, padding: "Padding") -> "DataLoader":
        """A DataLoader of this rank's steps of the current epoch, one Batch (graph included,
        shaped by ``padding``) per step."""

    def inference_batches(
        self, rank: int, world_size: int, *, window: int, context: int, windows_per_batch: int,
        padding: "Padding", num_workers: int, pin_memory: bool,
    ) -> Iterable[InferenceBatch]:
        """Rank ``rank``'s inference batches (see :data:`InferenceBatch`), collated with the
        inference's ``padding`` (its batch-invariant mode)."""


def cut_window(
    clip: int,
    video_id: str,
    first: int,
    stop: int,
    *,
    timestamps: np.ndarray,
    actor_ptr: np.ndarray,
    object_ptr: np.ndarray,
    read_rows: Callable[[str, int, int], np.ndarray],
    keyframe_base: int = 0,
    actor_base: int = 0,
) -> "Window":
    """Keyframe rows ``first:stop`` of one clip as a :class:`~stage_dist.batch.Window`.

    ``timestamps`` and the CSR pointers ``actor_ptr``/``object_ptr`` index the same keyframe
    rows as ``first``/``stop``; ``read_rows(store_array_name, start, stop)`` returns rows of a
    store row array (``actors/features`` ...) in the pointers' row numbering. ``keyframe_base``
    and ``actor_base`` turn those numberings into global store rows (0 for a whole store; a
    clip's first keyframe and actor rows for a clip read from shards).
    """
    from stage_dist.batch import Window  # deferred: torch is imported by readers, not the writer

    a0, a1 = int(actor_ptr[first]), int(actor_ptr[stop])
    o0, o1 = int(object_ptr[first]), int(object_ptr[stop])
    rows = {
        field: read_rows(name, a0, a1) if name.startswith("actors/") else read_rows(name, o0, o1)
        for field, name in WINDOW_ROW_ARRAYS.items()
    }
    return Window(
        clip=clip,
        video_id=video_id,
        keyframe_start=keyframe_base + first,
        actor_start=actor_base + a0,
        timestamps=np.array(timestamps[first:stop]),
        actor_ptr=np.asarray(actor_ptr[first : stop + 1], dtype=np.int64) - a0,
        object_ptr=np.asarray(object_ptr[first : stop + 1], dtype=np.int64) - o0,
        **rows,
    )


def max_nodes_per_keyframe(actor_ptr: np.ndarray, object_ptr: np.ndarray) -> int:
    """The most graph nodes (actors + objects) of one keyframe, from the CSR pointers."""
    return int((np.diff(actor_ptr) + np.diff(object_ptr)).max(initial=0))


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
