"""A plain reference STAGE, written from the equations the way the published code computes them.

Mirrors aimagelab/STAGE_action_detection (models/attention_layer.py, models/gat.py,
models/model.py, utils/boxlist_ops.py, data/collate_batch.py): the N x N x 2F concatenation
``[h_i || h_j]``, the ``-9e15`` mask, a dense N x N adjacency filled block by block, and the
published parameter names. Used by the tests and the benchmark only, never by the package.
The one intended difference from the published collate: adjacency is built per window (the
published code chains every keyframe of a batch, across clips).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from stage_dist.data.batch import Batch
from stage_dist.store.window import Window


class GraphAttentionLayer(nn.Module):
    def __init__(self, in_features: int, out_features: int, dropout: float, alpha: float):
        super().__init__()
        self.dropout = dropout
        self.out_features = out_features
        self.W = nn.Parameter(torch.zeros(size=(in_features, out_features)))
        nn.init.xavier_uniform_(self.W.data, gain=1.414)
        self.a = nn.Parameter(torch.zeros(size=(2 * out_features, 1)))
        nn.init.xavier_uniform_(self.a.data, gain=1.414)
        self.leakyrelu = nn.LeakyReLU(alpha)

    def forward(self, input: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = torch.mm(input, self.W)
        n = h.size()[0]
        a_input = torch.cat([h.repeat(1, n).view(n * n, -1), h.repeat(n, 1)], dim=1).view(
            n, -1, 2 * self.out_features
        )
        e = self.leakyrelu(torch.matmul(a_input, self.a).squeeze(2))
        zero_vec = -9e15 * torch.ones_like(e)
        attention = torch.where(adj > 0, e * adj, zero_vec)
        attention = F.softmax(attention / 1, dim=1)
        h_prime = torch.matmul(attention, h)
        h_prime = F.dropout(h_prime, self.dropout, training=self.training)
        return F.elu(h_prime)


class GAT(nn.Module):
    def __init__(self, nfeat: int, nhid: int, dropout: float, alpha: float, nheads: int):
        super().__init__()
        self.dropout = dropout
        for i in range(nheads):
            self.add_module(f"attention_{i}", GraphAttentionLayer(nfeat, nhid, dropout, alpha))

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.dropout, training=self.training)
        return torch.cat(
            [v(x, adj) for k, v in self._modules.items() if k.startswith("attention")], dim=1
        )


class ReferenceStage(nn.Module):
    """The published ``Stage`` (returns logits instead of ``(sigmoid, loss)``)."""

    def __init__(self, num_classes: int, actors: int, objects: int, n_heads: int, dropout=0.5):
        super().__init__()
        self.actors, self.objects = actors, objects
        if objects > actors:
            self.obj_reducer = nn.Linear(objects, actors)
        hid = int(actors / n_heads) + int(4 / n_heads)
        self.gat1 = GAT(actors + 4, hid, dropout, 0.2, n_heads)
        self.gat_fc = nn.Linear(actors + 4, actors + 4)
        self.l_norm = nn.LayerNorm(actors + 4)
        self.gat2 = GAT(actors + 4, hid, dropout, 0.2, n_heads)
        self.gat_fc2 = nn.Linear(actors + 4, actors + 4)
        self.l_norm2 = nn.LayerNorm(actors + 4)
        self.logits = nn.Linear(actors + 4, num_classes)

    def forward(self, actors_features, actors_boxes, objects_features, objects_boxes, adj):
        actors_h = actors_boxes[:, 3] - actors_boxes[:, 1]
        objects_h = objects_boxes[:, 3] - objects_boxes[:, 1]
        actors_w = actors_boxes[:, 2] - actors_boxes[:, 0]
        objects_w = objects_boxes[:, 2] - objects_boxes[:, 0]
        actors_cx = ((actors_boxes[:, 2] - actors_boxes[:, 0]) / 2) + actors_boxes[:, 0]
        actors_cy = ((actors_boxes[:, 3] - actors_boxes[:, 1]) / 2) + actors_boxes[:, 1]
        objects_cx = ((objects_boxes[:, 2] - objects_boxes[:, 0]) / 2) + objects_boxes[:, 0]
        objects_cy = ((objects_boxes[:, 3] - objects_boxes[:, 1]) / 2) + objects_boxes[:, 1]
        actors_features = torch.cat(
            (actors_features, actors_h.unsqueeze(1), actors_w.unsqueeze(1),
             actors_cx.unsqueeze(1), actors_cy.unsqueeze(1)), dim=1)
        if self.objects > self.actors:
            objects_features = F.relu(self.obj_reducer(objects_features))
        objects_features = torch.cat(
            (objects_features, objects_h.unsqueeze(1), objects_w.unsqueeze(1),
             objects_cx.unsqueeze(1), objects_cy.unsqueeze(1)), dim=1)
        all_features = torch.cat((actors_features, objects_features), dim=0)
        gat_pred = self.gat1(all_features, adj)
        all_features = self.l_norm(all_features + self.gat_fc(gat_pred))
        gat_pred = self.gat2(all_features, adj)
        all_features = self.l_norm2(all_features + self.gat_fc2(gat_pred))
        return self.logits(all_features[: actors_features.shape[0], :])


def boxlist_distance(boxes1: torch.Tensor, boxes2: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    b1, b2 = boxes1[:, None], boxes2[:, None]
    center1 = torch.cat((((b1[:, :, 2] - b1[:, :, 0]) / 2) + b1[:, :, 0],
                         ((b1[:, :, 3] - b1[:, :, 1]) / 2) + b1[:, :, 1]), dim=1)
    center2 = torch.cat((((b2[:, :, 2] - b2[:, :, 0]) / 2) + b2[:, :, 0],
                         ((b2[:, :, 3] - b2[:, :, 1]) / 2) + b2[:, :, 1]), dim=1)
    center1 = center1.unsqueeze(1)
    center2 = center2.unsqueeze(0)
    d = torch.sqrt((center1[:, :, 0] - center2[:, :, 0]) ** 2
                   + (center1[:, :, 1] - center2[:, :, 1]) ** 2)
    return torch.exp(-1 * tau * d)


def reference_adjacency(batch: Batch, tau: float = 1.0) -> torch.Tensor:
    """Dense (N, N) adjacency, actors then objects, filled block by block per keyframe pair.

    Keyframe blocks are the published ones (same and adjacent keyframes, actor-actor,
    actor-object, object-actor, object-object) but only inside a window.
    """
    num_actors = batch.actor_boxes.shape[0]
    n = num_actors + batch.object_boxes.shape[0]
    adj = torch.zeros((n, n), device=batch.actor_boxes.device)
    frames = torch.cat((batch.actor_frame, batch.object_frame)).tolist()
    windows = torch.cat((batch.actor_window, batch.object_window)).tolist()
    boxes = torch.cat((batch.actor_boxes, batch.object_boxes)).float()
    keyframes: dict[tuple[int, int], list[int]] = {}
    for node, key in enumerate(zip(windows, frames)):
        keyframes.setdefault(key, []).append(node)
    for (window, frame), rows in keyframes.items():
        for other in (frame - 1, frame, frame + 1):
            cols = keyframes.get((window, other))
            if cols:
                r = torch.tensor(rows, device=adj.device)
                c = torch.tensor(cols, device=adj.device)
                adj[r[:, None], c[None, :]] = boxlist_distance(boxes[r], boxes[c], tau=tau)
    return adj


def reference_logits(
    model: ReferenceStage, batch: Batch, tau: float = 1.0, adj: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of ``model`` on ``batch``; ``adj`` defaults to :func:`reference_adjacency`."""
    dtype = model.logits.weight.dtype
    if adj is None:
        adj = reference_adjacency(batch, tau)
    return model(
        batch.actor_features.to(dtype), batch.actor_boxes.to(dtype),
        batch.object_features.to(dtype), batch.object_boxes.to(dtype), adj.to(dtype),
    )


