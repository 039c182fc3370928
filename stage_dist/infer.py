"""Distributed inference: every (keyframe, actor) of a store predicted exactly once, one results.csv.

Each rank takes a contiguous share of the inference windows. A window reads its owned keyframes
plus up to two keyframes of context on each side (the receptive field of two one-hop layers)
and keeps only the owned predictions, so a keyframe's scores depend neither on the window size
nor on the number of ranks. Rank 0 gathers the predictions, checks that every actor was
predicted exactly once, and writes ``results.csv`` atomically.

    python -m stage_dist.infer --store val.zarr --checkpoint best.pt --out results.csv
    torchrun --nproc_per_node=8 -m stage_dist.infer --store val.zarr --checkpoint best.pt --out results.csv
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stage_dist.ava import AvaFormatError, read_labelmap, write_results_csv
from stage_dist.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from stage_dist.batch import Batch, Padding, Window
from stage_dist.data import InferenceCollate, inference_loader, max_nodes_per_keyframe
from stage_dist.distributed import DistEnv, cleanup, configure_threads, gather_to_main, init_distributed, setup_logging
from stage_dist.model import CheckpointError as ModelCheckpointError
from stage_dist.model import (ModelConfig, ModelConfigError, action_logits, build_model, compile_model,
                              load_published_state)
from stage_dist.precision import AMP_MODES, Precision, resolve_precision
from stage_dist.sampler import InferenceWindow, plan_inference_windows, shard_for_rank
from stage_dist.shards import (ShardError, cut_window, expand_urls, load_manifest, manifest_location,
                               read_clip_samples, shard_name)
from stage_dist.store import FeatureStore, StoreError

log = logging.getLogger(__name__)

# Bad input a user can fix: reported as one line naming the file, not a traceback.
INPUT_ERRORS = (StoreError, ShardError, CheckpointError, ModelCheckpointError, ModelConfigError, AvaFormatError,
                FileNotFoundError, ValueError)

RECEPTIVE_FIELD = 2  # keyframes on each side that reach a keyframe through two one-hop layers
# Keyframes predicted per window: each window also reads 2 x RECEPTIVE_FIELD context keyframes,
# so 24 costs 1.17x the keyframes it predicts (6 would cost 1.67x). Scores do not depend on it.
INFERENCE_WINDOW = 24


@dataclass
class Predictions:
    """Scores of actors: ``scores[i]`` belongs to actor row ``actor_index[i]`` (global, sorted),
    which lies in keyframe row ``keyframe[i]`` and has box ``boxes[i]``."""

    actor_index: np.ndarray  # (N,) int64
    keyframe: np.ndarray  # (N,) int64
    boxes: np.ndarray  # (N, 4) float32, normalised x1, y1, x2, y2
    scores: np.ndarray  # (N, 80) float32, column j = action id j + 1

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


def score_batches(
    model: nn.Module,
    batches: Iterable[tuple[Batch, torch.Tensor]],
    env: DistEnv,
    precision: Precision,
) -> Predictions:
    """This rank's predictions for the owned actors of ``(batch, owned)`` pairs."""
    was_training = model.training
    model.eval()
    parts: list[Predictions] = []
    try:
        with torch.inference_mode():
            for batch, owned in batches:
                with precision.autocast():
                    logits = model(batch.to(env.device, non_blocking=True))
                scores = torch.sigmoid(action_logits(logits).float()).cpu()
                parts.append(Predictions(
                    actor_index=batch.actor_index[owned].numpy(),
                    keyframe=batch.actor_keyframe[owned].numpy(),
                    boxes=batch.actor_boxes[: batch.num_actors][owned].numpy(),
                    scores=scores[owned].numpy(),
                ))
    finally:
        model.train(was_training)
    if not parts:
        return Predictions(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32),
                           np.zeros((0, 80), np.float32))
    return Predictions.concatenate(parts)


