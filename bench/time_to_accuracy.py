"""Time to accuracy at larger effective batches: which LR rule and warmup recover the recipe (issue 17).

A synthetic AVA-like dataset (:mod:`stage_dist.synth`: direct, object and interaction classes, the
last two visible only through the graph) is written and converted once into ``--cache-dir`` and
reused by later runs. Every run is :class:`stage_dist.engine.trainer.Trainer` in-process, world size 1, with
``windows_per_step = B`` (one rank with B windows per step is the effective batch of B ranks with one
window each: ``--check-ranks`` shows where the updates are the same), validated every epoch
(frame-mAP@0.5 on the val split).

1. The recipe: B = 1, ``--lr-scaling none``, no warmup, ``--recipe-epochs`` epochs, every seed. Its
   band is ``mean - std`` (over seeds) of its final val mAP.
2. Every other (B, rule, warmup) for every seed, for up to ``--max-factor`` x the recipe's keyframes;
   a run stops at the first epoch whose val mAP reaches the band (``--no-early-stop``: never).
   Warmup ``on`` is a linear ramp over ``--warmup-keyframes`` keyframes, i.e.
   ``ceil(warmup_keyframes / (6 x B))`` steps, so it lasts the same share of the data at every B.

Results (every run's per-epoch val mAP, keyframes, wall seconds) go to ``--json`` after every run
(a rerun with the same ``--json`` skips the runs it holds) and a markdown summary to ``--markdown``:
per configuration the val mAP mean +- std per epoch and the fewest keyframes at which every seed
(and the mean) reached the band. ``--per-step`` times training steps alone (no validation) at every
B, for the README's wall-time columns. Wall times on a shared machine are indicative only.

    OMP_NUM_THREADS=1 python -m bench.time_to_accuracy --jobs 2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]

WINDOW = 6
RULES = ("none", "sqrt", "linear")


@dataclass(frozen=True)
class RunSpec:
    batch: int
    rule: str
    warmup: bool
    seed: int
    optimizer: str = "adam"

    @property
    def key(self) -> str:
        opt = "" if self.optimizer == "adam" else f" {self.optimizer}"
        return f"B{self.batch} {self.rule} warmup={'on' if self.warmup else 'off'}{opt} seed{self.seed}"

    @property
    def group(self) -> str:
        return self.key.rsplit(" seed", 1)[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "stage_dist_tta",
                   help="synthetic dataset and converted stores (reused when present); run dirs go below it")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "time_to_accuracy.json",
                   help="all results (read back first: runs already there are skipped)")
    p.add_argument("--markdown", type=Path, default=REPO / "bench" / "results" / "time_to_accuracy.md",
                   help="summary table")
    p.add_argument("--train-clips", type=int, default=160, help="synthetic train clips")
    p.add_argument("--val-clips", type=int, default=24, help="synthetic val clips")
    p.add_argument("--keyframes-per-clip", type=int, default=30, help="keyframes per clip")
    p.add_argument("--num-classes", type=int, default=24, help="action classes (direct/object/interaction in turn)")
    p.add_argument("--actor-dim", type=int, default=64, help="actor feature size (objects: 2x)")
    p.add_argument("--base-lr", type=float, default=1e-3,
                   help="LR of ONE window per step (the recipe's; tuned for this model size at B=1)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128], help="effective batches (windows)")
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES, help="LR scaling rules")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    p.add_argument("--recipe-epochs", type=int, default=4, help="epochs of the recipe (B=1)")
    p.add_argument("--max-factor", type=float, default=4.0, help="other runs stop at this x the recipe's keyframes")
    p.add_argument("--warmup-keyframes", type=int, default=4800, help="warmup length of warmup=on runs")
    p.add_argument("--warmup-for-none", action="store_true",
                   help="also run warmup=on with rule none (skipped by default: the LR is not raised)")
    p.add_argument("--warmups", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="warmup settings of the B>1 runs")
    p.add_argument("--optimizers", nargs="+", default=["adam"], choices=["adam", "lamb"],
                   help="optimizers of the B>1 runs")
    p.add_argument("--only-batches", type=int, nargs="*", default=None, help="run only these B>1 batches")
    p.add_argument("--no-early-stop", action="store_true", help="train every run for the full keyframe budget")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--per-step", action="store_true", help="only time training steps per B (no sweep)")
    p.add_argument("--per-step-seconds", type=float, default=20.0,
                   help="--per-step doubles the timed steps until a run takes this long (at most one epoch)")
    p.add_argument("--check-ranks", action="store_true",
                   help="only compare 2 gloo ranks x k windows with 1 rank x 2k windows (torchrun)")
    return p.parse_args(argv)


# -- data ----------------------------------------------------------------------------------


def prepare_data(args: argparse.Namespace) -> dict[str, str]:
    """The dataset and its stores under ``--cache-dir/<name>`` (made once, then reused)."""
    from stage_dist.convert import main as convert_main
    from stage_dist.ingest.synthetic import SynthConfig, synthesize

    config = SynthConfig(seed=0, train_clips=args.train_clips, val_clips=args.val_clips,
                         keyframes_per_clip=args.keyframes_per_clip, actor_dim=args.actor_dim,
                         object_dim=2 * args.actor_dim, actor_thw=(1, 1, 1), num_classes=args.num_classes)
    name = f"c{args.train_clips}_v{args.val_clips}_k{args.keyframes_per_clip}_n{args.num_classes}_d{args.actor_dim}"
    root = args.cache_dir / name
    paths = {"train_store": str(root / "train.zarr"), "val_store": str(root / "val.zarr"),
             "val_groundtruth": str(root / "synth" / "val" / "groundtruth.csv"),
             "labelmap": str(root / "synth" / "labelmap.pbtxt"), "synth": json.dumps(asdict(config))}
    if (root / "done").exists():
        return paths
    dataset = synthesize(root / "synth", config)
    for split in ("train", "val"):
        split_paths = dataset.splits[split]
        argv = ["--actors-dir", str(split_paths.actors_dir), "--objects-file", str(split_paths.objects_file),
                "--out", str(root / f"{split}.zarr"), "--workers", "1"]
        if convert_main(argv) != 0:
            raise SystemExit(f"converting {split} failed")
    (root / "done").write_text("ok\n")
    return paths


# -- one run -------------------------------------------------------------------------------


class BandReached(Exception):
    pass


def run_one(spec: RunSpec, data: dict[str, str], base_lr: float, epochs: int, warmup_steps: int,
            band: float | None, run_dir: str) -> dict:
    """Train one configuration in this process; per-epoch val mAP, keyframes and wall seconds."""
    import shutil

    import torch

    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    from stage_dist.core.config import from_flat
    from stage_dist.engine.distributed import init_distributed
    from stage_dist.engine.train_config import TrainConfig
    from stage_dist.engine.trainer import Trainer

    shutil.rmtree(run_dir, ignore_errors=True)
    config = from_flat(
        TrainConfig, train_store=data["train_store"], val_store=data["val_store"],
        val_groundtruth=data["val_groundtruth"], labelmap=data["labelmap"], output_dir=run_dir,
        lr=base_lr, lr_scaling=spec.rule, windows_per_step=spec.batch, warmup_steps=warmup_steps,
        epochs=epochs, seed=spec.seed, workers=0, device="cpu", log_every=10**6, val_every=1, keep_last=1,
        in_memory=True, **({"optimizer": spec.optimizer} if spec.optimizer != "adam" else {}))
    curve: list[dict] = []
    started = time.perf_counter()

    class Timed(Trainer):
        def validate(self):
            value = super().validate()
            curve.append({"epoch": self.epoch, "step": self.global_step, "val_map": value,
                          "keyframes": self.epoch * self.data.num_keyframes,
                          "wall_s": round(time.perf_counter() - started, 2)})
            if band is not None and value is not None and value >= band:
                raise BandReached
            return value

    trainer = Timed(config, init_distributed("cpu"))
    try:
        trainer.fit()
    except BandReached:
        pass
    shutil.rmtree(run_dir, ignore_errors=True)
    return {**asdict(spec), "key": spec.key, "group": spec.group, "lr": trainer.optimizer.param_groups[0]["initial_lr"],
            "warmup_steps": warmup_steps, "max_epochs": epochs, "steps_per_epoch": len(trainer.data.source),
            "keyframes_per_epoch": trainer.data.num_keyframes, "curve": curve,
            "wall_s": round(time.perf_counter() - started, 2)}


# -- the sweep -----------------------------------------------------------------------------


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": {}}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run_all(specs: Sequence[tuple[RunSpec, int, int, float | None]], data: dict, args: argparse.Namespace,
            results: dict) -> None:
    todo = [s for s in specs if s[0].key not in results["runs"]]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, spec, data, args.base_lr, epochs, warmup, band,
                               str(args.cache_dir / "runs" / spec.key.replace(" ", "_"))): spec
                   for spec, epochs, warmup, band in todo}
        for future in futures:
            spec = futures[future]
            result = future.result()
            results["runs"][spec.key] = result
            save_results(args.json, results)
            last = result["curve"][-1] if result["curve"] else {}
            print(f"{spec.key}: {len(result['curve'])} epochs, final mAP {last.get('val_map', float('nan')):.4f}, "
                  f"{result['wall_s']:.0f} s", flush=True)


def recipe_band(results: dict, seeds: int) -> tuple[float, float, float]:
    finals = [results["runs"][RunSpec(1, "none", False, s).key]["curve"][-1]["val_map"] for s in range(seeds)]
    mean, std = statistics.mean(finals), statistics.stdev(finals) if len(finals) > 1 else 0.0
    return mean, std, mean - std


def sweep(args: argparse.Namespace) -> None:
    data = prepare_data(args)
    results = load_results(args.json)
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results.setdefault("setup", {**setup, "synth": json.loads(data["synth"])})  # the first invocation's
    results.setdefault("invocations", []).append(sys.argv[1:])
    recipe = [(RunSpec(1, "none", False, s), args.recipe_epochs, 0, None) for s in range(args.seeds)]
    run_all(recipe, data, args, results)
    mean, std, band = recipe_band(results, args.seeds)
    first = results["runs"][recipe[0][0].key]
    recipe_keyframes = args.recipe_epochs * first["keyframes_per_epoch"]
    max_epochs = math.ceil(args.max_factor * args.recipe_epochs)
    results["recipe"] = {"final_mean": mean, "final_std": std, "band": band, "keyframes": recipe_keyframes,
                         "max_epochs_others": max_epochs}
    save_results(args.json, results)
    print(f"recipe final val mAP {mean:.4f} +- {std:.4f}; band >= {band:.4f}; {recipe_keyframes} keyframes", flush=True)
    specs = []
    batches = [b for b in args.batches if b > 1 and (args.only_batches is None or b in args.only_batches)]
    for batch in sorted(batches, reverse=True):  # the cheap large batches first
        for optimizer in args.optimizers:
            for rule in args.rules:
                for warmup in [w == "on" for w in args.warmups]:
                    if warmup and rule == "none" and not args.warmup_for_none:
                        continue
                    steps = math.ceil(args.warmup_keyframes / (WINDOW * batch)) if warmup else 0
                    for seed in range(args.seeds):
                        specs.append((RunSpec(batch, rule, warmup, seed, optimizer), max_epochs, steps,
                                      None if args.no_early_stop else band))
    run_all(specs, data, args, results)
    write_markdown(results, args)


# -- the summary ---------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: dict) -> list[dict]:
    """Per configuration: val mAP mean/std per epoch and the keyframes to the band."""
    band = results["recipe"]["band"]
    groups: dict[str, list[dict]] = {}
    for run in results["runs"].values():
        groups.setdefault(run["group"], []).append(run)
    rows = []
    for group, runs in groups.items():
        runs.sort(key=lambda r: r["seed"])
        per_epoch = []
        for epoch in range(1, max(len(r["curve"]) for r in runs) + 1):
            # a run stopped early at the band keeps its last value for the mean (flagged in the table)
            values = [(r["curve"][epoch - 1] if epoch <= len(r["curve"]) else r["curve"][-1])["val_map"] for r in runs]
            per_epoch.append((statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0))
        reached = []
        for r in runs:
            hit = next((c["keyframes"] for c in r["curve"] if c["val_map"] >= band), None)
            reached.append(hit)
        best = [max(c["val_map"] for c in r["curve"]) for r in runs]
        first = runs[0]
        rows.append({"group": group, "batch": first["batch"], "rule": first["rule"], "warmup": first["warmup"],
                     "optimizer": first.get("optimizer", "adam"), "lr": first["lr"],
                     "warmup_steps": first["warmup_steps"], "steps_per_epoch": first["steps_per_epoch"],
                     "keyframes_per_epoch": first["keyframes_per_epoch"], "seeds": len(runs),
                     "per_epoch": per_epoch, "keyframes_to_band": reached,
                     "all_reached_at": max(hits) if len(hits := [x for x in reached if x is not None]) == len(reached)
                     else None,
                     "wall_s_mean": statistics.mean(r["wall_s"] for r in runs), "best": _mean_std(best)})
    rows.sort(key=lambda r: (r["batch"], r["optimizer"], RULES.index(r["rule"]), r["warmup"]))
    return rows


def write_markdown(results: dict, args: argparse.Namespace) -> None:
    rows = summarize(results)
    recipe = results["recipe"]
    lines = ["# Time to accuracy (bench/time_to_accuracy.py)", "",
             f"Recipe (B=1, lr {args.base_lr:g}, no scaling, no warmup, {args.recipe_epochs} epochs, "
             f"{recipe['keyframes']} keyframes): final val mAP {recipe['final_mean']:.4f} +- {recipe['final_std']:.4f} "
             f"over {args.seeds} seeds; band = mean - std = {recipe['band']:.4f}. Other runs: at most "
             f"{recipe['max_epochs_others']} epochs ({args.max_factor:g}x the recipe's keyframes), stopped at the "
             "first epoch that reaches the band (a stopped run's last value is carried in the later means, marked *).",
             "", "| B | rule | warmup (steps) | opt | LR | steps/epoch | keyframes to band (per seed) | all seeds by | "
             "best val mAP (mean +- std) | val mAP mean +- std per epoch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        counts = [len(x["curve"]) for x in results["runs"].values() if x["group"] == r["group"]]
        epochs = " ".join(f"{m:.3f}+-{s:.3f}{'*' if e + 1 > min(counts) else ''}"
                          for e, (m, s) in enumerate(r["per_epoch"]))
        to_band = ", ".join("-" if x is None else f"{x}" for x in r["keyframes_to_band"])
        reached = r["all_reached_at"]
        by = "not reached" if reached is None else f"{reached} ({reached / recipe['keyframes']:.2f}x)"
        lines.append(f"| {r['batch']} | {r['rule']} | {'on (%d)' % r['warmup_steps'] if r['warmup'] else 'off'} | "
                     f"{r['optimizer']} | {r['lr']:.3g} | {r['steps_per_epoch']} | {to_band} | {by} | "
                     f"{r['best'][0]:.3f} +- {r['best'][1]:.3f} | {epochs} |")
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# -- per-step cost and the ranks check -------------------------------------------------------


def _config(data: dict, run_dir: str, **flags):
    from stage_dist.core.config import from_flat
    from stage_dist.engine.train_config import TrainConfig

    base = dict(train_store=data["train_store"], output_dir=run_dir, workers=0, device="cpu", log_every=10**6,
                keep_last=1, in_memory=True)
    return from_flat(TrainConfig, **{**base, **flags})


def per_step(args: argparse.Namespace, data: dict, results: dict) -> None:
    """Seconds per optimizer step at each B: wall of ``Trainer.train_epoch`` (data + step, workers 0,
    in-memory store, one thread) over its steps, after 3 untimed steps; no validation."""
    import shutil

    import torch

    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    from stage_dist.engine.distributed import init_distributed
    from stage_dist.engine.trainer import Trainer

    out = {}
    for batch in args.batches:
        run_dir = str(args.cache_dir / "runs" / f"per_step_B{batch}")
        shutil.rmtree(run_dir, ignore_errors=True)
        probe = Trainer(_config(data, run_dir, windows_per_step=batch, lr=args.base_lr, lr_scaling="none",
                                max_steps=3, epochs=1), init_distributed("cpu"))
        probe.fit()
        started = time.perf_counter()
        steps = 3
        while time.perf_counter() - started < args.per_step_seconds and steps < len(probe.data.source):
            steps = min(len(probe.data.source), steps * 2)
            shutil.rmtree(run_dir, ignore_errors=True)
            trainer = Trainer(_config(data, run_dir, windows_per_step=batch, lr=args.base_lr, lr_scaling="none",
                                      max_steps=steps, epochs=1), init_distributed("cpu"))
            t0 = time.perf_counter()
            trainer.fit()
            seconds = time.perf_counter() - t0
        shutil.rmtree(run_dir, ignore_errors=True)
        out[str(batch)] = {"steps": steps, "seconds": round(seconds, 3), "s_per_step": seconds / steps,
                           "keyframes_per_step": WINDOW * batch, "s_per_keyframe": seconds / steps / (WINDOW * batch)}
        print(f"B{batch}: {steps} steps in {seconds:.2f} s = {1000 * seconds / steps:.2f} ms/step", flush=True)
    results["per_step"] = {"how": "wall of Trainer.fit (max_steps N, no validation, one checkpoint) / N; workers 0, "
                                  "in-memory store, OMP_NUM_THREADS=1, CPU", "batches": out}


CHECK_DRIVER = """
import json, sys, torch
from stage_dist.core.config import load_json
from stage_dist.engine.distributed import cleanup, init_distributed
from stage_dist.train import TrainConfig, Trainer
env = init_distributed("cpu")
trainer = Trainer(load_json(TrainConfig, sys.argv[1]), env)
with trainer:
    trainer.fit()
