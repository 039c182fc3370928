"""``python -m stage_dist.shards`` (``stage-shards``): write a feature store as WebDataset tar
shards, or rebuild the store from its shards.

The tar format (sample codec, writer, manifest and URLs) is :mod:`stage_dist.store.tar_shards`; the
training stream over shards is :mod:`stage_dist.data.tar_windows`.

    python -m stage_dist.shards stores/train.zarr shards/train/ --max-shard-mb 512
    python -m stage_dist.shards --to-store 'shards/train/train-{000000..000063}.tar' stores/train.zarr
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Sequence

from stage_dist.core.cli import Command
from stage_dist.core.config import build_parser as build_config_parser, option, parse_config
from stage_dist.core.errors import EXIT_OK
from stage_dist.core.paths import check_target
from stage_dist.store.feature_store import FeatureStore
from stage_dist.store.schema import DEFAULT_TAR_SHARD_MB
from stage_dist.store.tar_shards import shard_pattern, shards_to_store, write_shards


@dataclass(frozen=True)
class ShardsConfig:
    """The arguments of ``python -m stage_dist.shards``."""

    store: str = option(positional=True, help="feature store (zarr group of one split) to write as shards; with "
                                              "--to-store, the shards to read (a brace pattern such as "
                                              "'DIR/train-{000000..000007}.tar')")
    out_dir: str = option(positional=True, help="directory for the .tar shards and manifest.json; with --to-store, "
                                                "the store to write (absent or empty; see --overwrite)")
    to_store: bool = option(False, help="the other way: rebuild a store (every array, attributes included) from "
                                        "shards")
    overwrite: bool = option(False, help="with --to-store: replace a feature store at OUT_DIR")
    prefix: str | None = option(None, help="shard name prefix (default: the store's split)")
    max_shard_mb: float = option(float(DEFAULT_TAR_SHARD_MB), help="shard size limit in MiB")
    window: int | None = option(None, help="one sample per window of this many keyframes (default: one sample per "
                                           "clip)")


def build_parser() -> argparse.ArgumentParser:
    return build_config_parser(
        ShardsConfig, prog="python -m stage_dist.shards",
        description="Write a feature store as WebDataset tar shards plus manifest.json (one split per directory); "
                    "with --to-store, rebuild the store from its shards.")


SHARDS_COMMAND = Command(every_os_error=True)  # the filesystem refused a write (disk full, permissions)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_config(ShardsConfig, argv, build_parser())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return SHARDS_COMMAND.run(lambda: _convert(args), paths={"OUT_DIR": args.out_dir}, writing="OUT_DIR")


def _convert(args: ShardsConfig) -> int:
    if args.to_store:
        if not os.path.exists(args.out_dir) or os.path.isdir(args.out_dir):  # (a file: refused below)
            check_target(args.out_dir, "OUT_DIR", kind="dir")
        store = shards_to_store(args.store, args.out_dir, overwrite=args.overwrite)
        print(f"{store.num_clips} clips, {store.num_keyframes} keyframes, {store.num_actors} actors -> {store.path}")
        return EXIT_OK
    manifest = write_shards(FeatureStore.open(args.store), args.out_dir, prefix=args.prefix,
                            max_shard_bytes=int(args.max_shard_mb * (1 << 20)), window=args.window, what="OUT_DIR")
    print(
        f"{manifest['num_shards']} shards, {manifest['num_samples']} samples, {manifest['num_clips']} clips, "
        f"{manifest['num_keyframes']} keyframes: {shard_pattern(manifest, args.out_dir)}"
    )
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
