"""The trainer: STAGE (or the no-graph baseline) on a feature store, 1..N ranks under torchrun.

    torchrun --nproc_per_node=8 -m stage_dist.train --train-store train.zarr --val-store val.zarr \\
        --val-groundtruth ava_val_v2.2.csv --labelmap ava_action_list_v2.2.pbtxt --output-dir runs/stage

The defaults are the published recipe (Adam, lr 6.25e-5 for one 6-keyframe window per step,
4 heads). Everything a run needs to continue lives in :meth:`Trainer.state_dict`: model,
optimizer, LR schedule, grad scaler, the window source's position and every rank's RNG state, so
a run stopped anywhere (or restarted by ``torchrun --max-restarts``) resumes exactly where its last
checkpoint was taken (the Python, NumPy and torch generators are seeded per rank and restored
after all start-up code).

Non-finite numbers stop the run with exit code 3 (2 is a bad input, given as one line naming the
file or flag); the guard is :mod:`stage_dist.engine.nonfinite`. Every step ORs ``~isfinite(loss)`` (and,
with ``--grad-clip``, of the gradient norm it computes anyway, except under fp16 where the
GradScaler skips such steps) into a flag on the device that keeps the first bad step; the flag
and the finiteness of the weights are read back at log steps and before every checkpoint and
validation, so there is no per-step host sync, the error names the first bad step and its window
(clip, video, keyframes), and no checkpoint ever holds non-finite weights: the last good one stays
the newest. A finite loss with non-finite gradients and no ``--grad-clip`` shows in the weights at
the next check and is named as a step range.

A training step reads nothing back from the device: the loss, the non-finite flag and the
finiteness of the weights are read at log steps (and before checkpoints and validation) only, and
the step's window is named from the batch's host bookkeeping. Under DDP the gradients live in the
all-reduce buckets (``gradient_as_bucket_view``) and the graph is static: every step gives every
parameter a gradient, a step without actors included (:meth:`Trainer.loss`). Each rank's mean
loss is weighted by its share of the step's actors (:func:`~stage_dist.engine.distributed.share_of_all`,
one scalar all-reduce on the device), so DDP's mean over ranks is the mean over all the step's
actors: R ranks x k windows make the same update as one rank x Rk windows. ``--workers`` defaults
to the rank's share of its cores (:func:`~stage_dist.engine.distributed.loader_workers`).

``--deterministic`` (:func:`~stage_dist.engine.distributed.configure_determinism`): on a GPU, two runs of
the same config, and a run resumed from its checkpoint, end with bitwise identical weights on the
same GPU model and software (driver, CUDA, cuDNN, NCCL, torch) at the same world size; it does not
make runs match across GPU models, software versions, world sizes or CPU vs GPU, and ``--compile``
is not covered. On CPU the kernels are deterministic without it (exact resume is tested there);
measured cost of the flag on CPU: none beyond noise (bench/train_bench.py --deterministic).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stage_dist.ava.evaluation import EvalResult, evaluate_predictions, read_action_groups
from stage_dist.ava.formats import read_ava_csv, read_labelmap
from stage_dist.core.config import (
    flat_dict,
    to_dict,
)
from stage_dist.core.errors import UserInputError
from stage_dist.core.outputs import check_not_input, is_launch_rank_zero, launch_lock
from stage_dist.core.paths import check_target, ensure_free_space, user_path_errors
from stage_dist.data.batch import Batch, Padding
from stage_dist.data.splits import open_train_data
from stage_dist.data.store_windows import StoreWindowSource
from stage_dist.engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    TrainingState,
    checkpoint_state,
    read_checkpoint,
    rng_state,
    set_rng_state,
)
from stage_dist.engine.distributed import (
    DistEnv,
    all_reduce_mean,
    all_reduce_min,
    barrier,
    configure_determinism,
    gather_to_main,
    loader_workers,
    share_of_all,
)
from stage_dist.engine.inference import (
    INFERENCE_WINDOW,
    KeyframeIndex,
    Predictions,
    non_finite_scores,
    predict,
    write_predictions,
)
from stage_dist.engine.lamb import Lamb
from stage_dist.engine.lr_scaling import LRChoice, choose_lr, lr_factor
from stage_dist.engine.nonfinite import NonFiniteError, NonFiniteGuard
from stage_dist.engine.precision import resolve_precision
from stage_dist.engine.preemption import PreemptedError, RunControl, parse_signals
from stage_dist.engine.run_log import RunLog
from stage_dist.engine.train_config import CONFIG_NAME, OptimConfig, TrainConfig
from stage_dist.model.saved_model import SavedModel, load_model_state
from stage_dist.model.stage import action_logits, build_model, compile_model
from stage_dist.store.feature_store import FeatureStore
from stage_dist.store.schema import describe_classes

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """Running totals between two log lines. ``loss`` stays on the device (a sum of the steps'
    losses) so that it is read back once per log line, not once per step."""

    loss: torch.Tensor | float = 0.0
    steps: int = 0
    keyframes: int = 0
    data_wait: float = 0.0
    seconds: float = 0.0

    def add(self, loss: torch.Tensor, keyframes: int, data_wait: float, seconds: float) -> None:
        self.loss = self.loss + loss
        self.steps += 1
        self.keyframes += keyframes
        self.data_wait += data_wait
        self.seconds += seconds

    def reset(self) -> None:
        type(self).__init__(self)  # every field back to its default


@dataclass
class TrainSummary:
    global_step: int
    epochs_completed: int
    val_map: float | None
    best_map: float | None
    checkpoint_dir: Path | None  # None: this run wrote no checkpoint (nothing left to train)
    history: list[dict] = field(default_factory=list)


def lr_choice(config: TrainConfig, world_size: int) -> LRChoice:
    """The run's LR and warmup for its effective batch, and why (:mod:`stage_dist.engine.lr_scaling`)."""
    optim = config.optim
    return choose_lr(optim.lr, optim.lr_scaling, optim.windows_per_step, world_size, config.data.window,
                     warmup_steps=optim.warmup_steps, warmup_keyframes=optim.warmup_keyframes)


