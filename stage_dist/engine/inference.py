"""The inference library: every actor of a split scored exactly once, on 1..N ranks.

:func:`predict` takes any :class:`~stage_dist.data.window_source.WindowSource` (a store or shards).
Each rank scores its share of the inference windows: a window reads its owned keyframes plus up
to :data:`RECEPTIVE_FIELD` keyframes of context on each side (the receptive field of two one-hop
layers) and keeps only the owned predictions, so a keyframe's scores depend neither on the
window size nor on the number of ranks. Rank 0 gathers the predictions and the keyframes they
belong to, checks that every actor was predicted exactly once, and gets them in store order.
Inference owns the batch-invariant mode (:meth:`~stage_dist.data.batch.Padding.batch_invariant`): it
is how :func:`predict` asks the source to collate, so results.csv is byte-identical for any
window size, batch size and number of ranks (same threads per rank).
Given several models (an ensemble), :func:`predict` runs every model on each batch as it is read
(one pass over the data) and averages their sigmoid scores per actor (summed in model order, then
divided by their number: still independent of windows, batches and ranks; one model's scores are
its own, bit for bit). :func:`write_predictions` writes them as an AVA results.csv. Used by
``stage_dist.infer`` (the command line) and by the trainer's validation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from stage_dist.ava.formats import write_results_csv
from stage_dist.core.progress import DEFAULT_EVERY_SECONDS, progress_bar
from stage_dist.data.batch import Padding
from stage_dist.data.window_source import InferenceBatch, WindowKeyframes, WindowSource
from stage_dist.engine.distributed import DistEnv, gather_to_main
from stage_dist.engine.precision import Precision, resolve_precision
from stage_dist.model.stage import ModelConfig, action_logits
from stage_dist.store.feature_store import FeatureStore
from stage_dist.store.schema import AVA_CLASS_IDS

RECEPTIVE_FIELD = 2  # keyframes on each side that reach a keyframe through two one-hop layers
# Keyframes predicted per window: each window also reads 2 x RECEPTIVE_FIELD context keyframes,
# so 24 costs 1.17x the keyframes it predicts (6 would cost 1.67x). Scores do not depend on it.
INFERENCE_WINDOW = 24
INFERENCE_WINDOWS_PER_BATCH = 32  # windows per forward pass, for validation and stage_dist.infer alike


@dataclass
class Predictions:
    """Scores of actors: ``scores[i]`` belongs to actor row ``actor_index[i]`` (global, sorted),
    which lies in keyframe row ``keyframe[i]`` and has box ``boxes[i]``."""

    actor_index: np.ndarray  # (N,) int64
    keyframe: np.ndarray  # (N,) int64
    boxes: np.ndarray  # (N, 4) float32, normalised x1, y1, x2, y2
    scores: np.ndarray  # (N, K) float32, column j = the model's class j (AVA: K = 80, action id j + 1)

    @classmethod
    def concatenate(cls, parts: Sequence["Predictions"]) -> "Predictions":
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def take(self, order: np.ndarray) -> "Predictions":
        return Predictions(*(getattr(self, f.name)[order] for f in fields(self)))


@dataclass
class KeyframeIndex:
    """Video id and timestamp of every keyframe row (what results.csv needs besides boxes)."""

    video_ids: np.ndarray  # (K,) object
    timestamps: np.ndarray  # (K,) int

    @classmethod
    def from_store(cls, store: FeatureStore) -> "KeyframeIndex":
        clips = np.repeat(np.arange(store.num_clips), store.clip_lengths)
        return cls(np.asarray(store.video_ids, dtype=object)[clips], np.asarray(store.timestamps))

    @classmethod
    def from_windows(cls, windows: Iterable[WindowKeyframes], num_keyframes: int) -> "KeyframeIndex":
        """From the keyframes of the windows read (overlaps agree)."""
        video_ids = np.empty(num_keyframes, dtype=object)
        timestamps = np.zeros(num_keyframes, dtype=np.int64)
        for start, video_id, stamps in windows:
            video_ids[start : start + len(stamps)] = video_id
            timestamps[start : start + len(stamps)] = stamps
        return cls(video_ids, timestamps)


@dataclass
class InferenceResult:
    """What :func:`predict` returns on rank 0: every actor's scores and the keyframe index."""

    predictions: Predictions
    keyframes: KeyframeIndex


