"""Opening a split in either form: the window source of a store or of shards, and the training data.

Training and inference read either a zarr store (random access:
:class:`~stage_dist.data.store_windows.StoreWindowSource`) or WebDataset shards (streaming:
:class:`~stage_dist.data.tar_windows.TarWindowStream`); both are a
:class:`~stage_dist.data.window_source.WindowSource` and give the model the same windows.
:func:`open_window_source` picks one from the command line's paths; :func:`open_train_data` adds
the training loader (:class:`TrainData`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import DataLoader

from stage_dist.data.batch import Padding
from stage_dist.data.split_config import SplitConfig
from stage_dist.data.store_windows import StoreWindowSource
from stage_dist.data.tar_windows import TarWindowStream
from stage_dist.data.window_source import SHUFFLE_BUFFER, WindowSource
from stage_dist.store.feature_store import FeatureStore


def open_window_source(
    *,
    store: str | None = None,
    shards: str | None = None,
    window: int = 6,
    windows_per_step: int = 1,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    in_memory: bool = False,
    memmap_dir: str | None = None,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    shards_manifest: str | None = None,
) -> WindowSource:
    """A split from a store path or a shard URL pattern (exactly one of them); ``shards_manifest``:
    the shards' manifest.json (a path or URL) when it is not beside the first shard (``pipe:`` URLs)."""
    if (store is None) == (shards is None):
        raise ValueError("give exactly one of a store or shards")
    if shards is not None:
        return TarWindowStream(shards, window=window, windows_per_step=windows_per_step, rank=rank,
                                 world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer,
                                 manifest=shards_manifest)
    assert store is not None
    feature_store = FeatureStore.open(store, in_memory=in_memory, memmap_dir=memmap_dir)
    return StoreWindowSource(feature_store, window=window, windows_per_step=windows_per_step, rank=rank,
                             world_size=world_size, seed=seed)


@dataclass
class TrainData:
    """The training data as the trainer sees it, whichever form it is stored in: ``source`` is
    the window source (its per-epoch schedule, ``steps_for_epoch`` and ``len``, the same on every
    rank, and its position, ``state_dict``/``load_state_dict``), ``loader`` its batches,
    ``location`` its path or URL pattern for messages."""

    source: WindowSource
    loader: DataLoader
    actor_dim: int
    object_dim: int
    num_keyframes: int
    num_clips: int
    location: str


def open_train_data(split: SplitConfig, *, window: int, windows_per_step: int, seed: int, rank: int, world_size: int,
                    num_workers: int, pin_memory: bool, padding: Padding = Padding()) -> TrainData:
    """This rank's training data from ``split``: windows of ``window`` keyframes, ``windows_per_step``
    per step, shuffled by ``seed``; the loader collates with ``padding``."""
    source = open_window_source(store=split.store, shards=split.shards, window=window,
                                windows_per_step=windows_per_step, rank=rank, world_size=world_size, seed=seed,
                                in_memory=split.in_memory, memmap_dir=split.memmap_dir,
                                shuffle_buffer=split.shuffle_buffer, shards_manifest=split.shards_manifest)
    loader = source.train_loader(num_workers=num_workers, pin_memory=pin_memory, padding=padding)
    return TrainData(source, loader, source.actor_dim, source.object_dim, source.num_keyframes, source.num_clips,
                     source.location)
