"""Inference throughput on a synthetic store (issue 5, part 5).

Writes a float16 store of ``--clips`` x ``--keyframes-per-clip`` keyframes with exactly
``--actors`` actors and ``--objects`` objects per keyframe at the published dims (1024/2048;
the writer of ``bench/train_bench.py``), builds STAGE with random weights, and measures in one
process on ``--device``:

1. :func:`stage_dist.engine.inference.predict` keyframes/s (windows of ``--window`` owned keyframes plus 2
   of context on each side, every actor predicted once) for each ``--windows-per-batch`` x
   ``--workers``; each run opens the store afresh (empty chunk cache, warm page cache).
2. The results.csv writing time (:func:`stage_dist.engine.inference.write_predictions`, all 80 actions per
   box) measured separately, and end-to-end keyframes/s (predict + CSV).
3. The cost of batch invariance (:meth:`stage_dist.data.batch.Padding.batch_invariant`, what
   ``predict`` collates with: slots pinned to the split's most nodes per keyframe, actor and
   object rows padded to multiples of 128 and every row-wise matmul run in 128-row blocks, group
   counts to multiples of 32) against exact shapes (``Padding()``, what training uses), on the
   same windows: keyframes/s of read + collate + model and of the model alone on pre-collated
   batches, and the largest score difference. Measured on the bench store and on a second store
   of keyframes of uneven size (``--uneven-actors``/``--uneven-objects``, uniform per keyframe):
   pinned slots cost the most when most keyframes are far smaller than the fullest one.

Target (2-core CPU): >= 500 keyframes/s; the published ``test.py`` does ~115 here.

    .venv/bin/python -m bench.infer_bench
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.train_bench import StoreSpec, write_store
from stage_dist.data.batch import Padding
from stage_dist.data.sampler import plan_inference_windows
from stage_dist.data.store_windows import StoreWindowSource, inference_loader
from stage_dist.engine.distributed import DistEnv, configure_threads
from stage_dist.engine.inference import (
    INFERENCE_WINDOW,
    RECEPTIVE_FIELD,
    KeyframeIndex,
    Predictions,
    predict,
    write_predictions,
)
from stage_dist.model.stage import STAGE, ModelConfig, action_logits
from stage_dist.store.feature_store import FeatureStore

TARGET_KF_S = 500.0
PUBLISHED_TEST_KF_S = 115.0  # the published test.py on this 2-core CPU (issue 5)


def time_predict(model: STAGE, store_path: Path, env: DistEnv, window: int,
                 windows_per_batch: int, workers: int) -> tuple[float, Predictions]:
    """Seconds of one ``predict`` over the whole store (fresh store object) and its result."""
    store = FeatureStore.open(store_path)
    configure_threads(0, env, workers)  # as `python -m stage_dist.infer` does
    started = time.perf_counter()
    result = predict(model, StoreWindowSource(store), env, window=window, windows_per_batch=windows_per_batch,
                     num_workers=workers, progress=False)
    seconds = time.perf_counter() - started
    assert result is not None  # one process: it is rank 0, which gets the predictions
    return seconds, result.predictions


def time_invariance(model: STAGE, store: FeatureStore, window: int, windows_per_batch: int,
                    device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds per pass over the store's inference windows with exact shapes ("off") and
    batch-invariant ones ("on"): read + collate + model (``*_full``) and the model alone on
    pre-collated batches; and the largest absolute sigmoid-score difference between the two.
    The two modes alternate within every repeat (the fastest pass of each is kept), so a load
    change on a shared machine hits both alike."""
    plans = plan_inference_windows(store.clip_lengths, window, context=RECEPTIVE_FIELD)
    paddings = {"off": Padding(), "on": Padding.batch_invariant(StoreWindowSource(store).max_nodes_per_keyframe)}
    loaders = {name: inference_loader(store, plans, windows_per_batch=windows_per_batch, num_workers=0,
                                      pin_memory=False, padding=padding) for name, padding in paddings.items()}
    seconds = {key: float("inf") for name in paddings for key in (name, f"{name}_full")}
    model.eval()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        batches = {name: [batch.to(device) for batch, *_ in loader] for name, loader in loaders.items()}
        scores = {name: [torch.sigmoid(action_logits(model(b)).float()) for b in batches[name]]  # warm-up
                  for name in paddings}
        for _ in range(repeats):
            for name in paddings:
                started = time.perf_counter()
                for b in batches[name]:
                    model(b)
                synchronize()
                seconds[name] = min(seconds[name], time.perf_counter() - started)
                started = time.perf_counter()
                for batch, *_ in loaders[name]:
                    model(batch.to(device))
                synchronize()
                seconds[f"{name}_full"] = min(seconds[f"{name}_full"], time.perf_counter() - started)
    diff = max((a - b).abs().max().item() for a, b in zip(scores["off"], scores["on"]))
    return {**seconds, "max_score_diff": diff}


