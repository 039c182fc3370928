"""DataLoaders: training steps and inference windows, from a feature store or from shards.

Training reads either a zarr store (random access) or WebDataset shards (streaming); both give
the model the same windows. A training step is the list of
:class:`~stage_dist.batch.WindowSpec` that the clip-aware sampler yields; a DataLoader worker
reads each window with one slice read per array and collates them into one block-diagonal
:class:`~stage_dist.batch.Batch`, graph included (built there, on the host; see
:class:`~stage_dist.batch.Padding` for the batch shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stage_dist.batch import Batch, Padding, Window, WindowSpec, collate
from stage_dist.sampler import ClipWindowSampler, InferenceWindow
from stage_dist.shards import ShardWindowStream
from stage_dist.store import FeatureStore


class WindowDataset(Dataset):
    """Map-style dataset whose keys are window specs (or inference windows)."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    def __getitem__(self, key: WindowSpec | InferenceWindow) -> Window | tuple[Window, InferenceWindow]:
        if isinstance(key, InferenceWindow):
            return self.store.read_window(key.spec), key
        return self.store.read_window(key)


class InferenceCollate:
    """Collate inference windows with the inference's :class:`Padding`; also return which actors
    each window owns (predicts)."""

    def __init__(self, padding: Padding) -> None:
        self.padding = padding

    def __call__(self, items: Sequence[tuple[Window, InferenceWindow]]) -> tuple[Batch, torch.Tensor]:
        batch = collate([window for window, _ in items], self.padding)
        return batch, owned_actors(batch, [plan for _, plan in items])


def owned_actors(batch: Batch, plans: Sequence[InferenceWindow]) -> torch.Tensor:
    """Which actors of ``batch`` lie in the keyframes their window predicts."""
    keep_start = torch.tensor([plan.keep_start for plan in plans], dtype=torch.int64)
    keep_stop = torch.tensor([plan.keep_stop for plan in plans], dtype=torch.int64)
    frame, window_id = batch.actor_frame, batch.actor_window
    return (frame >= keep_start[window_id]) & (frame < keep_stop[window_id])


def max_nodes_per_keyframe(store: FeatureStore) -> int:
    return int((np.diff(store.actor_ptr) + np.diff(store.object_ptr)).max(initial=0))

def _loader_options(num_workers: int, pin_memory: bool) -> dict:
    options: dict = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    return options


def train_loader(
    store: FeatureStore, sampler: ClipWindowSampler, *, num_workers: int, pin_memory: bool,
    padding: Padding = Padding(),
) -> DataLoader:
    """One batch per optimizer step, in the sampler's order.

    The loader gets its own generator so that creating an iterator (each epoch, or on a
    mid-epoch resume) never consumes the global torch RNG, which dropout uses: exact resume
    depends on it.
    """
    return DataLoader(
        WindowDataset(store),
        batch_sampler=sampler,
        collate_fn=partial(collate, padding=padding),
        generator=torch.Generator(),
        **_loader_options(num_workers, pin_memory),
    )


def inference_loader(
    store: FeatureStore,
    plans: Sequence[InferenceWindow],
    *,
    windows_per_batch: int,
    num_workers: int,
    pin_memory: bool,
    padding: Padding,
) -> DataLoader:
    """Batches of ``windows_per_batch`` inference windows, in the given order, collated with
    ``padding`` (see :class:`InferenceCollate`)."""
    batches = [list(plans[i : i + windows_per_batch]) for i in range(0, len(plans), windows_per_batch)]
    return DataLoader(
        WindowDataset(store),
        batch_sampler=batches,
        collate_fn=InferenceCollate(padding),
        generator=torch.Generator(),
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


@dataclass
class TrainData:
    """The training data as the trainer sees it, whichever form it is stored in.

    ``steps`` is the per-epoch schedule: a :class:`ClipWindowSampler` over a store or a
    :class:`ShardWindowStream` over shards; both have ``set_epoch``, ``load_state_dict`` (resume
    mid-epoch), ``steps_for_epoch`` and ``len`` (the same on every rank).
    """

    steps: ClipWindowSampler | ShardWindowStream
    loader: DataLoader
    actor_dim: int
    object_dim: int
    num_keyframes: int
    num_clips: int
    source: str


def open_train_data(
    *,
    store: str | None,
    shards: str | None,
    window: int,
    windows_per_step: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    in_memory: bool = False,
    memmap_dir: str | None = None,
    shuffle_buffer: int = 1000,
    padding: Padding = Padding(),
) -> TrainData:
    if (store is None) == (shards is None):
        raise ValueError("give exactly one of a training store (--train-store) or shards (--train-shards)")
    if shards is not None:
        stream = ShardWindowStream(shards, window=window, windows_per_step=windows_per_step, rank=rank,
                                   world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer)
        # Workers are not persistent: each epoch's iterator must see the stream's new epoch.
        loader = DataLoader(stream, batch_size=None, collate_fn=partial(collate, padding=padding),
                            num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator())
        manifest = stream.manifest
        return TrainData(stream, loader, manifest["actor_dim"], manifest["object_dim"],
                         manifest["num_keyframes"], manifest["num_clips"], shards)
    feature_store = FeatureStore.open(store, in_memory=in_memory, memmap_dir=memmap_dir)
    sampler = ClipWindowSampler(feature_store.clip_lengths, window=window, windows_per_step=windows_per_step,
                                rank=rank, world_size=world_size, seed=seed)
    loader = train_loader(feature_store, sampler, num_workers=num_workers, pin_memory=pin_memory, padding=padding)
    return TrainData(sampler, loader, feature_store.actor_dim, feature_store.object_dim,
                     feature_store.num_keyframes, feature_store.num_clips, str(feature_store.path))