def effective_lr(optim: OptimConfig, world_size: int) -> tuple[int, float]:
    """The effective batch (windows per optimizer step, all ranks) and the LR it gets."""
    effective_batch = optim.windows_per_step * world_size
    return effective_batch, optim.lr * lr_factor(optim.lr_scaling, effective_batch)


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str) -> Callable[[int], float]:
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
    to continue it. Its parts of their own: the non-finite guard
    (:class:`~stage_dist.engine.nonfinite.NonFiniteGuard`), the preemption control
    (:class:`~stage_dist.engine.preemption.RunControl`) and rank 0's run log
    (:class:`~stage_dist.engine.run_log.RunLog`). ``prepared``: :func:`prepare_run` was called
    already (:func:`main` calls it before the process group); a library user leaves it to the trainer."""

    def __init__(self, config: TrainConfig, env: DistEnv, *, prepared: bool = False) -> None:
        if not prepared:
            prepare_run(config)
        self.config, self.env = config, env
        self.output_dir = Path(config.output_dir)
        self.workers = loader_workers(config.runtime.workers, env)
        self.data = open_train_data(
            config.data.train_split, window=config.data.window, windows_per_step=config.optim.windows_per_step,
            seed=config.optim.seed, rank=env.rank, world_size=env.world_size, num_workers=self.workers,
            pin_memory=env.device.type == "cuda", padding=Padding(bucketed=config.runtime.compile),
        )
        self.val_store = (
            FeatureStore.open(
                config.data.val_store,
                expect_actor_dim=self.data.actor_dim,
                expect_object_dim=self.data.object_dim,
                in_memory=config.data.in_memory,
                memmap_dir=config.data.memmap_dir,
            )
            if config.data.val_store
            else None
        )
        if config.data.memmap_dir:  # the node's one decompressed copy: its space, before any step
            stores = [self.val_store] + ([FeatureStore.open(config.data.train_store, memmap_dir=config.data.memmap_dir)]
                                         if config.data.train_store else [])
            with user_path_errors(train_paths(config)):
                ensure_free_space(config.data.memmap_dir, sum(s.memmap_bytes() for s in stores if s is not None),
                                  "the decompressed stores")
        # Read on every rank before training: a bad file stops all ranks now, not after an epoch.
        self.val_labelmap = read_labelmap(config.data.labelmap) if config.data.labelmap else None
        self.val_groups = read_action_groups(config.data.labelmap) if config.data.labelmap else None
        self.val_groundtruth = read_ava_csv(config.data.val_groundtruth) if config.data.val_groundtruth else None
        self.class_ids = self.data.source.class_ids  # the class id of each label column of the train data
        check_class_sets(self.class_ids, self.data.location, self.val_store, config.data.labelmap, self.val_labelmap)
        if self.val_store is not None and (self.val_groundtruth is None or self.val_labelmap is None):
            log.warning("--val-store without both --val-groundtruth and --labelmap: validation writes results.csv "
                        "but computes no mAP, and best.pt is not chosen")
        torch.manual_seed(config.optim.seed)  # identical initial weights on every rank
        self.model_config = config.model.model_config(self.data.actor_dim, self.data.object_dim, self.class_ids)
        self.model = build_model(config.model.kind, self.model_config).to(env.device)
        if config.runtime.compile:
            compile_model(self.model, env.device)
        self.ddp_model: nn.Module = self.model if env.world_size == 1 else DistributedDataParallel(
            self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            # Gradients live in DDP's all-reduce buckets (no copy in or out, one gradient-sized buffer
            # less); static graph: every step uses every parameter (a step without actors too, see
            # `loss`), so DDP skips its per-step search for unused parameters and can overlap more.
            gradient_as_bucket_view=True, static_graph=True,
        )
        self.lr_choice = lr_choice(config, env.world_size)
        self.effective_batch, lr = self.lr_choice.effective_batch, self.lr_choice.lr
        # fused: one kernel for all parameters (on CPU 2-6x faster than the per-tensor loop)
        self.optimizer: torch.optim.Optimizer = (
            Lamb(self.model.parameters(), lr=lr, weight_decay=config.optim.weight_decay)
            if config.optim.optimizer == "lamb" else
            torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=config.optim.weight_decay, fused=True))
        with user_path_errors(train_paths(config)):  # a checkpoint holds the weights and Adam's 2 moments
            ensure_free_space(self.output_dir, 3 * sum(p.numel() * p.element_size() for p in self.model.parameters()),
                              "a checkpoint")
        self.total_steps = self._planned_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.lr_choice.warmup_steps, self.total_steps, config.optim.schedule)
        )
        self.precision = resolve_precision(config.runtime.amp, env.device)
        self.scaler = self.precision.grad_scaler()
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", keep_last=config.run.keep_last)
        self.global_step = 0
        self.best_map: float | None = None
        self.history: list[dict] = []
        self._pending_rng: dict | None = None  # a resumed rank's generators, restored by _restore_rng
        # Preemption signals and --checkpoint-every-minutes, agreed in the non-finite check's reduction.
        self.control = RunControl(parse_signals(config.run.preempt_signals), config.run.checkpoint_every_minutes)
        self._saved_at_step = -1
        self.nonfinite = NonFiniteGuard(self.model, env, self.control, self.data.source.keyframe_namer().describe,
                                        last_good=self.checkpoints.latest)
        self.run_log = RunLog(self.output_dir, config_file=self.output_dir / CONFIG_NAME,
                              tensorboard_dir=config.run.tensorboard_dir,
                              progress_every_seconds=config.run.progress_every_seconds, paths=train_paths(config),
                              enabled=env.is_main, logger=log)
        # Every generator a rank owns starts from the seed (dropout masks differ between ranks), so
        # the RNG states a checkpoint saves are the same in any run of this config.
        torch.manual_seed(config.optim.seed + env.rank)
        random.seed(config.optim.seed + env.rank)
        np.random.seed(config.optim.seed + env.rank)

    def _planned_steps(self) -> int:
        steps = sum(self.data.source.steps_for_epoch(epoch) for epoch in range(self.config.optim.epochs))
        return min(steps, self.config.optim.max_steps) if self.config.optim.max_steps else steps

    # -- state -----------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch being trained: the window source's position, which it moves itself."""
        return self.data.source.epoch

    @property
    def step_in_epoch(self) -> int:
        """Steps of the epoch trained (not the loader's prefetch position): the source's position."""
        return self.data.source.step

    def state_dict(self) -> dict:
        """Everything a run needs to continue, in the checkpoint layout
        (:func:`~stage_dist.engine.checkpoint.checkpoint_state`); call on every rank (RNG states are gathered)."""
        rng_per_rank = gather_to_main(rng_state(), self.env)
        model = SavedModel(self.config.model.kind, self.model_config, self.model.state_dict())
        training = TrainingState(
            optimizer_state=self.optimizer.state_dict(), scheduler_state=self.scheduler.state_dict(),
            scaler_state=self.scaler.state_dict(), epoch=self.epoch, step=self.step_in_epoch,
            global_step=self.global_step, best_map=self.best_map, history=self.history,
            world_size=self.env.world_size, rng_per_rank=rng_per_rank or [],  # []: not rank 0, which saves
            train_config=to_dict(self.config))
        return checkpoint_state(model, training)

    def load_state_dict(self, checkpoint: Checkpoint) -> None:
        """Continue the run saved in ``checkpoint`` (a :mod:`stage_dist.train` checkpoint with its
        training state). The RNG states are restored later, by :meth:`_restore_rng`."""
        state = checkpoint.training
        assert state is not None
        load_model_state(self.model, checkpoint.model_state)
        self.optimizer.load_state_dict(state.optimizer_state)
        self.scheduler.load_state_dict(state.scheduler_state)
        self._load_scaler_state(state.scaler_state, checkpoint.path)
        self.data.source.load_state_dict({"epoch": state.epoch, "step": state.step})
        self.global_step = state.global_step
        self.best_map = state.best_map
        self.history = list(state.history)
        if state.world_size == self.env.world_size:
            self._pending_rng = state.rng_per_rank[self.env.rank]
        else:
            log.warning(
                "checkpoint was written by %d ranks, this run has %d: RNG streams restart from the seed "
                "(the run continues, but not bitwise as the original would have)",
                state.world_size,
                self.env.world_size,
            )
            torch.manual_seed(self.config.optim.seed + self.env.rank + self.global_step)

    def _load_scaler_state(self, saved: dict | None, path: Path) -> None:
        """A checkpoint saved without an active GradScaler (--amp off or bf16) resumed under fp16
        starts a fresh scaler; a scaler state resumed without fp16 is not needed."""
        if saved is None:
            if self.scaler.is_enabled():
                log.warning("%s holds no GradScaler state (saved without --amp fp16): fp16 resumes with a "
                            "fresh scaler (scale %g)", path, self.scaler.get_scale())
            return
        if not self.scaler.is_enabled():
            log.info("%s holds a GradScaler state (saved with --amp fp16); amp %s does not use it",
                     path, self.precision.mode)
            return
        self.scaler.load_state_dict(saved)

    def _restore_rng(self) -> None:
        """Set the generators to the resumed checkpoint's, after all start-up code that draws from
        them (model init, data set-up, loggers), so the run continues bit for bit."""
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def close(self) -> None:
        """Drop the DDP wrapper, whose reducer holds the process group, so that it is freed before
        ``cleanup`` destroys the group rather than whenever the trainer goes (a trainer kept in a
        global goes during interpreter shutdown). ``with Trainer(...)`` calls it."""
        self.ddp_model = self.model

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def save_checkpoint(self, metric: float | None = None) -> None:
        self.nonfinite.check()  # never write non-finite weights over the last good checkpoint
        state = self.state_dict()  # collective: every rank takes part
        if self.env.is_main:
            self.run_log.sync()  # every metrics line up to this step is on disk before the checkpoint is
            path = self.checkpoints.save(state, epoch=self.epoch, step=self.step_in_epoch, metric=metric)
            self.run_log.checkpoint(path)
        self._saved_at_step = self.global_step
        self.control.saved()

    def _obey_control(self) -> None:
        """Act on what the ranks agreed at the last reduction (the same on every rank): a
        --checkpoint-every-minutes checkpoint, or a preemption checkpoint and stop."""
        control = self.control
        if (control.stop or control.save) and self._saved_at_step != self.global_step:
            self.save_checkpoint()
        control.save = False
        if control.stop:
            self._stop_preempted()

    def _stop_preempted(self) -> None:
        """Every rank waits until rank 0 has written the checkpoint, then stops: a rank that exited
        first could get the others killed mid-write (``srun --kill-on-bad-exit``, torchrun)."""
        barrier(self.env)
        raise PreemptedError(self.control.stop_signal, self.global_step, self.checkpoints.latest())

    def maybe_resume(self) -> None:
        """Continue the run in OUTPUT_DIR if it has checkpoints; else start, from --resume PATH if given.

        The run's own newest checkpoint always wins over PATH, so a job restarted by
        ``torchrun --max-restarts`` continues where it stopped instead of starting over.
        """
        found = self.checkpoints.load_latest()
        if found is not None and self.config.run.resume == "none":
            raise UserInputError(
                f"{self.checkpoints.directory} holds checkpoints of an earlier run: continue it with "
                "--resume auto, or give a new --output-dir"
            )
        if found is None and self.config.run.resume in ("auto", "none"):
            return
        if found is not None:
            checkpoint = found
        else:
            try:
                checkpoint = read_checkpoint(self.config.run.resume)
            except CheckpointError as err:  # the file, or the OS's verdict on its path: name the flag
                raise CheckpointError(f"--resume {err}") from None
        if checkpoint.model_config.classes != self.model_config.classes:
            raise CheckpointError(f"{checkpoint.path}: the checkpoint predicts "
                                  f"{describe_classes(checkpoint.model_config.classes)}, the training data "
                                  f"{self.data.location} holds {describe_classes(self.model_config.classes)}")
        if checkpoint.training is None:  # the published format, or a model-only file: weights only
            try:
                load_model_state(self.model, checkpoint.model_state)
            except CheckpointError as err:
                raise CheckpointError(f"{checkpoint.path}: {err}") from None
            log.info("initialised the weights from %s (%s format, no training state); training starts at epoch 0",
                     checkpoint.path, checkpoint.kind)
            return
        self._warn_on_config_change(checkpoint.training.train_config, checkpoint.path)
        try:
            self.load_state_dict(checkpoint)
        except CheckpointError as err:
            raise CheckpointError(f"{checkpoint.path}: {err}") from None
        log.info("resumed from %s (epoch %d, step %d of the epoch, global step %d)",
                 checkpoint.path, self.epoch, self.step_in_epoch, self.global_step)

    def _warn_on_config_change(self, saved: dict, path: Path) -> None:
        """A resumed run keeps the checkpoint's optimizer, LR schedule and position in the epoch;
        changing what a step means makes that position (and the LR) wrong."""
        keys = ("window", "windows_per_step", "seed", "lr", "lr_scaling", "schedule", "warmup_steps",
                "warmup_keyframes", "optimizer")
        saved = {k: v for part in saved.values() if isinstance(part, dict) for k, v in part.items()} or saved
        now = flat_dict(self.config)
        changed = [f"{key} {saved[key]} -> {now[key]}" for key in keys if key in saved and saved[key] != now[key]]
        if changed:
            log.warning("resuming %s with changed settings (%s): the optimizer state, LR schedule and position "
                        "in the epoch come from the checkpoint", path, ", ".join(changed))

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainSummary:
        self.maybe_resume()  # before writing anything: a bad --resume leaves OUTPUT_DIR untouched
        self.run_log.open(self.config, resumed_step=self.global_step)
        self._log_start()
        self.run_log.start_progress(initial=self.global_step, total=self.total_steps)
        self._restore_rng()
        val_map: float | None = None
        saved_any = False
        finished = self.epoch >= self.config.optim.epochs or self._reached_max_steps()
        signals = contextlib.ExitStack()  # the preemption handlers, for the loop only
        signals.enter_context(self.control.handling_signals())
        try:
            while not finished:
                epoch = self.epoch
                self.train_epoch()
                epoch_done = self.epoch != epoch  # the source moved on once its last step was trained
                finished = self.epoch >= self.config.optim.epochs or self._reached_max_steps()
                scheduled = epoch_done and self.config.run.val_every and self.epoch % self.config.run.val_every == 0
                metric = None
                self.nonfinite.check()
                if self.val_store is not None and (finished or scheduled):
                    metric = val_map = self.validate()
                self.save_checkpoint(metric=metric)
                saved_any = True
                if self.control.stop and not finished:  # agreed at the epoch end's check
                    self._stop_preempted()
        finally:
            signals.close()
            self.run_log.close()  # ends the progress line before any error message
        barrier(self.env)  # every rank returns once rank 0 has written the last checkpoint (see _stop_preempted)
        return TrainSummary(self.global_step, self.epoch, val_map, self.best_map,
                            self.checkpoints.directory if saved_any else None, self.history)

    def train_epoch(self) -> None:
        """Steps from the current position to the end of the epoch (or to --max-steps)."""
        self.ddp_model.train()
        stats = StepStats()
        step_started = time.perf_counter()
        for batch in self.data.loader:
            data_ready = time.perf_counter()
            rows = batch.actor_keyframe.numpy()  # host bookkeeping (numpy() refuses a device tensor)
            window = (int(rows.min()), int(rows.max())) if len(rows) else (-1, -1)
            loss = self.train_step(batch)
            self.global_step += 1
            self.nonfinite.stepped(self.global_step, window)
            step_done = time.perf_counter()
            stats.add(loss, batch.num_keyframes * self.env.world_size, data_ready - step_started,
                      step_done - step_started)
            step_started = step_done
            if self.global_step % self.config.run.log_every == 0:
                self._log_train(stats)
            self.run_log.step_done()
            if self.config.run.checkpoint_every and self.global_step % self.config.run.checkpoint_every == 0:
                self.save_checkpoint()
            self._obey_control()
            if self._reached_max_steps():
                break

    def train_step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step; returns the loss, detached and left on the device (no host sync)."""
        batch = batch.to(self.env.device, non_blocking=True)
        with self.precision.autocast():
            logits = self.ddp_model(batch)
        loss = self.loss(action_logits(logits, self.model_config.class_ids).float(), batch.labels)
        if self.env.distributed:  # each actor weighs the same whatever its rank's actor count
            loss = loss * share_of_all(batch.labels.shape[0], self.env)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        bad = ~torch.isfinite(loss.detach())
        if self.config.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
            if not self.scaler.is_enabled():  # under fp16 the scaler skips steps with inf gradients
                bad |= ~torch.isfinite(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.nonfinite.record(self.global_step + 1, bad)
        return loss.detach()

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy over the actors' classes (AVA: 80 actions). A step without actors returns
        ``logits.sum()`` (0, through the whole model), so every parameter still gets a (zero)
        gradient: DDP's all-reduce and its static graph are the same on every step."""
        if logits.numel() == 0:
            return logits.sum()
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)

    def validate(self) -> float | None:
        """Distributed inference over the val store; rank 0 writes results.csv and evaluates it.
        Non-finite scores (a NaN/Inf in the val store) stop the run on every rank."""
        assert self.val_store is not None
        result = predict(self.model, StoreWindowSource(self.val_store), self.env, window=INFERENCE_WINDOW,
                         precision=self.precision, num_workers=0,
                         progress_every_seconds=self.config.run.progress_every_seconds)
        problem = non_finite_scores(result.predictions, result.keyframes) if result is not None else None
        flag = torch.tensor(-1 if problem else 0, dtype=torch.int64, device=self.env.device)
        if int(all_reduce_min(flag, self.env)) < 0:
            raise NonFiniteError(f"validation on {self.val_store.path}: {problem or 'non-finite scores (rank 0)'}")
        if not self.env.is_main:
            return None
        assert result is not None  # predict returns the predictions on rank 0
        results_csv = self.output_dir / "val" / f"results_step{self.global_step:07d}.csv"
        results_csv.parent.mkdir(parents=True, exist_ok=True)
        class_ids = set(self.val_labelmap) if self.val_labelmap else None
        predictions, keyframes = result.predictions, result.keyframes
        with user_path_errors(train_paths(self.config), writing="--output-dir"):
            write_predictions(results_csv, predictions, keyframes, class_ids=class_ids, column_ids=self.class_ids)
        if self.val_groundtruth is None or self.val_labelmap is None:
            log.info("validation predictions written to %s (no --val-groundtruth/--labelmap: not evaluated)",
                     results_csv)
            return None
        evaluated = self._evaluate(predictions, keyframes, class_ids)
        if self.best_map is None or evaluated.mean_ap > self.best_map:
            self.best_map = evaluated.mean_ap
        self.history.append({"epoch": self.epoch, "global_step": self.global_step,
                             "val_map": evaluated.mean_ap, "per_class": evaluated.per_class})
        self.run_log.validation(step=self.global_step, epoch=self.epoch, result=evaluated, best_map=self.best_map)
        return evaluated.mean_ap

    def _evaluate(self, predictions: Predictions, keyframes: KeyframeIndex, class_ids: set[int] | None) -> EvalResult:
        """Frame-mAP@0.5 of the val predictions, in memory: the same numbers as evaluating the
        results.csv just written (``evaluate_predictions`` applies the writer's row selection)."""
        assert self.val_groundtruth is not None and self.val_labelmap is not None  # validate checked both
        rows = predictions.keyframe
        return evaluate_predictions(self.val_groundtruth, self.val_labelmap,
                                    keyframes.video_ids[rows], keyframes.timestamps[rows], predictions.boxes,
                                    predictions.scores, class_ids=class_ids, column_ids=self.class_ids,
                                    groups=self.val_groups)

    # -- reporting ------------------------------------------------------------------------

    def _log_start(self) -> None:
        log.info(
            "training %s on %s: %d keyframes in %d clips, %d steps per epoch x %d epochs; "
            "%d rank(s) x %d window(s) of %d keyframes = effective batch %d windows; "
            "lr %.3g (base %.3g, %s scaling), amp %s, device %s",
            self.config.model.kind, self.data.location, self.data.num_keyframes,
            self.data.num_clips, len(self.data.source), self.config.optim.epochs, self.env.world_size,
            self.config.optim.windows_per_step, self.config.data.window, self.effective_batch,
            self.optimizer.param_groups[0]["initial_lr"], self.config.optim.lr, self.config.optim.lr_scaling,
            self.precision.mode, self.env.device,
        )
        log.info("%s", self.lr_choice.describe())
        warning = self.lr_choice.coverage_warning()
        if warning:
            log.warning("%s", warning)

    def _log_train(self, stats: StepStats) -> None:
        self.nonfinite.check()
        loss = all_reduce_mean(float(stats.loss) / stats.steps, self.env)  # the loss's one read per log line
        self.run_log.train(step=self.global_step, epoch=self.epoch, loss=loss, lr=self.optimizer.param_groups[0]["lr"],
                           keyframes_per_s=stats.keyframes / stats.seconds, data_wait=stats.data_wait / stats.seconds)
        stats.reset()

    def _reached_max_steps(self) -> bool:
        return bool(self.config.optim.max_steps) and self.global_step >= self.config.optim.max_steps


