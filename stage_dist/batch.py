"""The data contract between the feature store, the samplers, the model and inference.

A :class:`WindowSpec` names W consecutive keyframes of one clip. The store turns it into a
:class:`Window` (numpy arrays, one contiguous row range per array). :func:`collate` stacks
several windows into one :class:`Batch` of tensors: a block-diagonal graph in which every node
knows its window and its keyframe within that window, so the graph builder never needs the
position of a keyframe in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple, Sequence

import numpy as np
import torch


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


@dataclass
class Batch:
    """Several windows as one block-diagonal graph, ready for the model.

    ``*_frame`` is each node's keyframe index inside its window, ``*_window`` its window's
    index in the batch. Two nodes connect iff same window and ``|frame_i - frame_j| <= 1``.
    ``actor_keyframe``/``actor_index`` are global store rows (bookkeeping for inference).
    """

    actor_features: torch.Tensor  # (A, C)
    actor_boxes: torch.Tensor  # (A, 4) float32
    actor_frame: torch.Tensor  # (A,) int64
    actor_window: torch.Tensor  # (A,) int64
    object_features: torch.Tensor  # (O, D)
    object_boxes: torch.Tensor  # (O, 4) float32
    object_frame: torch.Tensor  # (O,) int64
    object_window: torch.Tensor  # (O,) int64
    labels: torch.Tensor  # (A, 80) float32
    actor_keyframe: torch.Tensor  # (A,) int64, global keyframe row
    actor_index: torch.Tensor  # (A,) int64, global actor row
    num_windows: int
    num_keyframes: int
    # Graph slots per keyframe (0: the batch's most nodes in one keyframe). Inference pins it
    # to the store's maximum so that a keyframe's scores do not depend on its batch-mates.
    slots_per_keyframe: int = 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return Batch(**moved)

    def pin_memory(self) -> "Batch":
        pinned = {}
        for f in fields(self):
            value = getattr(self, f.name)
            pinned[f.name] = value.pin_memory() if isinstance(value, torch.Tensor) else value
        return Batch(**pinned)


def _node_positions(ptr: np.ndarray) -> np.ndarray:
    """Keyframe index of every row described by CSR pointers ``ptr``."""
    return np.repeat(np.arange(len(ptr) - 1, dtype=np.int64), np.diff(ptr))


def collate(windows: Sequence[Window], slots_per_keyframe: int = 0) -> Batch:
    """Stack windows into one block-diagonal :class:`Batch` (a single copy per array)."""
    if not windows:
        raise ValueError("collate needs at least one window")

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(w, name) for w in windows], axis=0)

    actor_counts = [len(w.actor_boxes) for w in windows]
    object_counts = [len(w.object_boxes) for w in windows]
    actor_frame = np.concatenate([_node_positions(w.actor_ptr) for w in windows])
    object_frame = np.concatenate([_node_positions(w.object_ptr) for w in windows])
    window_ids = np.arange(len(windows), dtype=np.int64)
    actor_keyframe = np.concatenate(
        [w.keyframe_start + _node_positions(w.actor_ptr) for w in windows]
    )
    actor_index = np.concatenate(
        [w.actor_start + np.arange(n, dtype=np.int64) for w, n in zip(windows, actor_counts)]
    )
    return Batch(
        actor_features=torch.from_numpy(cat("actor_features")),
        actor_boxes=torch.from_numpy(cat("actor_boxes").astype(np.float32, copy=False)),
        actor_frame=torch.from_numpy(actor_frame),
        actor_window=torch.from_numpy(np.repeat(window_ids, actor_counts)),
        object_features=torch.from_numpy(cat("object_features")),
        object_boxes=torch.from_numpy(cat("object_boxes").astype(np.float32, copy=False)),
        object_frame=torch.from_numpy(object_frame),
        object_window=torch.from_numpy(np.repeat(window_ids, object_counts)),
        labels=torch.from_numpy(cat("actor_labels").astype(np.float32)),
        actor_keyframe=torch.from_numpy(actor_keyframe.astype(np.int64)),
        actor_index=torch.from_numpy(actor_index),
        num_windows=len(windows),
        num_keyframes=sum(w.num_keyframes for w in windows),
        slots_per_keyframe=slots_per_keyframe,
    )
