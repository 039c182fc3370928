"""The inference command: every (keyframe, actor) of a store or shards predicted exactly once, one results.csv.

The library (windows, scoring, gathering, the exactly-once check, writing) is
:mod:`stage_dist.engine.inference`; this module is its command line: it checks every flag and path
before any work, loads the models with :func:`stage_dist.engine.checkpoint.load_models`, and has rank 0 write
``results.csv`` atomically (never over an input, never over a file that is not a results CSV).

    python -m stage_dist.infer --store val.zarr --checkpoint best.pt --out results.csv
    torchrun --nproc_per_node=8 -m stage_dist.infer --store val.zarr --checkpoint best.pt --out results.csv
    python -m stage_dist.infer --store val.zarr --checkpoint seed0.pt seed1.pt seed2.pt --out ensemble.csv

Several checkpoints are an ensemble (:func:`~stage_dist.engine.checkpoint.load_models`): they must
agree on the model's outputs (the class set) and feature sizes, and every actor gets the mean of
their sigmoid scores, in one pass over the data (:func:`~stage_dist.engine.inference.predict`).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from stage_dist.ava.formats import read_labelmap
from stage_dist.core.cli import Command, Stop, exit_process
from stage_dist.core.config import (
    ConfigError,
    RuntimeConfig,
    build_parser as build_config_parser,
    option,
    parse_config,
    section,
)
from stage_dist.core.errors import EXIT_NON_FINITE, EXIT_OK, UserInputError
from stage_dist.core.fileio import remove_stale_temporaries
from stage_dist.core.outputs import check_output_file, launch_lock
from stage_dist.core.paths import user_path_errors
from stage_dist.core.progress import DEFAULT_EVERY_SECONDS
from stage_dist.data.split_config import SplitConfig
from stage_dist.data.splits import open_window_source
from stage_dist.engine.checkpoint import load_models
from stage_dist.engine.distributed import (
    DistEnv,
    cleanup,
    configure_determinism,
    configure_threads,
    init_distributed,
    loader_workers,
    setup_logging,
)
from stage_dist.engine.inference import (
    INFERENCE_WINDOW,
    INFERENCE_WINDOWS_PER_BATCH,
    non_finite_scores,
    predict,
    write_predictions,
)
from stage_dist.engine.precision import resolve_precision
from stage_dist.model.stage import compile_model
from stage_dist.store.schema import describe_classes
from stage_dist.store.tar_shards import expand_urls, manifest_location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferConfig:
    """Every setting of ``python -m stage_dist.infer``."""

    checkpoint: tuple[str, ...] = option(help="checkpoint file of stage_dist.train or of the published STAGE code, or "
                                              "a run's checkpoints/ directory (its newest); several: an ensemble "
                                              "(the mean of their sigmoid scores, one pass over the data)")
    out: str = option(help="results.csv to write (atomically)")
    store: str | None = option(None, help="feature store (zarr) to predict")
    shards: str | None = option(None, help="WebDataset shards to predict instead of a store: a brace pattern such as "
                                           "'DIR/val-{000000..000007}.tar' (manifest.json beside them), or URLs "
                                           "('https://...', 'pipe:CMD' with --shards-manifest)")
    shards_manifest: str | None = option(None, help="manifest.json of --shards (a path or URL) when it is not beside "
                                                    "the first shard, e.g. for 'pipe:aws s3 cp s3://b/val-{000000.."
                                                    "000007}.tar -' shards")
    window: int = option(INFERENCE_WINDOW, help="keyframes predicted per window (2 keyframes of context on each "
                                                "side are added); the scores do not depend on it")
    windows_per_batch: int = option(INFERENCE_WINDOWS_PER_BATCH, help="windows per forward pass")
    labelmap: str | None = option(None, help="pbtxt label map: write only its classes")
    topk: int | None = option(None, help="write only the K best actions per box (1..the store's class count)")
    min_score: float = option(0.0, help="write only scores >= this")
    progress_every_seconds: float = option(DEFAULT_EVERY_SECONDS, help="when stderr is not a terminal (a log file), "
                                                                      "one progress line every this many seconds "
                                                                      "instead of a tqdm bar")
    runtime: RuntimeConfig = section(RuntimeConfig, help="runtime")

    def __post_init__(self) -> None:
        _ = self.split  # made, and so validated, once: here
        for flag, value in (("--window", self.window), ("--windows-per-batch", self.windows_per_batch)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.topk is not None and self.topk < 1:  # its upper bound is the store's class count (run)
            raise ConfigError(f"--topk must be >= 1 (actions per box), got {self.topk}")
        if not self.progress_every_seconds > 0:
            raise ConfigError(f"--progress-every-seconds must be > 0, got {self.progress_every_seconds}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"--min-score must be in [0, 1] (scores are sigmoids), got {self.min_score}")

    @cached_property
    def split(self) -> SplitConfig:
        """The split to predict: exactly one of --store and --shards."""
        return SplitConfig(self.store, self.shards, self.shards_manifest)


class InferArgumentError(UserInputError):
    """A label map or output path of the inference CLI that cannot work; found before any work."""


class NonFiniteScoresError(Exception):
    """The predicted scores hold NaN or Inf (exit code 3): results.csv is not written."""


def _looks_like_results_csv(path: Path) -> bool:
    """An empty file, or text whose first line has the 8 columns of an AVA results row."""
    with open(path, "rb") as handle:
        head = handle.read(65536)
    if not head:
        return True
    try:
        first = head.decode("utf-8-sig").splitlines()[0]
    except (UnicodeDecodeError, IndexError):
        return False
    return first.count(",") == 7


def check_inputs(config: InferConfig) -> dict[int, str] | None:
    """The label map and ``--out``, checked before any process group or model; returns the label map."""
    labelmap = read_labelmap(config.labelmap) if config.labelmap else None
    if labelmap is not None:
        if not labelmap:
            raise InferArgumentError(f"{config.labelmap}: the label map holds no classes; nothing would be written")
    inputs = [*(("--checkpoint", checkpoint) for checkpoint in config.checkpoint), ("--labelmap", config.labelmap),
              ("--store", config.store)]
    if config.shards:
        local = [url for url in expand_urls(config.shards) if "://" not in url and not url.startswith("pipe:")]
        inputs += [("--shards", url) for url in local]
        if config.shards_manifest is not None:
            remote = "://" in config.shards_manifest or config.shards_manifest.startswith("pipe:")
            inputs += [] if remote else [("--shards-manifest", config.shards_manifest)]
        else:
            inputs += [("manifest", manifest_location(url)) for url in local[:1]]
    out = check_output_file(config.out, inputs=inputs)
    if out.exists() and not _looks_like_results_csv(out):
        raise InferArgumentError(f"{config.out}: exists and is not an AVA results CSV; refusing to replace it "
                                 "(remove it or give another --out)")
    return labelmap


def check_classes(config: InferConfig, store_classes: Sequence[int], labelmap_ids: set[int] | None,
                  location: str) -> None:
    """``--labelmap`` ids and ``--topk`` against the store's class set (before the model is loaded)."""
    if labelmap_ids is not None:
        outside = sorted(set(labelmap_ids) - set(store_classes))
        if outside:
            raise InferArgumentError(f"{config.labelmap}: class id(s) {', '.join(map(str, outside[:5]))} are not among "
                                     f"the {describe_classes(tuple(store_classes))} of {location}, the classes the "
                                     "model predicts")
    if config.topk is not None and config.topk > len(store_classes):
        raise InferArgumentError(f"--topk must be in 1..{len(store_classes)} (the classes of {location}), "
                                 f"got {config.topk}")