def random_window(
    rng, num_keyframes: int, actor_dim: int, object_dim: int, max_actors: int = 10,
    max_objects: int = 40, clip: int = 0, actors_per_keyframe=None, objects_per_keyframe=None,
) -> Window:
    """A random window: ``num_keyframes`` keyframes with 0..max actors/objects each (or fixed
    counts), valid normalised boxes, float32 features."""
    if actors_per_keyframe is None:
        actors_per_keyframe = rng.integers(0, max_actors + 1, num_keyframes)
    if objects_per_keyframe is None:
        objects_per_keyframe = rng.integers(0, max_objects + 1, num_keyframes)

    def ptr(counts) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(np.broadcast_to(counts, num_keyframes))))

    actor_ptr, object_ptr = ptr(actors_per_keyframe), ptr(objects_per_keyframe)

    def boxes(n: int) -> np.ndarray:
        corners = rng.random((n, 2, 2)).astype(np.float32)
        return np.concatenate((corners.min(axis=1), corners.max(axis=1)), axis=1)

    num_actors, num_objects = int(actor_ptr[-1]), int(object_ptr[-1])
    return Window(
        clip=clip, video_id=f"clip{clip}", keyframe_start=0, actor_start=0,
        timestamps=np.arange(902, 902 + num_keyframes),
        actor_ptr=actor_ptr.astype(np.int64),
        actor_features=rng.standard_normal((num_actors, actor_dim)).astype(np.float32),
        actor_boxes=boxes(num_actors),
        actor_labels=(rng.random((num_actors, 80)) < 0.05).astype(np.uint8),
        object_ptr=object_ptr.astype(np.int64),
        object_features=rng.standard_normal((num_objects, object_dim)).astype(np.float32),
        object_boxes=boxes(num_objects),
    )