def predict(
    model: nn.Module,
    store: FeatureStore,
    env: DistEnv,
    *,
    window: int = INFERENCE_WINDOW,
    windows_per_batch: int = 8,
    precision: Precision | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> Predictions | None:
    """Score every actor of ``store`` once across all ranks; the result on rank 0, None elsewhere."""
    plans = plan_inference_windows(store.clip_lengths, window, context=RECEPTIVE_FIELD)
    mine = shard_for_rank(plans, env.rank, env.world_size)
    loader = inference_loader(
        store,
        mine,
        windows_per_batch=windows_per_batch,
        num_workers=num_workers,
        pin_memory=env.device.type == "cuda",
        padding=Padding.batch_invariant(max_nodes_per_keyframe(store)),
    )
    bar = tqdm(loader, desc="infer", unit="batch", disable=not (progress and env.is_main), leave=False)
    local = score_batches(model, bar, env, precision or resolve_precision("off", env.device))
    gathered = gather_to_main(local, env)
    return None if gathered is None else _merge(gathered, store.num_actors)


def predict_shards(
    model: nn.Module,
    urls: str,
    env: DistEnv,
    *,
    window: int = INFERENCE_WINDOW,
    windows_per_batch: int = 8,
    precision: Precision | None = None,
    progress: bool = True,
) -> tuple[Predictions, KeyframeIndex] | None:
    """Like :func:`predict`, streaming WebDataset shards (each rank reads its own shards)."""
    shard_urls = expand_urls(urls)
    manifest = load_manifest(manifest_location(shard_urls[0]))
    given = {shard_name(url) for url in shard_urls}
    missing = [shard["name"] for shard in manifest["shards"] if shard["name"] not in given]
    if missing:
        raise ShardError(f"inference must read every shard of the split; not given: {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    collate_windows = InferenceCollate(Padding.batch_invariant(manifest["max_nodes_per_keyframe"]))
    local_keyframes: list[tuple[int, str, np.ndarray]] = []  # (first keyframe row, video id, timestamps)

    def batches() -> Iterator[tuple[Batch, torch.Tensor]]:
        pending: list[tuple[Window, InferenceWindow]] = []
        for clip in read_clip_samples(shard_urls, rank=env.rank, world_size=env.world_size):
            local_keyframes.append((clip.keyframe_start, clip.video_id, clip.timestamps))
            for plan in plan_inference_windows([clip.num_keyframes], window, context=RECEPTIVE_FIELD):
                pending.append((cut_window(clip, plan.spec.start, plan.spec.length), plan))
                if len(pending) == windows_per_batch:
                    yield collate_windows(pending)
                    pending = []
        if pending:
            yield collate_windows(pending)

    bar = tqdm(batches(), desc="infer", unit="batch", disable=not (progress and env.is_main), leave=False)
    local = score_batches(model, bar, env, precision or resolve_precision("off", env.device))
    gathered = gather_to_main((local, local_keyframes), env)
    if gathered is None:
        return None
    predictions = _merge([part for part, _ in gathered], manifest["num_actors"])
    video_ids = np.empty(manifest["num_keyframes"], dtype=object)
    timestamps = np.zeros(manifest["num_keyframes"], dtype=np.int64)
    for _, keyframes in gathered:
        for start, video_id, stamps in keyframes:
            video_ids[start : start + len(stamps)] = video_id
            timestamps[start : start + len(stamps)] = stamps
    return predictions, KeyframeIndex(video_ids, timestamps)


def _merge(parts: list[Predictions], num_actors: int) -> Predictions:
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
) -> int:
    """Write predictions as an AVA results.csv (atomically); returns the number of rows."""
    return write_results_csv(
        path,
        keyframes.video_ids[predictions.keyframe],
        keyframes.timestamps[predictions.keyframe],
        predictions.boxes,
        predictions.scores,
        class_ids=class_ids,
        topk=topk,
        min_score=min_score,
    )


def load_model(checkpoint: str | Path, actor_dim: int, object_dim: int, device: torch.device) -> nn.Module:
    """A model from a checkpoint of this project or of the published STAGE code.

    ``checkpoint`` may be a file or a checkpoint directory of a run (its newest complete checkpoint).
    """
    if Path(checkpoint).is_dir():
        found = CheckpointManager(checkpoint).load_latest()
        if found is None:
            raise ValueError(f"{checkpoint}: no complete checkpoint in this directory")
        state, checkpoint = found
    else:
        state = load_checkpoint(checkpoint)
    if "model_state" not in state:
        raise ValueError(f"{checkpoint}: no 'model_state' entry; not a STAGE checkpoint")
    if "model_config" in state:
        kind = state.get("model_kind", "stage")
        config = ModelConfig(**state["model_config"])
    else:  # published checkpoint: only the state dict; dims from the store, heads from the keys
        kind = "stage"
        weights = state["model_state"]
        num_heads = sum(1 for key in weights if key.startswith("gat1.attention_") and key.endswith(".W"))
        config = ModelConfig(
            actor_dim=actor_dim,
            object_dim=object_dim,
            num_heads=num_heads,
            num_outputs=weights["logits.weight"].shape[0] if "logits.weight" in weights else 81,
        )  # a missing key is then named by the strict load below
    if (config.actor_dim, config.object_dim) != (actor_dim, object_dim):
        raise ValueError(
            f"{checkpoint}: the model expects actor/object features of {config.actor_dim}/{config.object_dim} "
            f"dims, the data has {actor_dim}/{object_dim}"
        )
    model = build_model(kind, config)
    load_published_state(model, state["model_state"])  # strict; names missing or unexpected keys
    return model.to(device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stage_dist.infer",
        description="Predict every actor of a feature store once (1..N ranks) and write one AVA results.csv.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", help="feature store (zarr) to predict")
    source.add_argument("--shards", help="WebDataset shards to predict instead of a store: a brace pattern such as "
                        "'DIR/val-{000000..000007}.tar' (manifest.json beside them)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file of stage_dist.train or of the published STAGE code, or a run's checkpoints/ directory (its newest)")
    parser.add_argument("--out", required=True, help="results.csv to write (atomically)")
    parser.add_argument("--window", type=int, default=INFERENCE_WINDOW,
                        help="keyframes predicted per window (2 keyframes of context on each side are added); "
                             "the scores do not depend on it")
    parser.add_argument("--windows-per-batch", type=int, default=32, help="windows per forward pass")
    parser.add_argument("--labelmap", help="pbtxt label map: write only its classes")
    parser.add_argument("--topk", type=int, help="write only the K best actions per box")
    parser.add_argument("--min-score", type=float, default=0.0, help="write only scores >= this")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (model.compile_model)")
    parser.add_argument("--amp", choices=AMP_MODES, default="auto", help="autocast dtype (auto: bf16 on GPUs that support it, off on CPU)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op CPU threads per rank (0: OMP_NUM_THREADS if set, else the rank's share of "
                             "the cores less one per loader worker)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = init_distributed(args.device)
    setup_logging(env)
    configure_threads(args.threads, env, args.workers)
    try:
        started = time.perf_counter()
        class_ids = set(read_labelmap(args.labelmap)) if args.labelmap else None  # fail before the compute
        precision = resolve_precision(args.amp, env.device)
        if args.store:
            store = FeatureStore.open(args.store)
            model = load_model(args.checkpoint, store.actor_dim, store.object_dim, env.device)
            if args.compile:
                compile_model(model, env.device)
            predictions = predict(model, store, env, window=args.window, windows_per_batch=args.windows_per_batch,
                                  precision=precision, num_workers=args.workers)
            keyframes = None if predictions is None else KeyframeIndex.from_store(store)
        else:
            manifest = load_manifest(manifest_location(expand_urls(args.shards)[0]))
            model = load_model(args.checkpoint, manifest["actor_dim"], manifest["object_dim"], env.device)
            if args.compile:
                compile_model(model, env.device)
            result = predict_shards(model, args.shards, env, window=args.window,
                                    windows_per_batch=args.windows_per_batch, precision=precision)
            predictions, keyframes = (None, None) if result is None else result
        if predictions is not None:
            rows = write_predictions(args.out, predictions, keyframes, class_ids=class_ids, topk=args.topk,
                                     min_score=args.min_score)
            seconds = time.perf_counter() - started
            num_keyframes = len(keyframes.timestamps)
            print(
                f"inference: {num_keyframes} keyframes, {len(predictions.actor_index)} actors, {rows} rows "
                f"-> {args.out} in {seconds:.1f} s ({num_keyframes / seconds:.0f} keyframes/s, "
                f"{env.world_size} rank(s))"
            )
    except INPUT_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        cleanup(env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
