"""Windows as tensors: the batch the model reads, and the one place that decides its shapes.

A store turns a :class:`~stage_dist.store.window.WindowSpec` into a :class:`~stage_dist.store.window.Window`
(numpy arrays, one contiguous row range per array). :func:`collate` stacks several windows into
one :class:`Batch` of tensors and builds its block-diagonal :class:`~stage_dist.data.graph.Graph`
there, on the host (in the DataLoader worker): data flows one way, store -> window -> batch +
graph -> model, and the model never reads a size back from the device.

A :class:`Padding` says how :func:`collate` sizes the batch; it is the one place that decides
shapes: exact (training, the default), bucketed (``--compile``: a handful of shapes per run) or
batch-invariant (inference: a keyframe's scores do not depend on its batch-mates).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import numpy.typing as npt
import torch

from stage_dist.data.graph import Graph, build_graph
from stage_dist.store.window import Window

# Batch-invariant mode (see Padding.batch_invariant): rows per block of a row-wise op, and the
# multiple of the group count.
INVARIANT_ROWS = 128
INVARIANT_GROUPS = 32
# Bucket sizes: m * 2**k for m in 4..7 (four steps per octave, so at most 25 % padding), and
# never below MIN_BUCKET (tiny counts all share one shape).
BUCKET_STEPS = 4
MIN_BUCKET = 8


def bucket(n: int) -> int:
    """Smallest bucket size >= ``n``: 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ..."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    octave = (n - 1).bit_length()  # 2**(octave - 1) < n <= 2**octave
    step = 2 ** (octave - 1) // BUCKET_STEPS
    return -(-n // step) * step


@dataclass(frozen=True)
class Padding:
    """How :func:`collate` shapes a batch.

    ``bucketed``: the actor, object, keyframe-group and slot counts are rounded up to
    :func:`bucket` sizes (zero-filled padding nodes, empty masked groups and slots), so that
    ``torch.compile`` sees a handful of shapes per run instead of one per step.
    ``slots``: at least this many graph slots per keyframe. ``row_block``: actor and object
    counts are rounded up to a multiple of it and the model applies every row-wise op (the
    linear layers, the attention projections) in blocks of exactly that many rows.
    ``group_block``: the group count is rounded up to a multiple of it.
    Use :meth:`batch_invariant` rather than setting the last three by hand.
    """

    bucketed: bool = False
    slots: int = 0
    row_block: int = 0
    group_block: int = 0

    @classmethod
    def batch_invariant(cls, max_nodes_per_keyframe: int) -> "Padding":
        """Inference mode: every keyframe's logits are bitwise independent of the other windows
        in its batch, so results.csv is byte-identical for any window size and rank count.

        Two things make a keyframe's arithmetic the same in every batch: its graph row has
        always ``max_nodes_per_keyframe`` slots (the split's most nodes per keyframe), and every
        row-wise matmul runs on blocks of exactly :data:`INVARIANT_ROWS` rows (CPU and GPU
        matmul kernels choose their blocking from the matrix shape, so a row's result can
        otherwise change in the last bit with the number of rows beside it). Row counts that
        are multiples of 128 and group counts that are multiples of 32 also make every
        element-wise op's tensor a multiple of the CPU vector length: no element falls into a
        kernel's scalar remainder loop, whose ``exp``/``expm1`` can differ from the vectorised
        one in the last bit (the ELU and the edge weights did, before). Row and group counts are
        bucketed as well (which changes no bit), so ``--compile`` sees few shapes.
        """
        return cls(bucketed=True, slots=max(max_nodes_per_keyframe, 1), row_block=INVARIANT_ROWS,
                   group_block=INVARIANT_GROUPS)

    def rows(self, n: int) -> int:
        """Rows of an actor or object tensor holding ``n`` nodes."""
        if self.bucketed:
            n = bucket(n)
        if self.row_block:
            n = -(-n // self.row_block) * self.row_block
        return n

    def groups(self, n: int) -> int:
        """Groups (keyframe rows of the graph) for ``n`` keyframes."""
        if self.bucketed:
            n = bucket(n)
        if self.group_block:
            n = -(-n // self.group_block) * self.group_block
        return n

    def slots_for(self, most_nodes: int) -> int:
        """Slots per keyframe for a batch whose fullest keyframe holds ``most_nodes`` nodes
        (pinned slots are not bucketed: they are the same in every batch already)."""
        if self.slots:
            return max(most_nodes, self.slots)
        return bucket(most_nodes) if self.bucketed else most_nodes


@dataclass
class Batch:
    """Several windows as one block-diagonal graph, ready for the model.

    Model inputs: the features and boxes (``A' >= A`` actor and ``O' >= O`` object rows, the
    rows past ``num_actors``/``num_objects`` are zero padding), the :class:`Graph` over the
    ``A' + O'`` nodes (actors then objects) and ``row_block`` (see :class:`Padding`).
    Labels: uint8 ``(A, 80)`` on the host; :meth:`to` delivers them as float32 on the device.
    Bookkeeping, host only (:meth:`to` leaves it where it is): ``*_frame`` is each node's
    keyframe index inside its window, ``*_window`` its window's index in the batch,
    ``actor_keyframe``/``actor_index`` global store rows (for inference).
    """

    actor_features: torch.Tensor  # (A', C)
    actor_boxes: torch.Tensor  # (A', 4) float32
    object_features: torch.Tensor  # (O', D)
    object_boxes: torch.Tensor  # (O', 4) float32
    graph: Graph
    labels: torch.Tensor  # (A, 80) uint8 on the host, float32 after `to`
    actor_frame: torch.Tensor  # (A,) int64
    actor_window: torch.Tensor  # (A,) int64
    object_frame: torch.Tensor  # (O,) int64
    object_window: torch.Tensor  # (O,) int64
    actor_keyframe: torch.Tensor  # (A,) int64, global keyframe row
    actor_index: torch.Tensor  # (A,) int64, global actor row
    num_windows: int
    num_keyframes: int
    row_block: int = 0

    @property
    def num_actors(self) -> int:
        return self.actor_index.shape[0]

    @property
    def num_objects(self) -> int:
        return self.object_frame.shape[0]

    def shape_key(self) -> tuple[int, int, int, int]:
        """(actor rows, object rows, groups, slots): what a compiled model specialises on."""
        return (self.actor_features.shape[0], self.object_features.shape[0],
                self.graph.num_groups, self.graph.slots)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The model inputs and labels (as float32) on ``device``; bookkeeping stays on the host."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            actor_features=move(self.actor_features), actor_boxes=move(self.actor_boxes),
            object_features=move(self.object_features), object_boxes=move(self.object_boxes),
            graph=self.graph.to(device, non_blocking), labels=move(self.labels).float(),
        )

    def pin_memory(self) -> "Batch":
        """Pinned copies of what :meth:`to` moves (DataLoader ``pin_memory=True``)."""
        return replace(
            self,
            actor_features=self.actor_features.pin_memory(), actor_boxes=self.actor_boxes.pin_memory(),
            object_features=self.object_features.pin_memory(), object_boxes=self.object_boxes.pin_memory(),
            graph=self.graph.pin_memory(), labels=self.labels.pin_memory(),
        )


def _node_positions(ptr: np.ndarray) -> np.ndarray:
    """Keyframe index of every row described by CSR pointers ``ptr``."""
    return np.repeat(np.arange(len(ptr) - 1, dtype=np.int64), np.diff(ptr))


def _stack(arrays: Sequence[np.ndarray], rows: int, dtype: npt.DTypeLike | None = None) -> torch.Tensor:
    """Concatenate ``arrays`` into ``rows`` rows (zero-filled past their end), one copy."""
    dtype = np.dtype(dtype or arrays[0].dtype)
    count = sum(len(a) for a in arrays)
    if rows == count:
        return torch.from_numpy(np.concatenate(arrays, axis=0).astype(dtype, copy=False))
    out = np.zeros((rows, *arrays[0].shape[1:]), dtype=dtype)
    np.concatenate(arrays, axis=0, out=out[:count], casting="same_kind")
    return torch.from_numpy(out)


def collate(windows: Sequence[Window], padding: Padding = Padding()) -> Batch:
    """Stack windows into one block-diagonal :class:`Batch` and build its graph (host only)."""
    if not windows:
        raise ValueError("collate needs at least one window")
    actor_counts = [len(w.actor_boxes) for w in windows]
    object_counts = [len(w.object_boxes) for w in windows]
    num_actors, num_objects = sum(actor_counts), sum(object_counts)
    actor_rows, object_rows = padding.rows(num_actors), padding.rows(num_objects)
    actor_frame = np.concatenate([_node_positions(w.actor_ptr) for w in windows])
    object_frame = np.concatenate([_node_positions(w.object_ptr) for w in windows])
    window_ids = np.arange(len(windows), dtype=np.int64)
    actor_window = np.repeat(window_ids, actor_counts)
    object_window = np.repeat(window_ids, object_counts)
    lengths = np.array([w.num_keyframes for w in windows], dtype=np.int64)
    most_nodes = max(int((np.diff(w.actor_ptr) + np.diff(w.object_ptr)).max(initial=0)) for w in windows)
    graph = build_graph(
        np.concatenate((actor_window, object_window)),
        np.concatenate((actor_frame, object_frame)),
        lengths,
        node_ids=np.concatenate((np.arange(num_actors), actor_rows + np.arange(num_objects))),
        num_nodes=actor_rows + object_rows,
        slots=padding.slots_for(most_nodes),
        groups=padding.groups(int(lengths.sum())),
    )
    actor_keyframe = np.concatenate(
        [w.keyframe_start + _node_positions(w.actor_ptr) for w in windows]
    )
    actor_index = np.concatenate(
        [w.actor_start + np.arange(n, dtype=np.int64) for w, n in zip(windows, actor_counts)]
    )
    return Batch(
        actor_features=_stack([w.actor_features for w in windows], actor_rows),
        actor_boxes=_stack([w.actor_boxes for w in windows], actor_rows, np.float32),
        object_features=_stack([w.object_features for w in windows], object_rows),
        object_boxes=_stack([w.object_boxes for w in windows], object_rows, np.float32),
        graph=graph,
        labels=torch.from_numpy(np.concatenate([w.actor_labels for w in windows]).astype(np.uint8, copy=False)),
        actor_frame=torch.from_numpy(actor_frame),
        actor_window=torch.from_numpy(actor_window),
        object_frame=torch.from_numpy(object_frame),
        object_window=torch.from_numpy(object_window),
        actor_keyframe=torch.from_numpy(actor_keyframe.astype(np.int64)),
        actor_index=torch.from_numpy(actor_index),
        num_windows=len(windows),
        num_keyframes=int(lengths.sum()),
        row_block=padding.row_block,
    )
