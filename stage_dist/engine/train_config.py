"""The trainer's settings: typed sections behind every train flag, --config FILE and a run's config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from stage_dist.core.config import (
    ConfigError,
    RuntimeConfig,
    option,
    section,
)
from stage_dist.core.progress import DEFAULT_EVERY_SECONDS
from stage_dist.data.split_config import SplitConfig
from stage_dist.data.window_source import SHUFFLE_BUFFER
from stage_dist.engine.lr_scaling import DEFAULT_RULE, DEFAULT_WARMUP_KEYFRAMES
from stage_dist.engine.preemption import DEFAULT_PREEMPT_SIGNALS, parse_signals
from stage_dist.model.stage import ModelSection

PUBLISHED_LR = 6.25e-5  # Adam, one 6-keyframe window per step, one GPU
CONFIG_NAME = "config.json"  # the run's TrainConfig in OUTPUT_DIR (``--config`` reads it back)


@dataclass(frozen=True)
class DataConfig:
    """What the run reads."""

    train_store: str | None = option(None, help="training feature store (zarr)")
    train_shards: str | None = option(None, help="training WebDataset shards instead of a store: a brace pattern such "
                                                 "as 'DIR/train-{000000..000031}.tar' (local paths or URLs webdataset "
                                                 "reads; manifest.json beside them)")
    shards_manifest: str | None = option(None, help="manifest.json of --train-shards (a path or URL) when it is not "
                                                    "beside the first shard, e.g. for 'pipe:aws s3 cp s3://b/train-"
                                                    "{000000..000063}.tar -' shards")
    shuffle_buffer: int = option(SHUFFLE_BUFFER, help="windows held for shuffling when streaming from --train-shards")
    val_store: str | None = option(None, help="validation feature store; validated every --val-every epochs and at "
                                              "the end")
    val_groundtruth: str | None = option(None, help="AVA groundtruth CSV of the val split (for val mAP)")
    labelmap: str | None = option(None, help="AVA pbtxt label map of the evaluated classes (for val mAP)")
    window: int = option(6, help="keyframes per window (the paper's batch size); windows never cross clips")
    in_memory: bool = option(False, help="load the stores' window arrays into RAM in each rank (forked loader "
                                         "workers share the rank's copy); --memmap-dir shares one copy per node")
    memmap_dir: str | None = option(None, help="decompress the stores once per node into .npy files in this "
                                               "directory (a local disk or /dev/shm) and memory-map them: one copy "
                                               "shared by all the node's ranks and loader workers")

    def __post_init__(self) -> None:
        _ = self.train_split  # made, and so validated, once: here
        _at_least(window=(self.window, 1), shuffle_buffer=(self.shuffle_buffer, 1))

    @cached_property
    def train_split(self) -> SplitConfig:
        """The training split: exactly one of --train-store and --train-shards, and how to read it."""
        return SplitConfig(self.train_store, self.train_shards, self.shards_manifest, in_memory=self.in_memory,
                           memmap_dir=self.memmap_dir, shuffle_buffer=self.shuffle_buffer,
                           store_flag="--train-store", shards_flag="--train-shards")


@dataclass(frozen=True)
class OptimConfig:
    """The optimisation: Adam with the published LR for one window per step, scaled with the batch."""

    epochs: int = option(50, help="epochs to train (the published train.py default)")
    max_steps: int = option(0, help="stop after this many optimizer steps in total (0: no limit)")
    windows_per_step: int = option(1, help="windows per optimizer step on each rank")
    lr: float = option(PUBLISHED_LR, help="Adam learning rate for ONE window per step (the published recipe)")
    lr_scaling: Literal["none", "linear", "sqrt"] = option(DEFAULT_RULE, help="how the LR grows with the effective "
                                                                              "batch B (windows per step x ranks): "
                                                                              "none 1, sqrt sqrt(B) (measured best, "
                                                                              "README 'Scaling out'), linear B")
    warmup_steps: int = option(0, help="linear LR warmup steps (> 0: overrides --warmup-keyframes)")
    warmup_keyframes: int = option(DEFAULT_WARMUP_KEYFRAMES, help="linear LR warmup over this many keyframes, i.e. "
                                                                  "ceil(K / (window x B)) steps, when the LR is scaled "
                                                                  "up (B > 1 and --lr-scaling sqrt/linear)")
    schedule: Literal["constant", "cosine"] = option("constant", help="LR schedule after warmup")
    optimizer: Literal["adam", "lamb"] = option("adam", help="adam (the published recipe), or lamb: Adam with a "
                                                            "layer-wise trust ratio, its LR a relative step size "
                                                            "(stage_dist/engine/lamb.py; README 'Scaling out')")
    weight_decay: float = option(0.0, help="Adam weight decay")
    grad_clip: float = option(0.0, help="clip the gradient norm to this (0: off)")
    seed: int = option(0, help="seed of weights, window sampling and dropout")

    def __post_init__(self) -> None:
        _at_least(epochs=(self.epochs, 0), max_steps=(self.max_steps, 0), windows_per_step=(self.windows_per_step, 1),
                  warmup_steps=(self.warmup_steps, 0), warmup_keyframes=(self.warmup_keyframes, 0))
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        for flag, value in (("--weight-decay", self.weight_decay), ("--grad-clip", self.grad_clip)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{flag} must be >= 0, got {value}")


@dataclass(frozen=True)
class RunConfig:
    """Checkpoints, validation and logging."""

    checkpoint_every: int = option(0, help="also checkpoint every N steps (0: only at the end of each epoch)")
    keep_last: int = option(3, help="checkpoints kept besides best.pt")
    val_every: int = option(1, help="validate every N epochs (0: only at the end)")
    log_every: int = option(10, help="log loss, lr, keyframes/s every N steps (the loss is read back only then)")
    tensorboard_dir: str | None = option(None, help="TensorBoard log dir (default: OUTPUT_DIR/tensorboard)")
    resume: str = option("auto", help="auto: continue the run in OUTPUT_DIR if it has checkpoints; none: start afresh "
                                      "(refused if OUTPUT_DIR has checkpoints); or a checkpoint to start from when "
                                      "OUTPUT_DIR has none (one of the published code initialises the weights only)")
    preempt_signals: str = option(DEFAULT_PREEMPT_SIGNALS, help="signals that make every rank finish its step, "
                                                                "agree at the next log step, write one checkpoint "
                                                                "and exit 4 (rerun to resume); comma-separated "
                                                                "names, 'none' to keep the default actions")
    checkpoint_every_minutes: float = option(0.0, help="also checkpoint when this many minutes have passed since "
                                                       "the last checkpoint (agreed by all ranks at log steps; "
                                                       "0: off)")
    progress_every_seconds: float = option(DEFAULT_EVERY_SECONDS, help="when stderr is not a terminal (a log "
                                                                      "file), one progress line (step, keyframes/s, "
                                                                      "loss at the last log step, ETA) every this "
                                                                      "many seconds instead of a tqdm bar")

    def __post_init__(self) -> None:
        _at_least(checkpoint_every=(self.checkpoint_every, 0), keep_last=(self.keep_last, 1),
                  val_every=(self.val_every, 0), log_every=(self.log_every, 1))
        try:
            parse_signals(self.preempt_signals)
        except ValueError as err:
            raise ConfigError(f"--preempt-signals: {err}") from None
        if not (math.isfinite(self.checkpoint_every_minutes) and self.checkpoint_every_minutes >= 0):
            raise ConfigError(f"--checkpoint-every-minutes must be >= 0, got {self.checkpoint_every_minutes}")
        if not self.progress_every_seconds > 0:
            raise ConfigError(f"--progress-every-seconds must be > 0, got {self.progress_every_seconds}")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run: the command-line flags, saved as OUTPUT_DIR/config.json, which
    ``--config`` reads back to repeat the run exactly."""

    output_dir: str = option(help="checkpoints, config.json, val results and TensorBoard logs go here")
    data: DataConfig = section(DataConfig, help="data")
    model: ModelSection = section(ModelSection, help="model")
    optim: OptimConfig = section(OptimConfig, help="optimisation")
    runtime: RuntimeConfig = section(RuntimeConfig, help="runtime")
    run: RunConfig = section(RunConfig, help="checkpoints, validation and logging")


def _at_least(**values: tuple[float, float]) -> None:
    for name, (value, low) in values.items():
        if value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
