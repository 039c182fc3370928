"""Which split a command reads and how: a feature store or tar shards, exactly one of them.

:class:`SplitConfig` owns the choice between a zarr feature store (random access) and
WebDataset tar shards (streaming) and validates it once, when it is made. The commands build it
from their own flags (train: ``--train-store``/``--train-shards``, infer: ``--store``/``--shards``;
their config.json keys stay theirs), and the loaders read it
(:func:`stage_dist.data.splits.open_train_data`).

This module imports neither torch nor numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

from stage_dist.core.config import ConfigError
from stage_dist.data.window_source import SHUFFLE_BUFFER


@dataclass(frozen=True)
class SplitConfig:
    """A split given as a store path or a shard URL pattern (exactly one), with how to read it.

    ``shards_manifest``: the shards' manifest.json (a path or URL) when it is not beside the
    first shard (``pipe:`` URLs). ``in_memory``/``memmap_dir`` apply to a store,
    ``shuffle_buffer`` to shards. ``store_flag``/``shards_flag`` name the command's flags in
    the messages."""

    store: str | None = None
    shards: str | None = None
    shards_manifest: str | None = None
    in_memory: bool = False
    memmap_dir: str | None = None
    shuffle_buffer: int = SHUFFLE_BUFFER
    store_flag: str = "--store"
    shards_flag: str = "--shards"

    def __post_init__(self) -> None:
        if (self.store is None) == (self.shards is None):
            raise ConfigError(f"give exactly one of {self.store_flag} and {self.shards_flag}")
        if self.shards_manifest is not None and self.shards is None:
            raise ConfigError(f"--shards-manifest is the manifest of {self.shards_flag}: give {self.shards_flag} too")
