"""The conversion command: ``python tools/convert_features.py`` (``stage-convert``), its parser and main.

    python tools/convert_features.py --actors-dir ACTORS --objects-file objects.h5 --out train.zarr --verify

The conversion (list, scan, create, convert shard by shard, finish, verify) is
:mod:`stage_dist.ingest.conversion`'s; ``--format webdataset`` also writes the tar form
(:mod:`stage_dist.store.tar_shards`).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import threading
from dataclasses import replace

from stage_dist.core.cli import Command, Stop
from stage_dist.core.config import build_parser as build_config_parser, parse_config
from stage_dist.core.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGNAL_BASE
from stage_dist.core.outputs import (
    check_not_input,
    lock_output,
    resolve_output,
)
from stage_dist.ingest.conversion import (
    STOP_SIGNALS,
    ConvertConfig,
    ConvertError,
    Interrupted,
    _raise_interrupted,
    config_inputs,
    convert,
    shards_out,
    store_out,
)
from stage_dist.store.feature_store import (
    FeatureStore,
)
from stage_dist.store.tar_shards import ShardError, shard_pattern, write_shards

# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    return build_config_parser(
        ConvertConfig, prog="convert_features",
        description="Convert published STAGE features (I3D layout: --actors-dir + --objects-file; SlowFast: "
                    "--slowfast-file + --video-list) into a sharded, clip-ordered zarr v3 feature store.\nResumable: "
                    "rerun the same command after an interruption. Exit codes: 0 ok, 1 --verify found mismatches, "
                    "2 bad input or output (disk full included), 130 SIGINT, 143 SIGTERM.")


CONVERT_COMMAND = Command(
    prefix="convert_features: error: ",
    every_os_error=True,  # the filesystem refused a write (disk full, permissions inside --out)
    disk_full_hint="; the finished shards are kept: free space and rerun the same command to resume",
    stops=(Stop(Interrupted, lambda e: EXIT_SIGNAL_BASE + e.signum, prefix="convert_features: ",
                message=lambda e: f"stopped by {signal.Signals(e.signum).name}; the finished shards are kept: "
                                  "rerun the same command to resume"),),
)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(ConvertConfig, argv, build_parser())
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    in_main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
    previous = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS} if in_main_thread else {}
    try:
        return CONVERT_COMMAND.run(lambda: _main(config), writing="--out",
                                   paths={"--out": config.out, "--shards-out": config.streaming.shards_out})
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(config: ConvertConfig) -> int:
    streaming = "webdataset" in config.streaming.format
    store_config = replace(config, out=store_out(config), split=config.split_name)
    if streaming:  # refuse a bad --shards-out before converting
        check_not_input(shards_out(config), [*config_inputs(config), ("the store", store_config.out)],
                        "--shards-out")
    summary = convert(store_config)
    for line in summary.lines():
        print(line)
    if summary.mismatches:
        return EXIT_FAILED
    if streaming:
        print(write_streaming_form(config))
    return EXIT_OK


def write_streaming_form(cfg: ConvertConfig) -> str:
    """Write the finished store as tar shards (:func:`shards_out`); drop the store unless kept."""
    store, target = store_out(cfg), shards_out(cfg)
    try:
        manifest = write_shards(FeatureStore.open(store), target, what="--shards-out",
                                max_shard_bytes=int(cfg.streaming.tar_shard_mb * (1 << 20)),
                                window=cfg.streaming.tar_window)
    except ShardError as e:
        raise ConvertError(str(e)) from e
    if store != cfg.out:  # the temporary store of --format webdataset, written by this run
        with lock_output(resolve_output(store)):
            shutil.rmtree(store)
    return (f"webdataset: {manifest['num_shards']} shards, {manifest['num_samples']} samples -> "
            f"{shard_pattern(manifest, target)}")


if __name__ == "__main__":
    sys.exit(main())
