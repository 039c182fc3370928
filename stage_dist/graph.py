"""The spatio-temporal graph of a batch of windows, and attention over it.

Nodes are the batch's actors then its objects (the order of :class:`~stage_dist.batch.Batch`).
Two nodes connect iff they belong to the same window and their keyframes are the same or
adjacent (``|frame_i - frame_j| <= 1``), self loops included; the edge weight is
``exp(-tau * ||centre_i - centre_j||_2)`` of the normalised box centres (the published
``boxlist_distance``).

Layout. Every keyframe of every window is one *group*; its nodes occupy the first slots of a
row of ``P`` slots (``P`` = most nodes in any keyframe of the batch; actors before objects). A
node attends to the ``3P`` keys made of the slots of the previous, same and next group, so the
edge mask and weights are ``(G, P, 3P)`` tensors: banded, block-diagonal by construction (a
neighbour group of another window is masked), and linear in the number of keyframes, never an
``N x N`` matrix. Attention gathers each group's queries and keys by node index and runs one
batched matmul per layer. Everything is built on the batch's device with tensor ops only: no
Python loop over nodes, keyframes or windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stage_dist.batch import Batch

_NEIGHBOURS = 3  # previous, same and next keyframe


def box_centres(boxes: torch.Tensor) -> torch.Tensor:
    """Centres ``(xc, yc)`` of ``x1, y1, x2, y2`` boxes, with the published arithmetic."""
    xc = (boxes[:, 2] - boxes[:, 0]) / 2 + boxes[:, 0]
    yc = (boxes[:, 3] - boxes[:, 1]) / 2 + boxes[:, 1]
    return torch.stack((xc, yc), dim=1)


@dataclass
class Graph:
    """Banded per-keyframe form of a block-diagonal window graph.

    Group ``g`` is one keyframe of one window; its nodes fill its first slots, in node order.
    ``query_node[g, i]`` is the node in slot ``i`` of group ``g``; ``key_node[g, k]`` the node in
    key ``k``: slot ``k % P`` of group ``g - 1 + k // P`` (previous, same, next keyframe).
    Empty slots point at node 0; ``mask`` excludes them, as well as neighbours in another
    window. ``weights`` holds the edge weights (float32; undefined where ``mask`` is false).
    ``node_slot[n]`` is node ``n``'s flat slot ``g * P + i``.
    """

    node_slot: torch.Tensor  # (N,) int64
    query_node: torch.Tensor  # (G, P) int64
    key_node: torch.Tensor  # (G, 3P) int64
    mask: torch.Tensor  # (G, P, 3P) bool
    weights: torch.Tensor  # (G, P, 3P) float32
    num_groups: int
    slots: int

    @property
    def num_nodes(self) -> int:
        return self.node_slot.numel()

    def attend(self, h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """Multi-head masked graph attention ``h'_i = sum_j softmax_j(w_ij * e_ij) h_j``.

        ``h``: (N, H, F) node values (any strides); ``src``/``dst``: (N, H), the two halves of
        ``a . [h_i || h_j]`` (``a1 . h_i`` and ``a2 . h_j``), so
        ``e_ij = LeakyReLU_0.2(src_i + dst_j)``.
        Logits are weighted, masked with the dtype minimum and normalised in float32 (float64
        when ``h`` is float64), never in half precision. Returns (N, H, F) in ``h``'s dtype.
        """
        num_nodes, num_heads, features = h.shape
        if num_nodes == 0:  # keep W and a in the autograd graph: DDP needs every gradient
            return h + (src.sum() + dst.sum()) * 0
        g, p = self.num_groups, self.slots
        keys_flat = self.key_node.flatten()
        queries = src.t().index_select(1, self.query_node.flatten()).view(num_heads, g, p, 1)
        keys = dst.t().index_select(1, keys_flat).view(num_heads, g, 1, 3 * p)
        compute = torch.promote_types(h.dtype, torch.float32)
        logits = F.leaky_relu(queries + keys, 0.2).to(compute) * self.weights.to(compute)
        logits = logits.masked_fill(~self.mask, torch.finfo(compute).min)
        attention = torch.softmax(logits, dim=-1).to(h.dtype)  # (H, G, P, 3P)
        values = h.permute(1, 0, 2).index_select(1, keys_flat)  # (H, G * 3P, F)
        out = torch.bmm(attention.view(num_heads * g, p, 3 * p),
                        values.view(num_heads * g, 3 * p, features))
        out = out.view(num_heads, g * p, features).permute(1, 0, 2)
        return out.index_select(0, self.node_slot)

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, weights)`` as ``(N, N)`` matrices in node order (for tests and inspection)."""
        p = max(self.slots, 1)
        group, rank = self.node_slot // p, self.node_slot % p
        offset = group.unsqueeze(0) - group.unsqueeze(1) + 1  # (N, N): 0, 1, 2 when adjacent
        near = (offset >= 0) & (offset < _NEIGHBOURS)
        key = offset.clamp(0, _NEIGHBOURS - 1) * p + rank.unsqueeze(0)
        rows = group.unsqueeze(1).expand_as(key)
        cols = rank.unsqueeze(1).expand_as(key)
        mask = near & self.mask[rows, cols, key]
        weights = torch.where(mask, self.weights[rows, cols, key], 0.0)
        return mask, weights