if env.rank == 0:
    torch.save(trainer.model.state_dict(), sys.argv[2])
cleanup(env)
"""


def check_ranks(args: argparse.Namespace, data: dict, results: dict, k: int = 2, steps: int = 20) -> None:
    """2 gloo ranks x k windows vs 1 rank x 2k windows, same seed, dropout 0: the same windows per
    step (sampler contract); the weights after ``steps`` steps compared."""
    import shutil

    import torch

    from stage_dist.core.config import save_json
    from stage_dist.data.batch import Batch
    from stage_dist.engine.distributed import init_distributed
    from stage_dist.engine.trainer import Trainer

    root = args.cache_dir / "runs" / "check_ranks"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    flags = dict(lr=args.base_lr, lr_scaling="none", max_steps=steps, epochs=1, dropout=0.0, seed=0)
    two = _config(data, str(root / "two"), windows_per_step=k, **flags)
    save_json(two, root / "two.json")
    (root / "driver.py").write_text(CHECK_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(root / "driver.py"), str(root / "two.json"), str(root / "two.pt")], check=True, env=env)
    torch.set_num_threads(1)
    init = Trainer(_config(data, str(root / "init"), windows_per_step=2 * k, **{**flags, "max_steps": 0}),
                   init_distributed("cpu")).model.state_dict()
    one = Trainer(_config(data, str(root / "one"), windows_per_step=2 * k, **flags), init_distributed("cpu"))
    one.fit()

    class PerRankMean(Trainer):
        """1 rank x 2k windows with the loss DDP optimised before ranks were weighted by their actor
        share: the plain mean over ranks of each rank's mean (kept to show what the weight changes)."""

        def train_step(self, batch: Batch) -> torch.Tensor:
            self._rank_of_actor = batch.actor_window // k
            return super().train_step(batch)

        # The trainer calls self.loss: an instance method may replace the static one (it reads this step's ranks).
        def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            total = logits.sum() * 0.0
            for rank in range(2):
                mine = self._rank_of_actor == rank
                if bool(mine.any()):
                    total = total + torch.nn.functional.binary_cross_entropy_with_logits(logits[mine], labels[mine])
            return total / 2

    emulated = PerRankMean(_config(data, str(root / "emulated"), windows_per_step=2 * k, **flags),
                           init_distributed("cpu"))
    emulated.fit()
    two_ranks, plain, per_rank = torch.load(root / "two.pt"), one.model.state_dict(), emulated.model.state_dict()
    moved = max(float((plain[n] - init[n]).abs().max()) for n in plain)

    def compare(a: dict, b: dict) -> dict:
        return {"max_abs_weight_diff": max(float((a[n] - b[n]).abs().max()) for n in a),
                "max_rel_diff_of_update": max(float((a[n] - b[n]).norm() / max((b[n] - init[n]).norm(), 1e-30))
                                              for n in a),
                "equal_bitwise": all(torch.equal(a[n], b[n]) for n in a)}

    results["check_ranks"] = {"k": k, "steps": steps, "max_abs_weight_change": moved,
                              "two_ranks_vs_one_rank": compare(two_ranks, plain),
                              "two_ranks_vs_one_rank_per_rank_mean_loss": compare(two_ranks, per_rank)}
    print(json.dumps(results["check_ranks"], indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    if args.per_step or args.check_ranks:
        data = prepare_data(args)
        results = load_results(args.json)
        if args.per_step:
            per_step(args, data, results)
        if args.check_ranks:
            check_ranks(args, data, results)
        save_results(args.json, results)
        return 0
    sweep(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
