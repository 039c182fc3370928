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

import argparse

from torch.distributed.elastic.multiprocessing.errors import record

from stage_dist.core.cli import Command, Stop
from stage_dist.core.config import (
    build_parser as build_config_parser,
    parse_config,
)
from stage_dist.core.errors import EXIT_NON_FINITE, EXIT_OK, EXIT_PREEMPTED
from stage_dist.engine.distributed import (
    DistEnv,
    cleanup,
    configure_threads,
    init_distributed,
    setup_logging,
)
from stage_dist.engine.nonfinite import NonFiniteError
from stage_dist.engine.preemption import PreemptedError
from stage_dist.engine.train_config import TrainConfig
from stage_dist.engine.trainer import Trainer, prepare_run, run_lock, train_paths


def build_parser() -> argparse.ArgumentParser:
    return build_config_parser(
        TrainConfig, prog="torchrun --nproc_per_node=N -m stage_dist.train",
        description="Train STAGE (or the no-graph baseline) on a feature store with DDP. A plain `python -m "
                    "stage_dist.train` runs with world size 1. `--config OUTPUT_DIR/config.json` repeats a run.\n"
                    "Exit codes: 0 ok, 2 bad input (one line naming it), 3 non-finite loss or weights, 4 "
                    "preempted (a --preempt-signals signal: checkpoint written, rerun to resume).")


TRAIN_COMMAND = Command(to_launcher=True, stops=(
    Stop(NonFiniteError, EXIT_NON_FINITE, prefix="error: training stopped: ", main_rank_only=True),
    Stop(PreemptedError, EXIT_PREEMPTED, prefix="stopped: ", main_rank_only=True),
))


@record  # an uncaught exception's traceback reaches torchrun's failure summary
def main(argv: list[str] | None = None) -> int:
    config = parse_config(TrainConfig, argv, build_parser())
    return TRAIN_COMMAND.run(lambda: train(config), paths=train_paths(config))


def train(config: TrainConfig) -> int:
    """One training run on this rank, from the checks before the process group to its cleanup."""
    env: DistEnv | None = None
    try:
        prepare_run(config)  # before the lock and the process group: every rank fails the same way, at once
        with run_lock(config):  # rank 0: one training run per output directory
            env = init_distributed(config.runtime.device, config.runtime.dist_timeout)
            setup_logging(env)
            configure_threads(config.runtime.threads, env, config.runtime.workers)
            with Trainer(config, env, prepared=True) as trainer:
                summary = trainer.fit()
        if env.is_main:
            val = "n/a" if summary.val_map is None else f"{summary.val_map:.4f}"
            best = "n/a" if summary.best_map is None else f"{summary.best_map:.4f}"
            saved = (f"checkpoints in {summary.checkpoint_dir}" if summary.checkpoint_dir is not None else
                     f"nothing to train (epoch {summary.epochs_completed} of --epochs {config.optim.epochs}): "
                     "no checkpoint written")
            print(f"done: {summary.global_step} steps, {summary.epochs_completed} epochs, "
                  f"val mAP {val} (best {best}); {saved}")
    finally:
        if env is not None:
            cleanup(env)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
