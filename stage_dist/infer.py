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
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stage_dist.ava import read_labelmap, write_results_csv
from stage_dist.checkpoint import CheckpointError, read_latest_or_file
from stage_dist.batch import NUM_ACTIONS, Batch, Window
from stage_dist.data import InferenceCollate, inference_loader
from stage_dist.distributed import DistEnv, cleanup, configure_threads, gather_to_main, init_distributed, setup_logging
from stage_dist.errors import INPUT_ERRORS, UserInputError
from stage_dist.model import action_logits
from stage_dist.precision import AMP_MODES, Precision, resolve_precision
from stage_dist.sampler import InferenceWindow, plan_inference_windows, shard_for_rank
from stage_dist.shards import (ShardError, cut_window, expand_urls, load_manifest, manifest_location,
                               read_clip_samples, shard_name)
from stage_dist.store import FeatureStore

log = logging.getLogger(__name__)

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
    was_training, was_invariant = model.training, model.batch_invariant
    model.eval()
    model.batch_invariant = True  # scores independent of batch-mates (see model.rowwise)
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
                    boxes=batch.actor_boxes[owned].numpy(),
                    scores=scores[owned].numpy(),
                ))
    finally:
        model.train(was_training)
        model.batch_invariant = was_invariant
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
    collate_windows = InferenceCollate(manifest["max_nodes_per_keyframe"])
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


def load_model(checkpoint: str | Path, actor_dim: int, object_dim: int, device: torch.device) -> nn.Module:
    """A model from a checkpoint of this project or of the published STAGE code, for data of
    ``actor_dim``/``object_dim`` features.

    ``checkpoint`` may be a file or a checkpoint directory of a run (its newest complete checkpoint).
    """
    found = read_latest_or_file(checkpoint)
    config = found.model_config
    if (config.actor_dim, config.object_dim) != (actor_dim, object_dim):
        raise CheckpointError(
            f"{found.path}: the model expects actor/object features of {config.actor_dim}/{config.object_dim} "
            f"dims, the data has {actor_dim}/{object_dim}"
        )
    return found.build_model().to(device)


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
    parser.add_argument("--amp", choices=AMP_MODES, default="auto", help="autocast dtype (auto: bf16 on GPUs that support it, off on CPU)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op CPU threads per rank (0: OMP_NUM_THREADS if set, else the rank's share of "
                             "the cores less one per loader worker)")
    return parser


class InferArgumentError(UserInputError):
    """A flag, label map or output path of the inference CLI that cannot work; found before any work."""


EXIT_NON_FINITE = 3  # as stage_dist.train: NaN/Inf numbers (2 is a bad input)


# -- output safety (a minimal form of the project's output rules; see stage_dist/outputs.py when merged) --


def _looks_like_results_csv(path: Path) -> bool:
    """An empty file, or text whose first line has the 8 columns of an AVA results row."""
    with open(path, "rb") as handle:
        head = handle.read(65536)
    if not head:
        return True
    try:
        first = head.decode("utf-8-sig").splitlines()[0]
    except (UnicodeDecodeError, IndexError):
        return False
    return first.count(",") == 7


def check_results_path(out: str | Path, inputs: Sequence[str | Path]) -> None:
    """Refuse, before any work, an ``--out`` that is (or lies inside) one of the run's ``inputs``
    (checkpoint, store, shards, label map), a directory, an existing file that is not a results
    CSV (a checkpoint, a user's file), or whose directory cannot be written."""
    target = Path(out)
    resolved = target.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if resolved == source_path or source_path in resolved.parents:
            raise InferArgumentError(f"{out}: --out would overwrite the input {source}; give another path")
    if target.is_dir():
        raise InferArgumentError(f"{out}: --out is a directory; give the path of a results .csv file")
    if target.exists() and not _looks_like_results_csv(target):
        raise InferArgumentError(f"{out}: exists and is not an AVA results CSV; refusing to replace it "
                                 "(remove it or give another --out)")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InferArgumentError(f"{out}: cannot create it: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InferArgumentError(f"{out}: cannot write there: {parent} is not writable")


def check_arguments(args: argparse.Namespace) -> dict[int, str] | None:
    """Every flag that can be checked without the data, before any process group or model; returns
    the label map (if given)."""
    for flag, value, low in (("--window", args.window, 1), ("--windows-per-batch", args.windows_per_batch, 1),
                             ("--workers", args.workers, 0), ("--threads", args.threads, 0)):
        if value < low:
            raise InferArgumentError(f"{flag} must be >= {low}, got {value}")
    if args.topk is not None and not 1 <= args.topk <= NUM_ACTIONS:
        raise InferArgumentError(f"--topk must be in 1..{NUM_ACTIONS} (actions per box), got {args.topk}")
    if not 0.0 <= args.min_score <= 1.0:
        raise InferArgumentError(f"--min-score must be in [0, 1] (scores are sigmoids), got {args.min_score}")
    labelmap = read_labelmap(args.labelmap) if args.labelmap else None
    if labelmap is not None:
        outside = sorted(i for i in labelmap if not 1 <= i <= NUM_ACTIONS)
        if outside:
            raise InferArgumentError(f"{args.labelmap}: action id(s) {', '.join(map(str, outside[:5]))} outside "
                                     f"1..{NUM_ACTIONS}, the actions the model predicts")
        if not labelmap:
            raise InferArgumentError(f"{args.labelmap}: the label map holds no classes; nothing would be written")
    inputs = [args.checkpoint, *([args.labelmap] if args.labelmap else [])]
    if args.store:
        inputs.append(args.store)
    else:
        local = [url for url in expand_urls(args.shards) if "://" not in url and not url.startswith("pipe:")]
        inputs += local + [manifest_location(url) for url in local[:1]]
    check_results_path(args.out, inputs)
    return labelmap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env: DistEnv | None = None
    try:
        labelmap = check_arguments(args)  # fail before the process group and the compute
        class_ids = set(labelmap) if labelmap else None
        env = init_distributed(args.device)
        setup_logging(env)
        configure_threads(args.threads, env, args.workers)
        started = time.perf_counter()
        precision = resolve_precision(args.amp, env.device)
        if args.store:
            store = FeatureStore.open(args.store)
            model = load_model(args.checkpoint, store.actor_dim, store.object_dim, env.device)
            predictions = predict(model, store, env, window=args.window, windows_per_batch=args.windows_per_batch,
                                  precision=precision, num_workers=args.workers)
            keyframes = None if predictions is None else KeyframeIndex.from_store(store)
        else:
            manifest = load_manifest(manifest_location(expand_urls(args.shards)[0]))
            model = load_model(args.checkpoint, manifest["actor_dim"], manifest["object_dim"], env.device)
            result = predict_shards(model, args.shards, env, window=args.window,
                                    windows_per_batch=args.windows_per_batch, precision=precision)
            predictions, keyframes = (None, None) if result is None else result
        if predictions is not None:
            problem = non_finite_scores(predictions, keyframes)
            if problem:
                print(f"error: {args.store or args.shards}: {problem}; {args.out} not written", file=sys.stderr)
                return EXIT_NON_FINITE
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
        if env is not None:
            cleanup(env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
