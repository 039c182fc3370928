"""The model's part of a checkpoint: its weights, kind and configuration, in either accepted format.

A checkpoint of this project names its model with three keys, ``model_state`` (the weights),
``model_kind`` and ``model_config`` (the :class:`~stage_dist.model.stage.ModelConfig` as a dict). The
published STAGE code's ``{"model_state", "optimizer_state", "epoch", "iteration"}`` holds weights
only: its configuration is read from the tensors' shapes (:func:`published_model_config`).
:meth:`SavedModel.from_state` reads either into one typed result, :meth:`SavedModel.to_state`
writes this project's keys, and :meth:`SavedModel.build` gives the model with its weights, loaded
strictly (:func:`load_model_state`). The weight names this relies on are the model's, so they
live here, next to it; the file, the training state and the run's checkpoints are
:mod:`stage_dist.engine.checkpoint`'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from stage_dist.core.errors import CheckpointError
from stage_dist.model.stage import GEOMETRY_DIM, MODEL_KINDS, ModelConfig, ModelConfigError, build_model
from stage_dist.store.schema import describe_classes


@dataclass(frozen=True)
class SavedModel:
    """A model as a checkpoint holds it. ``published``: read from a published STAGE checkpoint
    (weights only, ``config`` read from their shapes)."""

    kind: str  # one of MODEL_KINDS
    config: ModelConfig
    state: dict[str, torch.Tensor]
    published: bool = False

    @classmethod
    def from_state(cls, state: Mapping[str, Any], path: Path | str) -> "SavedModel":
        """The model of a checkpoint's dict of either format; a :class:`CheckpointError` naming
        ``path`` if it holds no weights or a malformed description of them."""
        weights = state.get("model_state")
        if not isinstance(weights, dict):
            found = ", ".join(sorted(map(str, state))[:8]) or "nothing"
            raise CheckpointError(f"{path}: not a STAGE checkpoint: no 'model_state' dict of weights (found {found})")
        if "model_config" not in state:
            return cls("stage", published_model_config(weights, path), weights, published=True)
        kind = state.get("model_kind", "stage")
        if kind not in MODEL_KINDS:
            raise CheckpointError(f"{path}: unknown model_kind {kind!r} (expected one of {', '.join(MODEL_KINDS)})")
        try:
            config = ModelConfig(**state["model_config"])
        except TypeError as err:
            raise CheckpointError(f"{path}: malformed model_config: {err}") from None
        return cls(kind, config, weights)

    def to_state(self) -> dict[str, Any]:
        """This project's keys for the model (a published model is written as this project's)."""
        return {"model_state": self.state, "model_kind": self.kind, "model_config": asdict(self.config)}

    def build(self) -> nn.Module:
        """The model with these weights, loaded strictly (a missing, unexpected or mis-shaped key
        is a :class:`CheckpointError` naming the key)."""
        try:
            model = build_model(self.kind, self.config)
        except ModelConfigError as err:
            raise CheckpointError(f"unusable model configuration: {err}") from None
        load_model_state(model, self.state)
        return model

    def incompatible(self, other: "SavedModel") -> str | None:
        """What keeps the two models from scoring the same classes on the same features (an
        ensemble), or None."""
        a, b = self.config, other.config
        if a.classes != b.classes:
            return f"{describe_classes(b.classes)} vs {describe_classes(a.classes)}"
        if a.num_outputs != b.num_outputs:
            return f"{b.num_outputs} outputs (classes) vs {a.num_outputs}"
        if (a.actor_dim, a.object_dim) != (b.actor_dim, b.object_dim):
            return f"actor/object features of {b.actor_dim}/{b.object_dim} dims vs {a.actor_dim}/{a.object_dim}"
        return None


def published_model_config(weights: Mapping[str, Any], path: Path | str = "checkpoint") -> ModelConfig:
    """The :class:`ModelConfig` of published STAGE weights, read from the tensors: feature sizes
    from the first head's ``W`` and ``obj_reducer``, the head count from the heads present,
    the classes from ``logits``. Dropout and tau are the published 0.5 and 1."""
    first = weights.get("gat1.attention_0.W")
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        raise CheckpointError(f"{path}: not a STAGE model_state: no 2-D tensor gat1.attention_0.W")
    num_heads = 0
    while f"gat1.attention_{num_heads}.W" in weights:
        num_heads += 1
    actor_dim = int(first.shape[0]) - GEOMETRY_DIM
    reducer = weights.get("obj_reducer.weight")
    object_dim = int(reducer.shape[1]) if isinstance(reducer, torch.Tensor) and reducer.dim() == 2 else actor_dim
    logits = weights.get("logits.weight")
    num_outputs = int(logits.shape[0]) if isinstance(logits, torch.Tensor) and logits.dim() == 2 else 81
    # A missing or mis-shaped key is named by the strict load (SavedModel.build).
    return ModelConfig(actor_dim=actor_dim, object_dim=object_dim, num_heads=num_heads, num_outputs=num_outputs)


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Load ``state_dict`` into ``model`` strictly: any missing, unexpected or mis-shaped key
    raises :class:`CheckpointError` naming it."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    for key in sorted(set(expected) & set(state_dict)):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != expected[key].shape:
            problems.append(f"{key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}")
    if problems:
        raise CheckpointError("state dict does not match the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
