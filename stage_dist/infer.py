"""The inference command: every (keyframe, actor) of a store or shards predicted exactly once, one results.csv.

The library (windows, scoring, gathering, the exactly-once check, writing) is
:mod:`stage_dist.inference`; this module is its command line and loads the model. Rank 0
writes ``results.csv`` atomically.

    python -m stage_dist.infer --store val.zarr --checkpoint best.pt --out results.csv
    torchrun --nproc_per_node=8 -m stage_dist.infer --store val.zarr --checkpoint best.pt --out results.csv
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

from stage_dist.ava import AvaFormatError, read_labelmap
from stage_dist.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from stage_dist.data import open_window_source
from stage_dist.distributed import cleanup, configure_threads, init_distributed, setup_logging
from stage_dist.inference import INFERENCE_WINDOW, predict, write_predictions
from stage_dist.model import CheckpointError as ModelCheckpointError
from stage_dist.model import ModelConfig, ModelConfigError, build_model, load_published_state
from stage_dist.precision import AMP_MODES, resolve_precision
from stage_dist.shard_format import ShardError
from stage_dist.store import StoreError

log = logging.getLogger(__name__)

# Bad input a user can fix: reported as one line naming the file, not a traceback.
INPUT_ERRORS = (StoreError, ShardError, CheckpointError, ModelCheckpointError, ModelConfigError, AvaFormatError,
                FileNotFoundError, ValueError)


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
        source = open_window_source(store=args.store, shards=args.shards)
        model = load_model(args.checkpoint, source.actor_dim, source.object_dim, env.device)
        result = predict(model, source, env, window=args.window, windows_per_batch=args.windows_per_batch,
                         precision=precision, num_workers=args.workers)
        predictions, keyframes = (None, None) if result is None else (result.predictions, result.keyframes)
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
