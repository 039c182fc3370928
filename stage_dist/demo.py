"""The end-to-end demo behind ``make demo``: the whole pipeline on a small synthetic dataset.

Runs, as a user would, the real command lines: synthesize -> convert (and verify) both splits ->
train STAGE and the no-graph baseline with ``torchrun --nproc_per_node=2`` -> infer -> evaluate,
then prints the two val mAPs side by side and where every artefact is.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from stage_dist.core.cli import Command, Stop
from stage_dist.core.config import build_parser as build_config_parser, option, parse_config
from stage_dist.core.errors import EXIT_FAILED, EXIT_OK
from stage_dist.core.outputs import claim_output_dir

PY = sys.executable


def run(step: str, argv: list[str], env: dict[str, str] | None = None) -> None:
    print(f"\n== {step}\n$ {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    subprocess.run(argv, check=True, env=env)
    print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)


def torchrun(nproc: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


@dataclass(frozen=True)
class DemoConfig:
    """The flags of ``python -m stage_dist.demo``."""

    out: str = option("demo_out", help="working directory: new, empty, or an earlier demo's (emptied first)")
    nproc: int = option(2, help="torchrun processes for training and inference")
    epochs: int = option(40, help="training epochs for each model")
    seed: int = option(0, help="seed of the synthetic dataset and of training")
    class_ids: tuple[int, ...] | None = option(None, metavar="ID",
                                               help="run on a non-AVA class set: the synthetic data gets one class "
                                                    "per id (any distinct ids >= 1, at most 60) and the converter "
                                                    "its label map")


def _earlier_demo(directory: Path) -> bool:
    """A demo directory written before outputs were marked: exactly the demo's own folders."""
    return {p.name for p in directory.iterdir()} <= {"data", "stores", "runs"}


DEMO_COMMAND = Command(stops=(  # a step that failed printed its own error
    Stop(subprocess.CalledProcessError, lambda err: err.returncode if err.returncode > 0 else EXIT_FAILED,
         prefix="demo stopped: ", message=lambda err: f"{shlex.join(map(str, err.cmd))} exited with {err.returncode}"),
))


def main(argv: list[str] | None = None) -> int:
    args = parse_config(DemoConfig, argv, build_config_parser(DemoConfig, prog="python -m stage_dist.demo",
                                                             description=__doc__))
    started = time.perf_counter()
    return DEMO_COMMAND.run(lambda: _demo(args, started))


def _demo(args: DemoConfig, started: float) -> int:
    with claim_output_dir(args.out, "stage_dist demo", overwrite=True, recognise=_earlier_demo) as claimed:
        return _run_demo(args, claimed.path, started)


def _run_demo(args: DemoConfig, out: Path, started: float) -> int:
    data, stores, runs = out / "data", out / "stores", out / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 ranks on 2 cores: no oversubscription

    classes: list[str] = []
    if args.class_ids:
        classes = ["--num-classes", str(len(args.class_ids)), "--class-ids", *map(str, args.class_ids)]
    run("synthesize a small AVA-like dataset (both published layouts)",
        [PY, "-m", "stage_dist.synth", "--out", str(data), "--seed", str(args.seed),
         "--actor-dim", "128", "--object-dim", "256", *classes])
    for split in ("train", "val"):
        run(f"convert the {split} split (I3D layout) into a zarr store, and verify it",
            [PY, "tools/convert_features.py", "--actors-dir", str(data / split / "i3d" / "actors"),
             "--objects-file", str(data / split / "i3d" / "objects.h5"), "--split", split,
             "--out", str(stores / f"{split}.zarr"), "--overwrite", "--verify",
             *(["--labelmap", str(data / "labelmap.pbtxt")] if args.class_ids else [])])

    results = {}
    for model in ("stage", "baseline"):
        run_dir = runs / model
        run(f"train {model} with torchrun on {args.nproc} processes",
            torchrun(args.nproc) + [
                "-m", "stage_dist.train", "--model", model,
                "--train-store", str(stores / "train.zarr"), "--val-store", str(stores / "val.zarr"),
                "--val-groundtruth", str(data / "val" / "groundtruth.csv"),
                "--labelmap", str(data / "labelmap.pbtxt"), "--output-dir", str(run_dir),
                "--epochs", str(args.epochs), "--val-every", "0", "--lr", "1e-3", "--workers", "0",
                "--seed", str(args.seed), "--resume", "none", "--device", "cpu"], env=env)
        results_csv = run_dir / "results.csv"
        run(f"infer the val split with the {model} checkpoint on {args.nproc} processes",
            torchrun(args.nproc) + [
                "-m", "stage_dist.infer", "--store", str(stores / "val.zarr"),
                "--checkpoint", str(run_dir / "checkpoints"), "--out", str(results_csv),
                "--labelmap", str(data / "labelmap.pbtxt"), "--device", "cpu", "--workers", "0"], env=env)
        metrics_json = run_dir / "metrics.json"
        run(f"evaluate {model} (official AVA frame-mAP@0.5)",
            [PY, "-m", "stage_dist.evaluate", "-g", str(data / "val" / "groundtruth.csv"),
             "-d", str(results_csv), "-l", str(data / "labelmap.pbtxt"),
             "--json", str(metrics_json), "--plot", str(run_dir / "per_class_ap.png")])
        results[model] = json.loads(metrics_json.read_text())["PascalBoxes_Precision/mAP@0.5IOU"]

    print("\n== summary")
    print(f"{'model':<10} {'val frame-mAP@0.5':>18}")
    for model, value in results.items():
        print(f"{model:<10} {value:>18.4f}")
    print(f"STAGE - baseline: {results['stage'] - results['baseline']:+.4f}")
    for model in results:
        run_dir = runs / model
        print(f"{model}: checkpoints {run_dir / 'checkpoints'}, TensorBoard {run_dir / 'tensorboard'}, "
              f"results {run_dir / 'results.csv'}, per-class AP plot {run_dir / 'per_class_ap.png'}")
    print(f"TensorBoard: tensorboard --logdir {runs}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