def score_batches(
    model: nn.Module | Sequence[nn.Module],
    batches: Iterable[InferenceBatch],
    env: DistEnv,
    precision: Precision,
) -> tuple[Predictions, list[WindowKeyframes]]:
    """This rank's predictions for the owned actors of ``batches``, and the keyframes their
    windows read; several models (one class set, checked by the caller): the mean of their
    sigmoid scores (each batch is moved to the device once for all of them)."""
    models = [model] if isinstance(model, nn.Module) else list(model)
    was_training = [m.training for m in models]
    config = getattr(models[0], "config", None)
    classes = config.classes if isinstance(config, ModelConfig) else AVA_CLASS_IDS
    class_ids = config.class_ids if isinstance(config, ModelConfig) else None  # None: AVA's published head
    for m in models:
        m.eval()
    parts: list[Predictions] = []
    read: list[WindowKeyframes] = []
    try:
        with torch.inference_mode():
            for batch, owned, keyframes in batches:
                read.extend(keyframes)
                on_device = batch.to(env.device, non_blocking=True)
                total: torch.Tensor | None = None
                for m in models:
                    with precision.autocast():
                        logits = m(on_device)
                    scores = torch.sigmoid(action_logits(logits, class_ids).float())
                    total = scores if total is None else total + scores
                assert total is not None
                scores = (total if len(models) == 1 else total / len(models)).cpu()
                parts.append(Predictions(
                    actor_index=batch.actor_index[owned].numpy(),
                    keyframe=batch.actor_keyframe[owned].numpy(),
                    boxes=batch.actor_boxes[: batch.num_actors][owned].numpy(),
                    scores=scores[owned].numpy(),
                ))
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    if not parts:
        return Predictions(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32),
                           np.zeros((0, len(classes)), np.float32)), read
    return Predictions.concatenate(parts), read


def predict(
    model: nn.Module | Sequence[nn.Module],
    source: WindowSource,
    env: DistEnv,
    *,
    window: int = INFERENCE_WINDOW,
    windows_per_batch: int = INFERENCE_WINDOWS_PER_BATCH,
    precision: Precision | None = None,
    num_workers: int = 0,
    progress: bool = True,
    progress_every_seconds: float = DEFAULT_EVERY_SECONDS,
) -> InferenceResult | None:
    """Score every actor of ``source`` once across all ranks; the result on rank 0, None elsewhere.
    Several models: one pass over the data, the mean of their sigmoid scores (an ensemble)."""
    # The inference mode: every keyframe's scores are bitwise independent of its batch-mates.
    padding = Padding.batch_invariant(source.max_nodes_per_keyframe)
    batches = source.inference_batches(env.rank, env.world_size, window=window, context=RECEPTIVE_FIELD,
                                       windows_per_batch=windows_per_batch, padding=padding,
                                       num_workers=num_workers, pin_memory=env.device.type == "cuda")
    bar = progress_bar(batches, desc="infer", unit="batch", disable=not (progress and env.is_main), leave=False,
                       every_seconds=progress_every_seconds)
    local = score_batches(model, bar, env, precision or resolve_precision("off", env.device))
    gathered = gather_to_main(local, env)
    if gathered is None:
        return None
    predictions = merge_predictions([part for part, _ in gathered], source.num_actors)
    keyframes = KeyframeIndex.from_windows((w for _, windows in gathered for w in windows), source.num_keyframes)
    return InferenceResult(predictions, keyframes)


def merge_predictions(parts: list[Predictions], num_actors: int) -> Predictions:
    """The ranks' predictions in actor order; every actor exactly once or RuntimeError."""
    merged = Predictions.concatenate(parts)
    merged = merged.take(np.argsort(merged.actor_index, kind="stable"))
    if len(merged.actor_index) != num_actors or not np.array_equal(merged.actor_index, np.arange(num_actors)):
        counts = np.bincount(merged.actor_index, minlength=num_actors)
        raise RuntimeError(
            "inference must predict every actor exactly once: "
            f"{int((counts == 0).sum())} actors missing, {int((counts > 1).sum())} predicted twice"
        )
    return merged


def write_predictions(
    path: str | Path,
    predictions: Predictions,
    keyframes: KeyframeIndex,
    *,
    class_ids: set[int] | None = None,
    topk: int | None = None,
    min_score: float = 0.0,
    column_ids: Sequence[int] | None = None,
) -> int:
    """Write predictions as an AVA results.csv (atomically); returns the number of rows. Score
    column j is class id ``column_ids[j]`` (the store's class set; default AVA's ``j + 1``)."""
    return write_results_csv(
        path,
        keyframes.video_ids[predictions.keyframe],
        keyframes.timestamps[predictions.keyframe],
        predictions.boxes,
        predictions.scores,
        class_ids=class_ids,
        topk=topk,
        min_score=min_score,
        column_ids=column_ids,
    )


def non_finite_scores(predictions: Predictions, keyframes: KeyframeIndex) -> str | None:
    """``None`` if every score is finite, else a message naming the first video whose scores are NaN
    or infinite and its affected keyframes (a bad feature spreads to the keyframes within the
    model's receptive field)."""
    bad = ~np.isfinite(predictions.scores).all(axis=1)
    if not bad.any():
        return None
    rows = np.unique(predictions.keyframe[bad])
    video = keyframes.video_ids[rows[0]]
    rows = rows[keyframes.video_ids[rows] == video]
    first, last = int(rows[0]), int(rows[-1])
    return (f"{int(bad.sum())} of {len(bad)} actors have non-finite scores, first in video {video} keyframes "
            f"{int(keyframes.timestamps[first]):04d}-{int(keyframes.timestamps[last]):04d} (keyframe rows "
            f"{first}-{last}); check their features (and the checkpoint's weights) for NaN/Inf")
