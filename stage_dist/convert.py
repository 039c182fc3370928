"""Parallel, resumable, verified conversion of the published HDF5 features into a feature store.

The run, in order:

1. **List and scan** the source (names, then shapes only, in parallel by clip): every
   structural problem is found before anything is written, and the row counts give the
   store's CSR pointers and shard grid. Clips are ordered by video id, keyframes by timestamp.
2. **Create** the store (tables and empty row arrays, attribute ``complete: false``), or find
   the same store from an interrupted run with the same plan and resume it.
3. **Convert** shard by shard: a task owns one shard-aligned row range of ``actors/*`` or of
   ``objects/*``; it reads the keyframes overlapping its rows, validates and pools them,
   streams each shard's chunks into its file (index last, then renamed into place; memory is
   one chunk per array, not one shard) and then records the shard as done. Tasks run in
   ``--workers`` processes (one writer per shard, largest first); a killed run loses at most
   the shards in flight.
4. **Finish**: set ``complete: true``. ``--verify`` then re-reads the sources and compares every
   keyframe (or a sample) with the store after the pooling/dtype rule, reading only the rows of
   the keyframes it checks. Box coordinates within ``--box-tolerance`` outside [0, 1] are
   clipped (and counted in the summary); further out they are an error.

Before any of it, the output is checked (:mod:`stage_dist.core.outputs`): it must not be, contain or
lie inside an input; an existing directory must be empty or a store this converter wrote
(``--overwrite`` empties only such a store, keeping the directory); and the run holds the
output's lock, so a second converter writing the same ``--out`` stops at once.

A rerun resumes only a store of the same plan; the store records each source file's size and
mtime (per clip for actor files), and the shards that depend on a file that changed since are
converted again, so nothing stale is reported complete. A rerun on a complete store compares
those records only (:func:`unchanged_store`: no HDF5 file is opened) and scans again only when
one differs.

A write error (disk full) or SIGTERM/SIGINT (:func:`main` turns both signals into
:class:`Interrupted`, exit 128 + signal number) stops the workers, removes the partial files of
the shards in flight (:func:`drop_partial_files`) and releases the lock: the finished shards stay
recorded and the next run resumes.

Errors in the input stop the run with :class:`~stage_dist.ingest.published_hdf5.ReaderError` (file and key
named), errors of the output with :class:`~stage_dist.core.outputs.OutputError`; the CLI prints
them on one line and exits 2. Verification mismatches exit 1.
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
