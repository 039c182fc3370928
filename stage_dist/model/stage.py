"""The STAGE graph-attention model and the no-graph baseline (checkpoints: :mod:`stage_dist.engine.checkpoint`).

Verified against the published code (aimagelab/STAGE_action_detection, commit 584ffe0c):

- ``models/model.py`` (``Stage``): geometry ``h = y2 - y1, w = x2 - x1, xc = (x2 - x1) / 2 + x1,
  yc = (y2 - y1) / 2 + y1`` concatenated in that order after the (pooled) actor feature and
  after the object feature; objects pass ``relu(obj_reducer(.))`` only when
  ``objects_features_size > actors_features_size``; nodes are all actors then all objects;
  ``x = l_norm(x + gat_fc(gat1(x)))`` then ``x = l_norm2(x + gat_fc2(gat2(x)))`` -- the
  second layer has its OWN ``gat_fc2``/``l_norm2`` (not shared); ``logits`` on the actor rows;
  loss BCE-with-logits over all ``num_classes`` columns, output ``sigmoid``.
- ``models/gat.py`` (``GAT``): one ``F.dropout(x, 0.5)`` on the layer input shared by all
  heads; heads are submodules ``attention_{i}``; their outputs are concatenated on dim 1.
  Head width ``int(actors/H) + int(4/H)``: with 1024-dim actors only H in {1, 2, 4} give
  the 1028 columns ``gat_fc`` expects.
- ``models/attention_layer.py`` (``GraphAttentionLayer``): ``W`` (in, out) and ``a`` (2*out, 1),
  both ``xavier_uniform_(gain=1.414)``; ``e = LeakyReLU_0.2(a . [h_i || h_j])``;
  ``where(adj > 0, e * adj, -9e15)``; softmax over j (``/ tau`` with tau hard-coded 1);
  ``h' = att @ h``; ``F.dropout(h', 0.5)``; ``elu``. No dropout on the attention matrix.
- ``utils/boxlist_ops.py`` (``boxlist_distance``): ``adj = exp(-tau * ||c_i - c_j||_2)``;
  ``data/collate_batch.py`` connects same and adjacent keyframes (actor-actor, actor-object,
  object-object, symmetric, self loops) with tau = 1.
- ``utils/checkpoints.py`` / ``train.py``: checkpoints are ``{"model_state", "optimizer_state",
  "epoch", "iteration"}``; default 81 classes (column 0 background), 1024/2048 dims, 4 heads.

Deliberate differences (docs/design.md): adjacency comes from each node's window and keyframe, so
windows never cross clips and a keyframe's neighbours never depend on its place in the batch;
``a . [h_i || h_j]`` is computed as ``a1 . h_i + a2 . h_j`` on a banded per-keyframe layout
(:mod:`stage_dist.data.graph`), masked with the float32 minimum and normalised in float32; the
model returns logits (the caller applies the loss or the sigmoid); actor features arrive
already pooled over t, h, w (the published ``torch.mean`` under ``no_grad``). Note for
callers: the published loss is BCE over all 81 columns, background column 0 included, with
the h5 ``labels`` (n, 81); the store keeps labels for action ids 1..80 only.

The classifier's class set (``ModelConfig.class_ids``): ``None`` is AVA's, the published head of
81 outputs (column 0 background, column j = action id j), so published checkpoints load strictly;
any other class set (a store converted with a label map) has one output per class, column j =
``class_ids[j]``, no background column. :func:`action_logits` gives the class columns of either.

The model kinds are defined here once (:data:`ModelKind`, :data:`MODEL_KINDS`; :data:`MODELS` maps
each to its class, :func:`build_model` builds one), and so is the training run's model section
(:class:`ModelSection`: ``--model``, ``--num-heads``, ``--dropout``), which gives the
:class:`ModelConfig` for the data's feature sizes and class set.

Tests (``tests/test_model.py``) check this module against ``tests/reference_stage.py``, a
transcription of the files above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import nn

from stage_dist.core.config import ConfigError, option
from stage_dist.core.errors import UserInputError
from stage_dist.data.batch import Batch
from stage_dist.data.graph import Graph, box_centres
from stage_dist.store.schema import AVA_CLASS_IDS

GEOMETRY_DIM = 4  # h, w, xc, yc

ModelKind = Literal["stage", "baseline"]  # the published model, or the no-graph baseline (classes: MODELS)
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)


class ModelConfigError(UserInputError, ValueError):
    """A model configuration the published architecture cannot support."""


class ModelInputError(ValueError):
    """A batch whose feature sizes do not match the model."""


@dataclass
class ModelConfig:
    actor_dim: int = 1024
    object_dim: int = 2048
    num_heads: int = 4
    num_outputs: int = 81  # published: column 0 background, column j = AVA action id j
    dropout: float = 0.5
    tau: float = 1.0
    class_ids: list[int] | None = None  # None: AVA (81 outputs); else output j is class id class_ids[j]

    @classmethod
    def head_for(cls, class_ids: Sequence[int]) -> dict[str, Any]:
        """The ``num_outputs``/``class_ids`` arguments of a classifier for a store's class set:
        none for AVA's ids 1..80 (the published 81-output head), else one output per class."""
        if tuple(class_ids) == AVA_CLASS_IDS:
            return {}
        return {"num_outputs": len(class_ids), "class_ids": [int(i) for i in class_ids]}

    @property
    def classes(self) -> tuple[int, ...]:
        """The class id of each column of :func:`action_logits` (AVA: 1..80)."""
        return AVA_CLASS_IDS if self.class_ids is None else tuple(self.class_ids)

    @property
    def node_dim(self) -> int:
        return self.actor_dim + GEOMETRY_DIM

    @property
    def head_dim(self) -> int:
        """Published head width ``int(actors / H) + int(4 / H)``."""
        return self.actor_dim // self.num_heads + GEOMETRY_DIM // self.num_heads

    def validate(self) -> None:
        if self.actor_dim < 1 or self.num_outputs < 1:
            raise ModelConfigError(
                f"actor_dim ({self.actor_dim}) and num_outputs ({self.num_outputs}) must be >= 1"
            )
        if self.object_dim < self.actor_dim:
            raise ModelConfigError(
                f"object_dim ({self.object_dim}) < actor_dim ({self.actor_dim}): the published "
                "model only reduces larger object features (obj_reducer)"
            )
        if self.num_heads < 1 or self.num_heads * self.head_dim != self.node_dim:
            raise ModelConfigError(
                f"num_heads={self.num_heads} is not supported with actor_dim={self.actor_dim}: "
                f"heads of int({self.actor_dim}/H) + int(4/H) columns must concatenate to "
                f"{self.node_dim} (published sizes: 1, 2 or 4 heads)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tau < 0:
            raise ModelConfigError(f"tau must be >= 0, got {self.tau}")
        if self.class_ids is not None and (len(self.class_ids) != self.num_outputs
                                           or len(set(self.class_ids)) != len(self.class_ids)
                                           or min(self.class_ids, default=0) < 1):
            raise ModelConfigError(f"class_ids must be {self.num_outputs} distinct ids >= 1 (one per output), "
                                   f"got {self.class_ids}")


@dataclass(frozen=True)
class ModelSection:
    """The model settings of a training run (``TrainConfig.model``): which model and its shape;
    the feature sizes and the class set come from the store (:meth:`model_config`)."""

    kind: ModelKind = option("stage", flag="--model",
                             help="STAGE, or the no-graph baseline (actor features and geometry only) for ablations")
    num_heads: int = option(ModelConfig.num_heads, help="attention heads per layer")
    dropout: float = option(ModelConfig.dropout, help="dropout of the graph-attention layers")

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ConfigError(f"--num-heads must be >= 1, got {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")

    def model_config(self, actor_dim: int, object_dim: int, class_ids: Sequence[int]) -> ModelConfig:
        """The :class:`ModelConfig` of this model for data of these feature sizes and classes
        (AVA's: the published 81-output head)."""
        return ModelConfig(actor_dim=actor_dim, object_dim=object_dim, num_heads=self.num_heads, dropout=self.dropout,
                           **ModelConfig.head_for(class_ids))


def box_geometry(boxes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``h, w, xc, yc`` of ``x1, y1, x2, y2`` boxes, in that order, with the published arithmetic,
    computed in at least float32 and returned in ``dtype``."""
    boxes = boxes.to(torch.promote_types(boxes.dtype, dtype))
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    return torch.cat((torch.stack((h, w), dim=1), box_centres(boxes)), dim=1).to(dtype)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout``; on CPU through a uniform draw, about 2.5x faster than its ``bernoulli_``
    (which took 12 % of a training step here)."""
    if not training or p == 0.0 or x.device.type != "cpu":
        return F.dropout(x, p, training=training)
    keep = torch.empty_like(x).uniform_() >= p
    return x * keep * (1.0 / (1.0 - p))


def rows(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, block: int) -> torch.Tensor:
    """Apply a row-wise op (a Linear, a projection) to the rows of ``x``, ``block`` rows at a time.

    ``block`` 0: one call. Otherwise every call gets exactly ``block`` rows (a short tail is
    zero-padded), so a row's result does not depend on the rows beside it: batch-invariant
    inference (:meth:`stage_dist.data.batch.Padding.batch_invariant`, whose batches already hold a
    multiple of ``block`` rows) relies on it.
    """
    if not block or x.shape[0] == 0:
        return op(x)
    count = x.shape[0]
    full = count - count % block
    outputs = [op(part) for part in x[:full].split(block)]
    if full < count:
        tail = torch.cat((x[full:], x.new_zeros((block - (count - full), *x.shape[1:]))))
        outputs.append(op(tail)[: count - full])
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


class GraphAttentionHead(nn.Module):
    """Parameters of one head, named and shaped as the published ``GraphAttentionLayer``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_features, out_features))
        self.a = nn.Parameter(torch.empty(2 * out_features, 1))
        nn.init.xavier_uniform_(self.W, gain=1.414)
        nn.init.xavier_uniform_(self.a, gain=1.414)


class GraphAttention(nn.Module):
    """The published ``GAT``: input dropout, H heads (``attention_{i}``) fused in one pass."""

    def __init__(self, in_features: int, head_features: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_features = head_features
        self.dropout = dropout
        for i in range(num_heads):
            self.add_module(f"attention_{i}", GraphAttentionHead(in_features, head_features))

    def heads(self) -> list[GraphAttentionHead]:
        return [getattr(self, f"attention_{i}") for i in range(self.num_heads)]

    def forward(self, x: torch.Tensor, graph: Graph, weights: torch.Tensor, row_block: int = 0) -> torch.Tensor:
        """``x``: (N, in) nodes; ``weights``: the graph's edge weights (:meth:`Graph.weights`)."""
        heads = self.heads()
        x = dropout(x, self.dropout, self.training)
        weight = torch.cat([head.W for head in heads], dim=1)  # (in, H * F)
        h = rows(lambda part: part @ weight, x, row_block)
        h = h.view(-1, self.num_heads, self.head_features)  # (N, H, F)
        a = torch.stack([head.a.view(2, self.head_features) for head in heads])  # (H, 2, F)
        a = a.to(h.dtype)
        halves = rows(lambda part: torch.einsum("nhf,hkf->nhk", part, a), h, row_block)  # (N, H, 2)
        out = graph.attend(h, halves[..., 0], halves[..., 1], weights)
        out = F.elu(dropout(out, self.dropout, self.training))
        return out.reshape(-1, self.num_heads * self.head_features)


class _BatchModel(nn.Module):
    """``forward(batch)``: checks the batch's feature sizes, then :meth:`padded_logits` on its
    tensors, trimmed to the real actors. Subclasses set ``config`` and ``uses_objects``."""

    config: ModelConfig
    uses_objects: bool

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits ``(A, num_outputs)`` for the batch's actors, in batch order."""
        actor_cols, object_cols = batch.actor_features.shape[1], batch.object_features.shape[1]
        if actor_cols != self.config.actor_dim:
            raise ModelInputError(f"batch actor_features have {actor_cols} columns, the model expects "
                                  f"{self.config.actor_dim}")
        if self.uses_objects and object_cols != self.config.object_dim:
            raise ModelInputError(f"batch object_features have {object_cols} columns, the model expects "
                                  f"{self.config.object_dim}")
        logits = self.padded_logits(batch.actor_features, batch.actor_boxes, batch.object_features,
                                    batch.object_boxes, batch.graph, batch.row_block)
        return logits[: batch.num_actors]

    def padded_logits(self, actor_features: torch.Tensor, actor_boxes: torch.Tensor,
                      object_features: torch.Tensor, object_boxes: torch.Tensor, graph: Graph,
                      row_block: int = 0) -> torch.Tensor:
        raise NotImplementedError


class STAGE(_BatchModel):
    """Two graph-attention layers over actors and objects, then a linear classifier on actors.

    :meth:`forward` takes a :class:`Batch` (built by :func:`~stage_dist.data.batch.collate`, graph
    included) and returns the logits of its real actors. The work is in :meth:`padded_logits`,
    which sees only tensors of the batch's (possibly padded) shapes and reads nothing back from
    the device: :func:`compile_model` compiles it as one graph. A batch built with a
    batch-invariant :class:`~stage_dist.data.batch.Padding` (inference) has its row-wise ops run in
    fixed-size row blocks (:func:`rows`), so a keyframe's logits are bitwise independent of the
    other windows in its batch.
    """

    uses_objects = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        node, head = config.node_dim, config.head_dim
        if config.object_dim > config.actor_dim:
            self.obj_reducer = nn.Linear(config.object_dim, config.actor_dim)
        self.gat1 = GraphAttention(node, head, config.num_heads, config.dropout)
        self.gat_fc = nn.Linear(node, node)
        self.l_norm = nn.LayerNorm(node)
        self.gat2 = GraphAttention(node, head, config.num_heads, config.dropout)
        self.gat_fc2 = nn.Linear(node, node)
        self.l_norm2 = nn.LayerNorm(node)
        self.logits = nn.Linear(node, config.num_outputs)

    def padded_logits(self, actor_features: torch.Tensor, actor_boxes: torch.Tensor,
                      object_features: torch.Tensor, object_boxes: torch.Tensor, graph: Graph,
                      row_block: int = 0) -> torch.Tensor:
        """Logits of every actor row, padding rows included (shape-static, no host reads)."""
        dtype = self.logits.weight.dtype
        actors = torch.cat((actor_features.to(dtype), box_geometry(actor_boxes, dtype)), dim=1)
        objects = object_features.to(dtype)
        if self.config.object_dim > self.config.actor_dim:
            objects = rows(self.obj_reducer, objects, row_block)
            objects = F.relu(objects).to(dtype)  # residual stream stays in dtype
        objects = torch.cat((objects, box_geometry(object_boxes, dtype)), dim=1)
        x = torch.cat((actors, objects), dim=0)
        weights = graph.weights(torch.cat((actor_boxes, object_boxes)), self.config.tau)
        x = self.l_norm(x + rows(self.gat_fc, self.gat1(x, graph, weights, row_block), row_block))
        x = self.l_norm2(x + rows(self.gat_fc2, self.gat2(x, graph, weights, row_block), row_block))
        return rows(self.logits, x[: actors.shape[0]], row_block)


class NoGraphBaseline(_BatchModel):
    """Ablation: the classifier on actor feature + geometry, no objects and no graph.

    Same inputs and the same classifier as :class:`STAGE` (``dropout`` on the 1028-dim actor
    node, then ``logits``), so the two differ only by the graph-attention layers.
    """

    uses_objects = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.logits = nn.Linear(config.node_dim, config.num_outputs)

    def padded_logits(self, actor_features: torch.Tensor, actor_boxes: torch.Tensor,
                      object_features: torch.Tensor, object_boxes: torch.Tensor, graph: Graph,
                      row_block: int = 0) -> torch.Tensor:
        """As :meth:`STAGE.padded_logits` (objects and graph unused)."""
        dtype = self.logits.weight.dtype
        actors = torch.cat((actor_features.to(dtype), box_geometry(actor_boxes, dtype)), dim=1)
        actors = dropout(actors, self.config.dropout, self.training)
        return rows(self.logits, actors, row_block)


MODELS: dict[str, type[_BatchModel]] = {"stage": STAGE, "baseline": NoGraphBaseline}  # one per MODEL_KINDS
assert tuple(MODELS) == MODEL_KINDS


def build_model(kind: str, config: ModelConfig) -> nn.Module:
    """``kind``: one of :data:`MODEL_KINDS`, ``"stage"`` (the published model) or ``"baseline"`` (no graph)."""
    if kind not in MODELS:
        raise ModelConfigError(f"unknown model kind {kind!r}; choose from {sorted(MODELS)}")
    return MODELS[kind](config)


def action_logits(logits: torch.Tensor, class_ids: Sequence[int] | None = None) -> torch.Tensor:
    """The class columns of a model's logits: for AVA (``class_ids`` None, the published head)
    the columns of action ids 1..80 (drops the background column 0); for a model of another
    class set (``ModelConfig.class_ids``) all of them, column j = ``class_ids[j]``."""
    if class_ids is not None:
        if logits.shape[-1] != len(class_ids):
            raise ModelConfigError(f"action_logits expects {len(class_ids)} columns (one per class), got "
                                   f"{logits.shape[-1]}")
        return logits
    if logits.shape[-1] != 81:
        raise ModelConfigError(
            f"action_logits expects 81 columns (background + 80 actions), got {logits.shape[-1]}"
        )
    return logits[..., 1:]


# Recompilations allowed per compiled function (dynamo's default, 8, is close to what an
# epoch of bucketed shapes can need before its sizes turn symbolic).
COMPILE_RECOMPILE_LIMIT = 64


def compile_model(model: nn.Module, device: torch.device | str, *, backend: Any = None,
                  mode: str | None = None) -> nn.Module:
    """Compile ``model``'s shape-static core (:meth:`STAGE.padded_logits`) in place; returns it.

    The forward compiles as one graph (``fullgraph=True``: no ``.item()``, no data-dependent
    shape, no host read). Shapes: dynamo's default (static at first; a size seen to change is
    recompiled once as symbolic), so an epoch costs a few compilations. Feed it batches collated
    with ``Padding(bucketed=True)``: on CUDA, ``mode="reduce-overhead"`` records one CUDA graph
    per distinct input shape, and bucketing keeps those to a handful per run. The state dict,
    checkpoints and ``forward(batch)`` are unchanged.

    On CPU: Inductor (C++). With torch 2.13 it used to fail to build a kernel of the on-device
    graph construction (g++: "operands to '?:' have different types VecMask<long int, 2> and
    VecMask<float, 1>": the padded load of the bool slot-occupancy grid ``arange(P) < counts``
    fused with its int64 comparison); that construction now runs in numpy in the collate
    (:func:`stage_dist.data.graph.build_graph`), and the forward and backward build vectorised
    (float32 and bf16). ``backend``/``mode`` override the defaults (tests count compilations
    with a counting backend).
    """
    device = torch.device(device)
    if mode is None and backend is None and device.type == "cuda":
        mode = "reduce-overhead"
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    assert isinstance(model, _BatchModel), type(model)  # a model of build_model
    # the instance's compiled core shadows the class's method on purpose (mypy allows no method assignment)
    model.padded_logits = torch.compile(  # type: ignore[method-assign]
        model.padded_logits, fullgraph=True, backend=backend or "inductor", mode=mode)
    return model
