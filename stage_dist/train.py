"""The trainer: STAGE (or the no-graph baseline) on a feature store, 1..N ranks under torchrun.

    torchrun --nproc_per_node=8 -m stage_dist.train --train-store train.zarr --val-store val.zarr \\
        --val-groundtruth ava_val_v2.2.csv --labelmap ava_action_list_v2.2.pbtxt --output-dir runs/stage

The defaults are the published recipe (Adam, lr 6.25e-5 for one 6-keyframe window per step,
4 heads). Everything a run needs to continue lives in :meth:`Trainer.state_dict`: model,
optimizer, LR schedule, grad scaler, sampler position and every rank's RNG state, so a run
stopped anywhere (or restarted by ``torchrun --max-restarts``) resumes exactly where its last
checkpoint was taken.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from stage_dist.ava import read_ava_csv, read_labelmap
from stage_dist.checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
from stage_dist.data import open_train_data
from stage_dist.distributed import (DistEnv, all_reduce_mean, cleanup, configure_threads, gather_to_main,
                                    init_distributed, setup_logging)
from stage_dist.evaluate import evaluate
from stage_dist.infer import INFERENCE_WINDOW, INPUT_ERRORS, KeyframeIndex, predict, write_predictions
from stage_dist.batch import Padding
from stage_dist.model import ModelConfig, action_logits, build_model, compile_model, load_published_state
from stage_dist.precision import AMP_MODES, resolve_precision
from stage_dist.store import FeatureStore

log = logging.getLogger(__name__)

PUBLISHED_LR = 6.25e-5  # Adam, one 6-keyframe window per step, one GPU


@dataclass
class TrainConfig:
    """Every setting of a run (the command-line flags; saved as OUTPUT_DIR/config.json)."""

    output_dir: str
    train_store: str | None = None
    train_shards: str | None = None
    shuffle_buffer: int = 1000
    val_store: str | None = None
    val_groundtruth: str | None = None
    labelmap: str | None = None
    model: str = "stage"
    num_heads: int = 4
    dropout: float = 0.5
    epochs: int = 50  # the published train.py default
    max_steps: int = 0
    window: int = 6
    windows_per_step: int = 1
    lr: float = PUBLISHED_LR
    lr_scaling: str = "sqrt"
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    amp: str = "auto"
    seed: int = 0
    workers: int = 2
    threads: int = 0
    device: str = "auto"
    checkpoint_every: int = 0
    keep_last: int = 3
    val_every: int = 1
    log_every: int = 10
    tensorboard_dir: str | None = None
    resume: str = "auto"
    in_memory: bool = False
    memmap_dir: str | None = None
    compile: bool = False


@dataclass
class StepStats:
    """Running totals between two log lines."""

    loss: float = 0.0
    steps: int = 0
    keyframes: int = 0
    data_wait: float = 0.0
    seconds: float = 0.0

    def add(self, loss: float, keyframes: int, data_wait: float, seconds: float) -> None:
        self.loss += loss
        self.steps += 1
        self.keyframes += keyframes
        self.data_wait += data_wait
        self.seconds += seconds

    def reset(self) -> None:
        self.__init__()


@dataclass
class TrainSummary:
    global_step: int
    epochs_completed: int
    val_map: float | None
    best_map: float | None
    checkpoint_dir: Path
    history: list[dict] = field(default_factory=list)


def effective_lr(config: TrainConfig, world_size: int) -> tuple[int, float]:
    """The effective batch (windows per optimizer step, all ranks) and the LR it gets."""
    effective_batch = config.windows_per_step * world_size
    factor = {"none": 1.0, "linear": effective_batch, "sqrt": math.sqrt(effective_batch)}[config.lr_scaling]
    return effective_batch, config.lr * factor


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


class Trainer:
    """One training run on one rank: data, model (DDP when world size > 1), Adam, LR schedule,
    precision and checkpoints. :meth:`fit` is the loop; :meth:`state_dict` is everything needed
    to continue it."""

    def __init__(self, config: TrainConfig, env: DistEnv) -> None:
        self.config, self.env = config, env
        self.output_dir = Path(config.output_dir)
        self.data = open_train_data(
            store=config.train_store, shards=config.train_shards, window=config.window,
            windows_per_step=config.windows_per_step, rank=env.rank, world_size=env.world_size,
            seed=config.seed, num_workers=config.workers, pin_memory=env.device.type == "cuda",
            in_memory=config.in_memory, memmap_dir=config.memmap_dir, shuffle_buffer=config.shuffle_buffer,
            padding=Padding(bucketed=config.compile),
        )
        self.sampler, self.loader = self.data.steps, self.data.loader
        self.val_store = (
            FeatureStore.open(
                config.val_store,
                expect_actor_dim=self.data.actor_dim,
                expect_object_dim=self.data.object_dim,
                in_memory=config.in_memory,
                memmap_dir=config.memmap_dir,
            )
            if config.val_store
            else None
        )
        # Read on every rank before training: a bad file stops all ranks now, not after an epoch.
        self.val_labelmap = read_labelmap(config.labelmap) if config.labelmap else None
        self.val_groundtruth = read_ava_csv(config.val_groundtruth) if config.val_groundtruth else None
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.model_config = ModelConfig(
            actor_dim=self.data.actor_dim,
            object_dim=self.data.object_dim,
            num_heads=config.num_heads,
            dropout=config.dropout,
        )
        self.model = build_model(config.model, self.model_config).to(env.device)
        if config.compile:
            compile_model(self.model, env.device)
        self.ddp_model: nn.Module = (
            DistributedDataParallel(self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
            if env.world_size > 1
            else self.model
        )
        self.effective_batch, lr = effective_lr(config, env.world_size)
        # fused: one kernel for all parameters (on CPU 2-6x faster than the per-tensor loop)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=config.weight_decay,
                                          fused=True)
        self.total_steps = self._planned_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.warmup_steps, self.total_steps, config.schedule)
        )
        self.precision = resolve_precision(config.amp, env.device)
        self.scaler = self.precision.grad_scaler()
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", keep_last=config.keep_last)
        self.epoch = 0
        self.step_in_epoch = 0  # steps consumed, not the loader's prefetch position
        self.global_step = 0
        self.best_map: float | None = None
        self.history: list[dict] = []
        torch.manual_seed(config.seed + env.rank)  # dropout masks differ between ranks

    def _planned_steps(self) -> int:
        steps = sum(self.sampler.steps_for_epoch(epoch) for epoch in range(self.config.epochs))
        return min(steps, self.config.max_steps) if self.config.max_steps else steps

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a run needs to continue; call on every rank (RNG states are gathered)."""
        rng_per_rank = gather_to_main(rng_state(), self.env)
        return {
            "model_state": self.model.state_dict(),
            "model_kind": self.config.model,
            "model_config": asdict(self.model_config),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step_in_epoch,
            "global_step": self.global_step,
            "best_map": self.best_map,
            "history": self.history,
            "world_size": self.env.world_size,
            "rng_per_rank": rng_per_rank,
            "train_config": asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        self.scaler.load_state_dict(state["scaler_state"])
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step"]
        self.global_step = state["global_step"]
        self.best_map = state["best_map"]
        self.history = list(state["history"])
        rng_states = state["rng_per_rank"]
        if state["world_size"] == self.env.world_size:
            set_rng_state(rng_states[self.env.rank])
        else:
            log.warning(
                "checkpoint was written by %d ranks, this run has %d: RNG streams restart from the seed "
                "(the run continues, but not bitwise as the original would have)",
                state["world_size"],
                self.env.world_size,
            )
            torch.manual_seed(self.config.seed + self.env.rank + self.global_step)

    def save_checkpoint(self, metric: float | None = None) -> None:
        state = self.state_dict()  # collective: every rank takes part
        if self.env.is_main:
            path = self.checkpoints.save(state, epoch=self.epoch, step=self.step_in_epoch, metric=metric)
            log.info("checkpoint %s", path)

    def maybe_resume(self) -> None:
        """Continue the run in OUTPUT_DIR if it has checkpoints; else start, from --resume PATH if given.

        The run's own newest checkpoint always wins over PATH, so a job restarted by
        ``torchrun --max-restarts`` continues where it stopped instead of starting over.
        """
        found = self.checkpoints.load_latest()
        if found is not None and self.config.resume == "none":
            raise ValueError(
                f"{self.checkpoints.directory} holds checkpoints of an earlier run: continue it with "
                "--resume auto, or give a new --output-dir"
            )
        if found is None and self.config.resume in ("auto", "none"):
            return
        state, path = found if found is not None else (load_checkpoint(self.config.resume), Path(self.config.resume))
        if "rng_per_rank" not in state:  # a checkpoint of the published code: weights only
            load_published_state(self.model, state["model_state"])
            log.info("initialised the weights from %s (published format); training starts at epoch 0", path)
            return
        self._warn_on_config_change(state.get("train_config", {}), path)
        self.load_state_dict(state)
        log.info("resumed from %s (epoch %d, step %d of the epoch, global step %d)",
                 path, self.epoch, state["step"], self.global_step)

    def _warn_on_config_change(self, saved: dict, path: Path) -> None:
        """A resumed run keeps the checkpoint's optimizer, LR schedule and position in the epoch;
        changing what a step means makes that position (and the LR) wrong."""
        keys = ("window", "windows_per_step", "seed", "lr", "lr_scaling", "schedule", "warmup_steps")
        changed = [f"{key} {saved[key]} -> {getattr(self.config, key)}" for key in keys
                   if key in saved and saved[key] != getattr(self.config, key)]
        if changed:
            log.warning("resuming %s with changed settings (%s): the optimizer state, LR schedule and position "
                        "in the epoch come from the checkpoint", path, ", ".join(changed))

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainSummary:
        writer = self._writer()
        self.maybe_resume()
        self._log_start()
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", unit="step",
                   disable=not self.env.is_main, dynamic_ncols=True)
        val_map: float | None = None
        finished = self.epoch >= self.config.epochs or self._reached_max_steps()
        while not finished:
            self.train_epoch(writer, bar)
            epoch_done = self.step_in_epoch == len(self.sampler)
            if epoch_done:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.sampler.set_epoch(self.epoch)
            finished = self.epoch >= self.config.epochs or self._reached_max_steps()
            scheduled = epoch_done and self.config.val_every and self.epoch % self.config.val_every == 0
            metric = None
            if self.val_store is not None and (finished or scheduled):
                metric = val_map = self.validate(writer)
            self.save_checkpoint(metric=metric)
        bar.close()
        self._log_per_class(writer)
        if writer:
            writer.close()
        return TrainSummary(self.global_step, self.epoch, val_map, self.best_map,
                            self.checkpoints.directory, self.history)

    def train_epoch(self, writer: SummaryWriter | None, bar: tqdm) -> None:
        """Steps from the current position to the end of the epoch (or to --max-steps)."""
        self.sampler.load_state_dict({"epoch": self.epoch, "step": self.step_in_epoch})
        self.ddp_model.train()
        stats = StepStats()
        step_started = time.perf_counter()
        for batch in self.loader:
            data_ready = time.perf_counter()
            loss = self.train_step(batch)
            self.global_step += 1
            self.step_in_epoch += 1
            step_done = time.perf_counter()
            stats.add(loss, batch.num_keyframes * self.env.world_size, data_ready - step_started,
                      step_done - step_started)
            step_started = step_done
            bar.update(1)
            if self.global_step % self.config.log_every == 0:
                self._log_train(stats, writer, bar)
            if self.config.checkpoint_every and self.global_step % self.config.checkpoint_every == 0:
                self.save_checkpoint()
            if self._reached_max_steps():
                break

    def train_step(self, batch) -> float:
        batch = batch.to(self.env.device, non_blocking=True)
        with self.precision.autocast():
            logits = self.ddp_model(batch)
        loss = self.loss(action_logits(logits).float(), batch.labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item()

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.numel() == 0:  # a step without actors still joins DDP's gradient all-reduce
            return logits.sum()
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)

    def validate(self, writer: SummaryWriter | None) -> float | None:
        """Distributed inference over the val store; rank 0 writes results.csv and evaluates it."""
        assert self.val_store is not None
        predictions = predict(self.model, self.val_store, self.env, window=INFERENCE_WINDOW,
                              precision=self.precision, num_workers=0)
        if not self.env.is_main:
            return None
        results_csv = self.output_dir / "val" / f"results_step{self.global_step:07d}.csv"
        results_csv.parent.mkdir(parents=True, exist_ok=True)
        class_ids = set(self.val_labelmap) if self.val_labelmap else None
        write_predictions(results_csv, predictions, KeyframeIndex.from_store(self.val_store), class_ids=class_ids)
        if self.val_groundtruth is None or self.val_labelmap is None:
            log.info("validation predictions written to %s (no --val-groundtruth/--labelmap: not evaluated)",
                     results_csv)
            return None
        result = evaluate(self.val_groundtruth, results_csv, self.val_labelmap)
        if self.best_map is None or result.mean_ap > self.best_map:
            self.best_map = result.mean_ap
        self.history.append({"epoch": self.epoch, "global_step": self.global_step,
                             "val_map": result.mean_ap, "per_class": result.per_class})
        log.info("validation at epoch %d (step %d): mAP@0.5 %.4f (best %.4f)",
                 self.epoch, self.global_step, result.mean_ap, self.best_map)
        if writer:
            writer.add_scalar("val/mAP", result.mean_ap, self.global_step)
        return result.mean_ap

    # -- reporting ------------------------------------------------------------------------

    def _writer(self) -> SummaryWriter | None:
        if not self.env.is_main:
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return SummaryWriter(self.config.tensorboard_dir or str(self.output_dir / "tensorboard"))

    def _log_start(self) -> None:
        log.info(
            "training %s on %s: %d keyframes in %d clips, %d steps per epoch x %d epochs; "
            "%d rank(s) x %d window(s) of %d keyframes = effective batch %d windows; "
            "lr %.3g (base %.3g, %s scaling), amp %s, device %s",
            self.config.model, self.data.source, self.data.num_keyframes,
            self.data.num_clips, len(self.sampler), self.config.epochs, self.env.world_size,
            self.config.windows_per_step, self.config.window, self.effective_batch,
            self.optimizer.param_groups[0]["initial_lr"], self.config.lr, self.config.lr_scaling,
            self.precision.mode, self.env.device,
        )

    def _log_train(self, stats: StepStats, writer: SummaryWriter | None, bar: tqdm) -> None:
        loss = all_reduce_mean(stats.loss / stats.steps, self.env)
        keyframes_per_s = stats.keyframes / stats.seconds
        wait_fraction = stats.data_wait / stats.seconds
        lr = self.optimizer.param_groups[0]["lr"]
        if writer:
            writer.add_scalar("train/loss", loss, self.global_step)
            writer.add_scalar("train/lr", lr, self.global_step)
            writer.add_scalar("train/keyframes_per_s", keyframes_per_s, self.global_step)
            writer.add_scalar("train/data_wait_fraction", wait_fraction, self.global_step)
        bar.set_postfix(loss=f"{loss:.4f}", kf_s=f"{keyframes_per_s:.0f}", wait=f"{wait_fraction:.0%}")
        log.debug("step %d epoch %d loss %.4f lr %.3g %.0f keyframes/s data wait %.1f%%",
                  self.global_step, self.epoch, loss, lr, keyframes_per_s, 100 * wait_fraction)
        stats.reset()

    def _log_per_class(self, writer: SummaryWriter | None) -> None:
        if not (writer and self.history):
            return
        for name, ap in self.history[-1]["per_class"].items():
            if not math.isnan(ap):
                writer.add_scalar(f"val_per_class_AP/{name}", ap, self.global_step)

    def _reached_max_steps(self) -> bool:
        return bool(self.config.max_steps) and self.global_step >= self.config.max_steps


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig(output_dir="")
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=N -m stage_dist.train",
        description="Train STAGE (or the no-graph baseline) on a feature store with DDP. "
        "A plain `python -m stage_dist.train` runs with world size 1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--train-store", help="training feature store (zarr)")
    source.add_argument("--train-shards", help="training WebDataset shards instead of a store: a brace pattern "
                        "such as 'DIR/train-{000000..000031}.tar' (local paths or URLs webdataset reads; "
                        "manifest.json beside them)")
    data.add_argument("--shuffle-buffer", type=int, default=defaults.shuffle_buffer,
                      help="windows held for shuffling when streaming from --train-shards")
    data.add_argument("--val-store", help="validation feature store; validated every --val-every epochs and at the end")
    data.add_argument("--val-groundtruth", help="AVA groundtruth CSV of the val split (for val mAP)")
    data.add_argument("--labelmap", help="AVA pbtxt label map of the evaluated classes (for val mAP)")
    data.add_argument("--window", type=int, default=defaults.window, help="keyframes per window (the paper's batch size)")
    data.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader worker processes per rank")
    data.add_argument("--in-memory", action="store_true",
                      help="load the stores' features into RAM: one copy in every process (each rank and each "
                           "loader worker); --memmap-dir shares one copy per node")
    data.add_argument("--memmap-dir", help="decompress the stores once per node into .npy files in this directory "
                      "(a local disk or /dev/shm) and memory-map them: one copy shared by all the node's ranks "
                      "and loader workers; the fastest reads when the split fits the page cache")

    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=("stage", "baseline"), default=defaults.model,
                       help="STAGE, or the no-graph baseline (actor features and geometry only) for ablations")
    model.add_argument("--num-heads", type=int, default=defaults.num_heads, help="attention heads per layer")
    model.add_argument("--dropout", type=float, default=defaults.dropout, help="dropout of the graph-attention layers")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs to train")
    optim.add_argument("--max-steps", type=int, default=defaults.max_steps, help="stop after this many optimizer steps in total (0: no limit)")
    optim.add_argument("--windows-per-step", type=int, default=defaults.windows_per_step, help="windows per optimizer step on each rank")
    optim.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate for ONE window per step (the published recipe)")
    optim.add_argument("--lr-scaling", choices=("none", "linear", "sqrt"), default=defaults.lr_scaling,
                       help="how the LR grows with the effective batch (windows per step x ranks)")
    optim.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear LR warmup steps")
    optim.add_argument("--schedule", choices=("constant", "cosine"), default=defaults.schedule, help="LR schedule after warmup")
    optim.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="Adam weight decay")
    optim.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="clip the gradient norm to this (0: off)")
    optim.add_argument("--amp", choices=AMP_MODES, default=defaults.amp,
                       help="autocast: bf16, fp16 (with a GradScaler) or off; auto = bf16 on GPUs that support it, off on CPU")
    optim.add_argument("--seed", type=int, default=defaults.seed, help="seed of weights, window sampling and dropout")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", required=True, help="checkpoints, config.json, val results and TensorBoard logs go here")
    run.add_argument("--device", default=defaults.device, help="auto (cuda when available), cpu or cuda")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the model (CUDA graphs on GPU) and bucket batch shapes (model.compile_model)")
    run.add_argument("--threads", type=int, default=defaults.threads,
                     help="intra-op CPU threads per rank (0: OMP_NUM_THREADS if set, else the rank's share of the "
                          "cores less one per loader worker)")
    run.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                     help="also checkpoint every N steps (0: only at the end of each epoch)")
    run.add_argument("--keep-last", type=int, default=defaults.keep_last, help="checkpoints kept besides best.pt")
    run.add_argument("--val-every", type=int, default=defaults.val_every, help="validate every N epochs (0: only at the end)")
    run.add_argument("--log-every", type=int, default=defaults.log_every, help="log loss, lr, keyframes/s every N steps")
    run.add_argument("--tensorboard-dir", help="TensorBoard log dir (default: OUTPUT_DIR/tensorboard)")
    run.add_argument("--resume", default=defaults.resume,
                     help="auto: continue the run in OUTPUT_DIR if it has checkpoints; none: start afresh (refused if OUTPUT_DIR "
                     "has checkpoints); or a checkpoint to start from when OUTPUT_DIR has none (one of the "
                     "published code initialises the weights only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = TrainConfig(**vars(args))
    env = init_distributed(config.device)
    setup_logging(env)
    configure_threads(config.threads, env, config.workers)
    try:
        summary = Trainer(config, env).fit()
        if env.is_main:
            val = "n/a" if summary.val_map is None else f"{summary.val_map:.4f}"
            best = "n/a" if summary.best_map is None else f"{summary.best_map:.4f}"
            print(f"done: {summary.global_step} steps, {summary.epochs_completed} epochs, "
                  f"val mAP {val} (best {best}); checkpoints in {summary.checkpoint_dir}")
    except INPUT_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        cleanup(env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
