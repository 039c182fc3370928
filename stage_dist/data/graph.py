"""The spatio-temporal graph of a batch of windows, and attention over it.

Nodes are the batch's actors then its objects (the order of :class:`~stage_dist.data.batch.Batch`).
Two nodes connect iff they belong to the same window and their keyframes are the same or
adjacent (``|frame_i - frame_j| <= 1``), self loops included; the edge weight is
``exp(-tau * ||centre_i - centre_j||_2)`` of the normalised box centres (the published
``boxlist_distance``).

Layout. Every keyframe of every window is one *group*; its nodes occupy the first slots of a
row of ``P`` slots (``P`` >= most nodes in any keyframe of the batch; actors before objects). A
node attends to the ``3P`` keys made of the slots of the previous, same and next group, so the
edge mask and weights are ``(G, P, 3P)`` tensors: banded, block-diagonal by construction (a
neighbour group of another window is masked), and linear in the number of keyframes, never an
``N x N`` matrix. Attention gathers each group's queries and keys by node index and runs one
batched matmul per layer.

Who does what. :func:`build_graph` runs in the loader's collate, on the CPU, with numpy: it
reads only host arrays, so the data-dependent sizes (slots, groups) never cost the device a
sync. The model receives the finished :class:`Graph` (index and mask tensors) and computes only
shape-static tensor ops from it (edge weights from the node boxes, attention), which is what
lets ``torch.compile`` trace the forward as one graph. Padding (more slots, groups or nodes than
the batch needs, see :class:`~stage_dist.data.batch.Padding`) is invisible to real nodes: padding
slots and groups are masked, padding nodes sit in no slot any real node reads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

_NEIGHBOURS = 3  # previous, same and next keyframe


def box_centres(boxes: torch.Tensor) -> torch.Tensor:
    """Centres ``(xc, yc)`` of ``x1, y1, x2, y2`` boxes, with the published arithmetic."""
    xc = (boxes[:, 2] - boxes[:, 0]) / 2 + boxes[:, 0]
    yc = (boxes[:, 3] - boxes[:, 1]) / 2 + boxes[:, 1]
    return torch.stack((xc, yc), dim=1)


@dataclass(eq=False)
class Graph:
    """Banded per-keyframe form of a block-diagonal window graph (tensors only).

    Group ``g`` is one keyframe of one window; its nodes fill its first slots, in node order.
    ``query_node[g, i]`` is the node in slot ``i`` of group ``g``; ``key_node[g, k]`` the node in
    key ``k``: slot ``k % P`` of group ``g - 1 + k // P`` (previous, same, next keyframe).
    Empty slots point at node 0. ``query_ok[g, i]``: slot ``i`` holds a node; ``key_ok[g, k]``:
    key ``k`` holds a node of the same window; the edge mask is their outer product.
    ``node_slot[n]`` is node ``n``'s flat slot ``g * P + i`` (0 for a padding node).
    """

    node_slot: torch.Tensor  # (N,) int64
    query_node: torch.Tensor  # (G, P) int64
    key_node: torch.Tensor  # (G, 3P) int64
    query_ok: torch.Tensor  # (G, P) bool
    key_ok: torch.Tensor  # (G, 3P) bool

    def __eq__(self, other: object) -> bool:
        """Same layout: every tensor equal (shape, dtype and values)."""
        if not isinstance(other, Graph):
            return NotImplemented
        return all(torch.equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    @property
    def num_nodes(self) -> int:
        return self.node_slot.shape[0]

    @property
    def num_groups(self) -> int:
        return self.query_node.shape[0]

    @property
    def slots(self) -> int:
        return self.query_node.shape[1]

    @property
    def mask(self) -> torch.Tensor:
        """(G, P, 3P) bool: query slot ``i`` of group ``g`` attends to key ``k``."""
        return self.query_ok.unsqueeze(2) & self.key_ok.unsqueeze(1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Graph":
        return Graph(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    def pin_memory(self) -> "Graph":
        return Graph(*(getattr(self, f.name).pin_memory() for f in fields(self)))

    def weights(self, boxes: torch.Tensor, tau: float) -> torch.Tensor:
        """(G, P, 3P) float32 edge weights ``exp(-tau * ||c_i - c_j||)`` of the nodes' boxes
        (``(N, 4)``, node order); undefined where :attr:`mask` is false."""
        centres = box_centres(boxes.float())
        query_centres = centres.index_select(0, self.query_node.flatten()).view(self.num_groups, self.slots, 2)
        key_centres = centres.index_select(0, self.key_node.flatten()).view(self.num_groups, 3 * self.slots, 2)
        dx = query_centres[..., 0].unsqueeze(2) - key_centres[..., 0].unsqueeze(1)
        dy = query_centres[..., 1].unsqueeze(2) - key_centres[..., 1].unsqueeze(1)
        return torch.exp(-tau * torch.sqrt(dx**2 + dy**2))

    def logits(self, src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Masked attention logits ``(H, G, P, 3P)`` in float32 (float64 for float64 inputs).

        ``src``/``dst``: (N, H) halves of ``a . [h_i || h_j]``, in any precision (bf16/fp16
        under autocast). They are gathered, then cast up *before* the sum and the LeakyReLU, so
        ``LeakyReLU_0.2(src_i + dst_j) * w_ij`` and the masking are float32 arithmetic on the
        low-precision projections, as the model documents.
        """
        num_heads = src.shape[1]
        g, p = self.num_groups, self.slots
        compute = torch.promote_types(src.dtype, torch.float32)
        queries = src.t().index_select(1, self.query_node.flatten()).to(compute).view(num_heads, g, p, 1)
        keys = dst.t().index_select(1, self.key_node.flatten()).to(compute).view(num_heads, g, 1, 3 * p)
        logits = F.leaky_relu(queries + keys, 0.2) * weights.to(compute)
        return logits.masked_fill(~self.mask, torch.finfo(compute).min)

    def attend(self, h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Multi-head masked graph attention ``h'_i = sum_j softmax_j(w_ij * e_ij) h_j``.

        ``h``: (N, H, F) node values (any strides); ``src``/``dst``: (N, H), the two halves of
        ``a . [h_i || h_j]`` (``a1 . h_i`` and ``a2 . h_j``), so
        ``e_ij = LeakyReLU_0.2(src_i + dst_j)``; ``weights``: :meth:`weights`.
        Logits are summed, weighted, masked with the dtype minimum and normalised in float32
        (float64 when ``h`` is float64), never in half precision (:meth:`logits`). Returns
        (N, H, F) in ``h``'s dtype.
        """
        num_nodes, num_heads, features = h.shape
        if num_nodes == 0 or self.num_groups == 0:  # keep W and a in the autograd graph: DDP needs every gradient
            return h + (src.sum() + dst.sum()) * 0
        g, p = self.num_groups, self.slots
        attention = torch.softmax(self.logits(src, dst, weights), dim=-1).to(h.dtype)  # (H, G, P, 3P)
        values = h.permute(1, 0, 2).index_select(1, self.key_node.flatten())  # (H, G * 3P, F)
        out = torch.bmm(attention.view(num_heads * g, p, 3 * p),
                        values.view(num_heads * g, 3 * p, features))
        out = out.view(num_heads, g * p, features).permute(1, 0, 2)
        return out.index_select(0, self.node_slot)

    def real_nodes(self) -> torch.Tensor:
        """(N,) bool: which nodes occupy a slot (the others are padding)."""
        flat = self.query_node.flatten()
        occupied = self.query_ok.flatten()[self.node_slot]
        return occupied & (flat[self.node_slot] == torch.arange(self.num_nodes, device=flat.device))

    def to_dense(self, boxes: torch.Tensor, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, weights)`` as ``(N, N)`` matrices in node order (for tests and inspection);
        padding nodes have no edges."""
        p = max(self.slots, 1)
        group, rank = self.node_slot // p, self.node_slot % p
        offset = group.unsqueeze(0) - group.unsqueeze(1) + 1  # (N, N): 0, 1, 2 when adjacent
        near = (offset >= 0) & (offset < _NEIGHBOURS)
        key = offset.clamp(0, _NEIGHBOURS - 1) * p + rank.unsqueeze(0)
        rows = group.unsqueeze(1).expand_as(key)
        cols = rank.unsqueeze(1).expand_as(key)
        real = self.real_nodes()
        mask = near & self.mask[rows, cols, key] & real.unsqueeze(0) & real.unsqueeze(1)
        if self.num_groups == 0:
            return mask, torch.zeros(mask.shape)
        weights = torch.where(mask, self.weights(boxes, tau)[rows, cols, key], 0.0)
        return mask, weights


def build_graph(
    window: np.ndarray,
    frame: np.ndarray,
    lengths: np.ndarray | None = None,
    *,
    node_ids: np.ndarray | None = None,
    num_nodes: int | None = None,
    slots: int = 0,
    groups: int = 0,
) -> Graph:
    """Graph of nodes given by their window index and keyframe index in the window (host arrays).

    ``window``/``frame``: (n,) integer arrays of the real nodes, in node order; ``lengths``: the
    windows' keyframe counts (default: as seen by the nodes, ``max frame + 1`` per window).
    ``node_ids`` places real node ``i`` at row ``node_ids[i]`` of a node tensor of ``num_nodes``
    rows (default: rows ``0..n-1``); the other rows are padding nodes. ``slots``/``groups``
    give at least that many slots per group and groups (padding, masked). numpy only: runs in
    the DataLoader worker and never touches a device.
    """
    window = np.asarray(window, dtype=np.int64)
    frame = np.asarray(frame, dtype=np.int64)
    n = len(window)
    if lengths is None:
        lengths = np.zeros(int(window.max(initial=-1)) + 1, dtype=np.int64)
        np.maximum.at(lengths, window, frame + 1)
    lengths = np.asarray(lengths, dtype=np.int64)
    node_ids = np.arange(n, dtype=np.int64) if node_ids is None else np.asarray(node_ids, dtype=np.int64)
    num_nodes = n if num_nodes is None else num_nodes
    starts = np.cumsum(lengths) - lengths
    group = starts[window] + frame  # (n,)
    real_groups = int(lengths.sum())
    num_groups = max(real_groups, groups)
    counts = np.bincount(group, minlength=num_groups)
    p = max(int(counts.max(initial=0)), slots, 1 if num_nodes and num_groups else 0)
    order = np.argsort(group, kind="stable")  # keeps node order (actors first) in a group
    first = np.cumsum(counts) - counts
    rank = np.empty_like(group)
    rank[order] = np.arange(n, dtype=np.int64) - first[group[order]]
    node_slot = np.zeros(num_nodes, dtype=np.int64)
    node_slot[node_ids] = group * p + rank

    group_window = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    group_frame = np.arange(real_groups, dtype=np.int64) - starts[group_window]
    neighbour_ok = np.zeros((num_groups, _NEIGHBOURS), dtype=bool)  # padding groups: no neighbours
    neighbour_ok[:real_groups, 0] = group_frame > 0
    neighbour_ok[:real_groups, 1] = True
    neighbour_ok[:real_groups, 2] = group_frame < lengths[group_window] - 1

    def neighbours(grid: np.ndarray) -> np.ndarray:
        """(G, P) per-slot values -> (G, 3P) values of the previous, same and next group."""
        padded = np.pad(grid, ((1, 1), (0, 0)))
        return np.concatenate((padded[:-2], padded[1:-1], padded[2:]), axis=1)

    query_ok = np.arange(p) < counts[:, None]  # (G, P)
    key_ok = (neighbours(query_ok).reshape(num_groups, _NEIGHBOURS, p) & neighbour_ok[:, :, None])
    slot_node = np.zeros(num_groups * p, dtype=np.int64)  # flat (group, slot) -> node
    slot_node[group * p + rank] = node_ids
    query_node = slot_node.reshape(num_groups, p)
    return Graph(
        node_slot=torch.from_numpy(node_slot),
        query_node=torch.from_numpy(query_node),
        key_node=torch.from_numpy(neighbours(query_node)),
        query_ok=torch.from_numpy(query_ok),
        key_ok=torch.from_numpy(key_ok.reshape(num_groups, _NEIGHBOURS * p)),
    )