def build_parser() -> argparse.ArgumentParser:
    return build_config_parser(
        InferConfig, prog="python -m stage_dist.infer",
        description="Predict every actor of a feature store (or its shards) once, on 1..N ranks, and write one "
                    "AVA results.csv.\nExit codes: 0 ok, 2 bad input (one line naming it), 3 non-finite scores.")


INFER_COMMAND = Command(to_launcher=True, stops=(Stop(NonFiniteScoresError, EXIT_NON_FINITE),))


@record  # an uncaught exception's traceback reaches torchrun's failure summary
def main(argv: list[str] | None = None) -> int:
    config = parse_config(InferConfig, argv, build_parser())
    return INFER_COMMAND.run(lambda: infer(config), paths={"--out": config.out})


def infer(config: InferConfig) -> int:
    """One inference job on this rank, from the checks before the process group to its cleanup."""
    env: DistEnv | None = None
    try:
        labelmap = check_inputs(config)  # fail before the process group and the compute
        configure_determinism(config.runtime.deterministic)  # before CUDA starts (cuBLAS reads its env)
        with launch_lock(config.out):  # rank 0 holds --out for the whole job: a second one stops at once
            env = init_distributed(config.runtime.device, config.runtime.dist_timeout)
            setup_logging(env)
            configure_threads(config.runtime.threads, env, config.runtime.workers)
            return run(config, env, set(labelmap) if labelmap else None)
    finally:
        if env is not None:
            cleanup(env)


def run(config: InferConfig, env: DistEnv, class_ids: set[int] | None) -> int:
    """Predict, and on rank 0 write ``config.out``; the exit code."""
    runtime = config.runtime
    started = time.perf_counter()
    precision = resolve_precision(runtime.amp, env.device)
    source = open_window_source(store=config.store, shards=config.shards, shards_manifest=config.shards_manifest)
    check_classes(config, source.class_ids, class_ids, source.location)
    models = load_models(config.checkpoint, source.actor_dim, source.object_dim, env.device, source.class_ids,
                         source.location)
    if runtime.compile:
        for model in models:
            compile_model(model, env.device)
    result = predict(models, source, env, window=config.window, windows_per_batch=config.windows_per_batch,
                     precision=precision, num_workers=loader_workers(runtime.workers, env),
                     progress_every_seconds=config.progress_every_seconds)
    if result is None:  # not rank 0
        return EXIT_OK
    remove_stale_temporaries(config.out)  # a killed run's partial file (rank 0 holds --out's lock)
    predictions, keyframes = result.predictions, result.keyframes
    if len(models) > 1:
        log.info("ensemble of %d checkpoints: %s", len(models), ", ".join(config.checkpoint))
    problem = non_finite_scores(predictions, keyframes)
    if problem:
        raise NonFiniteScoresError(f"{source.location}: {problem}; {config.out} not written")
    with user_path_errors({"--out": config.out}, writing="--out"):
        rows = write_predictions(config.out, predictions, keyframes, class_ids=class_ids, topk=config.topk,
                                 min_score=config.min_score, column_ids=source.class_ids)
    seconds = time.perf_counter() - started
    num_keyframes = len(keyframes.timestamps)
    print(f"inference: {num_keyframes} keyframes, {len(predictions.actor_index)} actors, {rows} rows -> {config.out} "
          f"in {seconds:.1f} s ({num_keyframes / seconds:.0f} keyframes/s, {env.world_size} rank(s))")
    return EXIT_OK


if __name__ == "__main__":
    exit_process(main())