class TrainConfigError(UserInputError):
    """An output directory that would overwrite an input or another program's files; found before
    any work starts."""


def check_class_sets(class_ids: tuple[int, ...], train: str, val_store: FeatureStore | None,
                     labelmap_path: str | None, labelmap: dict[int, str] | None) -> None:
    """The val store must have the train data's class set, and ``--labelmap`` only its classes."""
    if val_store is not None and val_store.class_ids != class_ids:
        raise UserInputError(f"--val-store {val_store.path}: holds {describe_classes(val_store.class_ids)}, the "
                             f"training data {train} {describe_classes(class_ids)}; convert both with the same "
                             "label map")
    if labelmap is not None:
        outside = sorted(set(labelmap) - set(class_ids))
        if outside:
            raise UserInputError(f"--labelmap {labelmap_path}: class id(s) {', '.join(map(str, outside[:5]))} are not "
                                 f"among the {describe_classes(class_ids)} of the training data {train}")


def check_output_dir(config: TrainConfig) -> None:
    """``--output-dir`` must not be, contain or lie inside an input (stores, groundtruth, label map,
    --resume checkpoint), must be a directory if it exists, may hold another program's files only
    beside the run's (its config.json must be a run's), and must be writable."""
    out = Path(config.output_dir)
    data, resume = config.data, config.run.resume
    check_not_input(out, [("--train-store", data.train_store), ("--val-store", data.val_store),
                          ("--val-groundtruth", data.val_groundtruth), ("--labelmap", data.labelmap),
                          ("--resume", resume if resume not in ("auto", "none") else None)], "--output-dir")
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainConfigError(f"{out}: --output-dir exists and is not a directory")
    check_target(out, "--output-dir", kind="dir", inside=["checkpoints", "tensorboard", CONFIG_NAME])
    saved_config = out / CONFIG_NAME
    if saved_config.exists() and not _is_run_config(saved_config):
        raise TrainConfigError(f"{saved_config}: not a stage_dist run's config.json; refusing to replace it "
                               "(give another --output-dir)")
    if data.memmap_dir is not None:  # MEMMAP_DIR/<store name>-<fingerprint>/<array>.npy
        check_target(data.memmap_dir, "--memmap-dir", kind="dir", inside=[
            f"{Path(store).name}-{'0' * 16}" for store in (data.train_store, data.val_store) if store])
    if config.run.tensorboard_dir:
        check_target(config.run.tensorboard_dir, "--tensorboard-dir", kind="dir",
                     inside=[f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0"],
                     need_bytes=TENSORBOARD_MIN_BYTES)


TENSORBOARD_MIN_BYTES = 4096  # one block: the event file's header and first records


def prepare_run(config: TrainConfig) -> None:
    """What a run needs before anything else, done once: ``--output-dir`` checked
    (:func:`check_output_dir`) and ``--deterministic`` set (before CUDA's first cuBLAS handle:
    cuBLAS reads its environment then). :func:`main` calls it before the output lock and the
    process group, so every rank fails the same way, at once, and nothing is created in a refused
    directory; a :class:`Trainer` built without ``prepared=True`` (a library user) calls it."""
    check_output_dir(config)
    configure_determinism(config.runtime.deterministic)


def train_paths(config: TrainConfig) -> dict[str, str | None]:
    """The paths a run writes, by flag (:mod:`stage_dist.core.paths` names the flag of an OS error)."""
    return {"--output-dir": config.output_dir, "--memmap-dir": config.data.memmap_dir,
            "--tensorboard-dir": config.run.tensorboard_dir}


def _is_run_config(path: Path) -> bool:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and "output_dir" in saved and ("data" in saved or "train_store" in saved)


@contextlib.contextmanager
def run_lock(config: TrainConfig) -> Iterator[None]:
    """The output directory's one-writer lock, held by the launch's rank 0 for the whole run: a
    second training on the same ``--output-dir`` stops at once naming the holder (a run killed
    by ``torchrun --max-restarts`` leaves a stale lock that its restart takes over). A directory
    rank 0 created is removed again by rank 0 if the run fails before writing anything in it;
    another rank never removes it (rank 0 may be about to write there)."""
    out = Path(config.output_dir)
    created = not out.exists() and is_launch_rank_zero()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainConfigError(f"{config.output_dir}: cannot create --output-dir: {err.strerror or err}") from None
    try:
        with launch_lock(config.output_dir, "--output-dir"):
            yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if still empty
        raise
