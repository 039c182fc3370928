"""The training command: ``torchrun -m stage_dist.train`` (``stage-train``), its parser and main.

    torchrun --nproc_per_node=8 -m stage_dist.train --train-store train.zarr --val-store val.zarr \\
        --val-groundtruth ava_val_v2.2.csv --labelmap ava_action_list_v2.2.pbtxt --output-dir runs/stage

The flags are :class:`~stage_dist.engine.train_config.TrainConfig`'s; the run is
:class:`~stage_dist.engine.trainer.Trainer`'s (what it saves, resumes and stops on is described there).
"""

from __future__ import annotations

import argparse

from torch.distributed.elastic.multiprocessing.errors import record

from stage_dist.core.cli import Command, Stop, exit_process
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
    exit_process(main())