def print_invariance(model: STAGE, store: FeatureStore, args: argparse.Namespace, device: torch.device,
                     title: str) -> None:
    counts = np.diff(store.actor_ptr) + np.diff(store.object_ptr)
    print(f"\nbatch invariance on {title}: nodes per keyframe mean {counts.mean():.1f}, max {counts.max()} "
          f"(best of {args.repeats}; 'full' = read + collate + model, workers 0)")
    print(f"{'windows/batch':>13} {'off kf/s':>9} {'on kf/s':>9} {'cost':>6} {'off full':>9} {'on full':>9} "
          f"{'cost':>6} {'max |score diff|':>17}")
    keyframes = store.num_keyframes
    for windows_per_batch in args.windows_per_batch:
        r = time_invariance(model, store, args.window, windows_per_batch, device, args.repeats)
        print(f"{windows_per_batch:>13} {keyframes / r['off']:>9.1f} {keyframes / r['on']:>9.1f} "
              f"{r['on'] / r['off'] - 1:>+6.0%} {keyframes / r['off_full']:>9.1f} {keyframes / r['on_full']:>9.1f} "
              f"{r['on_full'] / r['off_full'] - 1:>+6.0%} {r['max_score_diff']:>17.2e}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clips", type=int, default=20, help="clips in the synthetic store")
    parser.add_argument("--keyframes-per-clip", type=int, default=60, help="keyframes per clip")
    parser.add_argument("--actors", type=int, default=2, help="actors in every keyframe")
    parser.add_argument("--objects", type=int, default=8, help="objects in every keyframe")
    parser.add_argument("--window", type=int, default=INFERENCE_WINDOW, help="owned keyframes per inference window")
    parser.add_argument("--windows-per-batch", type=int, nargs="+", default=[8, 32],
                        help="windows per forward pass to measure")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader worker counts to measure")
    parser.add_argument("--uneven-actors", type=int, nargs=2, default=(1, 6), metavar=("MIN", "MAX"),
                        help="actors per keyframe of the uneven store (uniform, inclusive)")
    parser.add_argument("--uneven-objects", type=int, nargs=2, default=(0, 25), metavar=("MIN", "MAX"),
                        help="objects per keyframe of the uneven store (uniform, inclusive)")
    parser.add_argument("--invariance-only", action="store_true",
                        help="measure only the cost of batch invariance (part 3)")
    parser.add_argument("--repeats", type=int, default=4,
                        help="passes per batch-invariance timing (the fastest is kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and weights")
    parser.add_argument("--tmp-dir", help="where to write the temporary store (default: system temp)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    spec = StoreSpec(clips=args.clips, keyframes_per_clip=args.keyframes_per_clip,
                     actors=args.actors, objects=args.objects, seed=args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"device {device}; load average {os.getloadavg()[0]:.2f}")
    print(f"store: {spec.clips} clips x {spec.keyframes_per_clip} keyframes, {spec.actors} actors "
          f"({spec.actor_dim}) + {spec.objects} objects ({spec.object_dim}) per keyframe, "
          f"{spec.dtype}; window {args.window} + {RECEPTIVE_FIELD} context each side")
    root = Path(tempfile.mkdtemp(prefix="infer_bench_", dir=args.tmp_dir))
    try:
        store_path = root / "val.zarr"
        store = write_store(store_path, spec, split="val")
        torch.manual_seed(args.seed)
        model = STAGE(ModelConfig(actor_dim=spec.actor_dim, object_dim=spec.object_dim)).to(device)
        keyframes = store.num_keyframes

        if not args.invariance_only:
            rows: list[tuple[int, int, float]] = []
            predictions = None
            time_predict(model, store_path, env, args.window, args.windows_per_batch[0], 0)  # warm-up
            for windows_per_batch in args.windows_per_batch:
                for workers in args.workers:
                    seconds, predictions = time_predict(model, store_path, env, args.window,
                                                        windows_per_batch, workers)
                    rows.append((windows_per_batch, workers, seconds))

            assert predictions is not None, "--windows-per-batch and --workers need a value each"
            csv_path = root / "results.csv"
            started = time.perf_counter()
            csv_rows = write_predictions(csv_path, predictions, KeyframeIndex.from_store(store))
            csv_seconds = time.perf_counter() - started

            print(f"\npredict (model + data, batch-invariant on), {keyframes} keyframes, "
                  f"{store.num_actors} actors")
            print(f"{'windows/batch':>13} {'workers':>7} {'seconds':>8} {'keyframes/s':>12} "
                  f"{'+ CSV kf/s':>11} {'vs published':>13}  target >= {TARGET_KF_S:.0f}")
            for windows_per_batch, workers, seconds in rows:
                rate = keyframes / seconds
                end_to_end = keyframes / (seconds + csv_seconds)
                print(f"{windows_per_batch:>13} {workers:>7} {seconds:>8.2f} {rate:>12.1f} "
                      f"{end_to_end:>11.1f} {rate / PUBLISHED_TEST_KF_S:>12.1f}x  "
                      f"{'PASS' if rate >= TARGET_KF_S else 'MISS'} ({rate / TARGET_KF_S:.2f}x)")
            print(f"\nresults.csv: {csv_rows} rows ({csv_path.stat().st_size / 1e6:.1f} MB) written in "
                  f"{csv_seconds:.2f} s ({keyframes / csv_seconds:.0f} keyframes/s, "
                  f"{csv_rows / csv_seconds / 1e6:.2f} M rows/s)")

        print_invariance(model, store, args, device,
                         f"the bench store ({spec.actors} actors + {spec.objects} objects per keyframe)")
        uneven = write_store(root / "uneven.zarr", spec, "val",
                             uneven=(tuple(args.uneven_actors), tuple(args.uneven_objects)))
        print_invariance(model, uneven, args, device,
                         f"keyframes of uneven size ({args.uneven_actors[0]}-{args.uneven_actors[1]} actors, "
                         f"{args.uneven_objects[0]}-{args.uneven_objects[1]} objects)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