def build_graph(
    window: torch.Tensor,
    frame: torch.Tensor,
    boxes: torch.Tensor,
    tau: float = 1.0,
    num_windows: int | None = None,
    min_slots: int = 0,
) -> Graph:
    """Graph of nodes given by their window index, keyframe index in the window and box.

    ``window``/``frame``: (N,) int64; ``boxes``: (N, 4) normalised ``x1, y1, x2, y2``.
    ``min_slots`` pads every keyframe to at least that many slots. With the same ``P`` every
    keyframe's attention is the same arithmetic whatever else is in the batch, so inference
    pins it to make scores bitwise independent of window size and rank count.
    """
    device = window.device
    if window.numel() == 0:
        empty = torch.zeros((0, 0, 0), device=device)
        index = window.new_zeros((0, 0))
        return Graph(window.new_zeros(0), index, index, empty.bool(), empty, 0, 0)
    if num_windows is None:
        num_windows = int(window.max()) + 1
    # Window lengths as seen by the nodes; empty trailing keyframes connect nothing.
    lengths = torch.zeros(num_windows, dtype=torch.int64, device=device)
    lengths = lengths.scatter_reduce(0, window, frame + 1, reduce="amax")
    starts = torch.cumsum(lengths, 0) - lengths
    group = starts[window] + frame  # (N,)
    num_groups = int(lengths.sum())
    counts = torch.bincount(group, minlength=num_groups)
    slots = max(int(counts.max()), min_slots)
    order = torch.argsort(group, stable=True)  # keeps node order (actors first) in a group
    first = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(group)
    rank[order] = torch.arange(group.numel(), device=device) - first[group[order]]
    node_slot = group * slots + rank

    group_window = torch.repeat_interleave(
        torch.arange(num_windows, device=device), lengths, output_size=num_groups
    )
    group_frame = torch.arange(num_groups, device=device) - starts[group_window]
    neighbour_ok = torch.stack(
        (group_frame > 0, torch.ones_like(group_frame, dtype=torch.bool),
         group_frame < lengths[group_window] - 1),
        dim=1,
    )  # (G, 3)

    def neighbours(grid: torch.Tensor) -> torch.Tensor:
        """(G, P) per-slot values -> (G, 3P) values of the previous, same and next group."""
        padded = F.pad(grid, (0, 0, 1, 1))
        return torch.cat((padded[:-2], padded[1:-1], padded[2:]), dim=1)

    occupied = torch.arange(slots, device=device).unsqueeze(0) < counts.unsqueeze(1)  # (G, P)
    key_ok = neighbours(occupied).view(num_groups, _NEIGHBOURS, slots) & neighbour_ok.unsqueeze(2)
    mask = occupied.unsqueeze(2) & key_ok.view(num_groups, 1, _NEIGHBOURS * slots)

    query_node = torch.zeros(num_groups * slots, dtype=torch.int64, device=device)
    query_node[node_slot] = torch.arange(group.numel(), device=device)
    query_node = query_node.view(num_groups, slots)
    key_node = neighbours(query_node)

    centres = box_centres(boxes.float())
    query_centres, key_centres = centres[query_node], centres[key_node]  # (G, P, 2), (G, 3P, 2)
    dx = query_centres[..., 0].unsqueeze(2) - key_centres[..., 0].unsqueeze(1)
    dy = query_centres[..., 1].unsqueeze(2) - key_centres[..., 1].unsqueeze(1)
    weights = torch.exp(-tau * torch.sqrt(dx**2 + dy**2))
    return Graph(node_slot, query_node, key_node, mask, weights, num_groups, slots)


def build_batch_graph(batch: Batch, tau: float = 1.0) -> Graph:
    """Graph of a :class:`Batch`: its actors then its objects."""
    return build_graph(
        torch.cat((batch.actor_window, batch.object_window)),
        torch.cat((batch.actor_frame, batch.object_frame)),
        torch.cat((batch.actor_boxes, batch.object_boxes)),
        tau=tau,
        num_windows=batch.num_windows,
        min_slots=batch.slots_per_keyframe,
    )
