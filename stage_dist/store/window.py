"""Windows: W consecutive keyframes of one clip, as a name and as rows (numpy only, no torch).

A :class:`WindowSpec` names a window (clip, first keyframe, length); a :class:`Window` holds its
rows of every array the model reads, cut by the one rule both stored forms share
(:func:`cut_window`: the zarr store and the tar shards give the same arrays for the same spec).
An :class:`InferenceWindow` is a window read for inference and the part of it whose predictions
are kept. :func:`max_nodes_per_keyframe` is the slot count that makes inference scores
independent of batch-mates. The store, the shard writer and the converter use this module
without importing torch; :mod:`stage_dist.data.batch` turns windows into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from stage_dist.store.schema import ACTOR_BOXES, ACTOR_FEATURES, ACTOR_LABELS, OBJECT_BOXES, OBJECT_FEATURES

# Store row arrays that make a Window, by Window field.
WINDOW_ROW_ARRAYS = {
    "actor_features": ACTOR_FEATURES,
    "actor_boxes": ACTOR_BOXES,
    "actor_labels": ACTOR_LABELS,
    "object_features": OBJECT_FEATURES,
    "object_boxes": OBJECT_BOXES,
}


class WindowSpec(NamedTuple):
    """Keyframes ``start .. start + length - 1`` (indices within the clip) of clip ``clip``."""

    clip: int
    start: int
    length: int


@dataclass
class Window:
    """One window read from a store: rows of every array for W consecutive keyframes of a clip.

    ``actor_ptr``/``object_ptr`` are CSR pointers local to the window (``ptr[0] == 0``):
    the actors of keyframe ``k`` are rows ``actor_ptr[k]:actor_ptr[k + 1]``.
    ``keyframe_start``/``actor_start`` are the global row indices of the first keyframe and
    first actor in the store, so predictions can be keyed and de-duplicated.
    """

    clip: int
    video_id: str
    keyframe_start: int
    actor_start: int
    timestamps: np.ndarray  # (W,) int
    actor_ptr: np.ndarray  # (W + 1,) int64
    actor_features: np.ndarray  # (A, C) float16/float32 (pooled)
    actor_boxes: np.ndarray  # (A, 4) float32, normalised x1, y1, x2, y2
    actor_labels: np.ndarray  # (A, 80) uint8
    object_ptr: np.ndarray  # (W + 1,) int64
    object_features: np.ndarray  # (O, D)
    object_boxes: np.ndarray  # (O, 4) float32

    @property
    def num_keyframes(self) -> int:
        return len(self.timestamps)


@dataclass(frozen=True)
class InferenceWindow:
    """A window to read and the part of it whose predictions are kept.

    ``spec`` is the keyframe range read (owned keyframes plus context). ``keep_start`` and
    ``keep_stop`` are window-local keyframe indices, like :attr:`Batch.actor_frame`: the window
    owns keyframes ``spec.start + keep_start .. spec.start + keep_stop - 1`` of clip
    ``spec.clip``, so an actor's prediction is kept iff ``keep_start <= frame < keep_stop``.
    """

    spec: WindowSpec
    keep_start: int
    keep_stop: int

    @property
    def owned(self) -> range:
        """Clip-local indices of the keyframes this window predicts."""
        return range(self.spec.start + self.keep_start, self.spec.start + self.keep_stop)


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
) -> Window:
    """Keyframe rows ``first:stop`` of one clip as a :class:`Window`.

    ``timestamps`` and the CSR pointers ``actor_ptr``/``object_ptr`` index the same keyframe
    rows as ``first``/``stop``; ``read_rows(store_array_name, start, stop)`` returns rows of a
    store row array (``actors/features`` ...) in the pointers' row numbering. ``keyframe_base``
    and ``actor_base`` turn those numberings into global store rows (0 for a whole store; a
    clip's first keyframe and actor rows for a clip read from shards).
    """
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
