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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stage_dist.ava import read_labelmap, write_results_csv
from stage_dist.checkpoint import CheckpointManager, load_checkpoint
from stage_dist.data import inference_loader
from stage_dist.distributed import DistEnv, cleanup, gather_to_main, init_distributed, setup_logging
from stage_dist.model import ModelConfig, action_logits, build_model, load_published_state
from stage_dist.precision import AMP_MODES, Precision, resolve_precision
from stage_dist.sampler import plan_inference_windows, shard_for_rank
from stage_dist.store import FeatureStore

log = logging.getLogger(__name__)

RECEPTIVE_FIELD = 2  # keyframes on each side that reach a keyframe through two one-hop layers


@dataclass
class Predictions:
    """Scores of actor rows of a store: ``scores[i]`` belongs to actor row ``actor_index[i]``."""

    actor_index: np.ndarray  # (N,) int64, sorted
    scores: np.ndarray  # (N, 80) float32, column j = action id j + 1


def predict(
    model: nn.Module,
    store: FeatureStore,
    env: DistEnv,
    *,
    window: int = 6,
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
    precision = precision or resolve_precision("off", env.device)
    was_training, was_invariant = model.training, model.batch_invariant
    model.eval()
    model.batch_invariant = True  # scores independent of batch-mates (see model.rowwise)
    indices: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    bar = tqdm(loader, desc="infer", unit="batch", disable=not (progress and env.is_main), leave=False)
    with torch.inference_mode():
        for batch, owned in bar:
            with precision.autocast():
                logits = model(batch.to(env.device, non_blocking=True))
            probabilities = torch.sigmoid(action_logits(logits).float()).cpu()
            indices.append(batch.actor_index[owned])
            scores.append(probabilities[owned])
    model.train(was_training)
    model.batch_invariant = was_invariant

    local = Predictions(
        actor_index=torch.cat(indices).numpy() if indices else np.zeros(0, np.int64),
        scores=torch.cat(scores).numpy() if scores else np.zeros((0, 80), np.float32),
    )
    gathered = gather_to_main(local, env)
    if gathered is None:
        return None
    return _merge(gathered, store.num_actors)


def _merge(parts: list[Predictions], num_actors: int) -> Predictions:
    actor_index = np.concatenate([p.actor_index for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    order = np.argsort(actor_index, kind="stable")
    actor_index, scores = actor_index[order], scores[order]
    if len(actor_index) != num_actors or not np.array_equal(actor_index, np.arange(num_actors)):
        counts = np.bincount(actor_index, minlength=num_actors)
        raise RuntimeError(
            "inference must predict every actor exactly once: "
            f"{int((counts == 0).sum())} actors missing, {int((counts > 1).sum())} predicted twice"
        )
    return Predictions(actor_index=actor_index, scores=scores)


def write_predictions(
    path: str | Path,
    store: FeatureStore,
    predictions: Predictions,
    *,
    class_ids: set[int] | None = None,
    topk: int | None = None,
    min_score: float = 0.0,
) -> int:
    """Write predictions of ``store`` as an AVA results.csv; returns the number of rows."""
    keyframe_of_actor = np.repeat(np.arange(store.num_keyframes), np.diff(store.actor_ptr))
    keyframes = keyframe_of_actor[predictions.actor_index]
    clips = np.searchsorted(store.clip_ptr, keyframes, side="right") - 1
    video_ids = np.asarray(store.video_ids, dtype=object)[clips]
    return write_results_csv(
        path,
        video_ids,
        store.timestamps[keyframes],
        store.actor_boxes_all()[predictions.actor_index],
        predictions.scores,
        class_ids=class_ids,
        topk=topk,
        min_score=min_score,
    )


def load_model(checkpoint: str | Path, store: FeatureStore, device: torch.device) -> nn.Module:
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
            actor_dim=store.actor_dim,
            object_dim=store.object_dim,
            num_heads=num_heads,
            num_outputs=weights["logits.weight"].shape[0],
        )
    if config.actor_dim != store.actor_dim or config.object_dim != store.object_dim:
        raise ValueError(
            f"{checkpoint}: model expects actor/object dims {config.actor_dim}/{config.object_dim}, "
            f"store {store.path} has {store.actor_dim}/{store.object_dim}"
        )
    model = build_model(kind, config)
    if kind == "stage":
        load_published_state(model, state["model_state"])
    else:
        model.load_state_dict(state["model_state"])
    return model.to(device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stage_dist.infer",
        description="Predict every actor of a feature store once (1..N ranks) and write one AVA results.csv.",
    )
    parser.add_argument("--store", required=True, help="feature store (zarr) to predict")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file of stage_dist.train or of the published STAGE code, or a run's checkpoints/ directory (its newest)")
    parser.add_argument("--out", required=True, help="results.csv to write (atomically)")
    parser.add_argument("--window", type=int, default=6, help="keyframes predicted per window (context of 2 on each side is added)")
    parser.add_argument("--windows-per-batch", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--labelmap", help="pbtxt label map: write only its classes")
    parser.add_argument("--topk", type=int, help="write only the K best actions per box")
    parser.add_argument("--min-score", type=float, default=0.0, help="write only scores >= this")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--amp", choices=AMP_MODES, default="auto", help="autocast dtype (auto: bf16 on GPUs that support it, off on CPU)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = init_distributed(args.device)
    setup_logging(env)
    try:
        started = time.perf_counter()
        store = FeatureStore.open(args.store)
        model = load_model(args.checkpoint, store, env.device)
        predictions = predict(
            model,
            store,
            env,
            window=args.window,
            windows_per_batch=args.windows_per_batch,
            precision=resolve_precision(args.amp, env.device),
            num_workers=args.workers,
        )
        if predictions is not None:
            class_ids = set(read_labelmap(args.labelmap)) if args.labelmap else None
            rows = write_predictions(
                args.out, store, predictions, class_ids=class_ids, topk=args.topk, min_score=args.min_score
            )
            seconds = time.perf_counter() - started
            print(
                f"inference: {store.num_keyframes} keyframes, {store.num_actors} actors, {rows} rows "
                f"-> {args.out} in {seconds:.1f} s ({store.num_keyframes / seconds:.0f} keyframes/s, "
                f"{env.world_size} rank(s))"
            )
    finally:
        cleanup(env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
