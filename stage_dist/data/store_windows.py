"""The store path of the window-source contract: a split read from a zarr feature store.

A training step is the list of :class:`~stage_dist.store.window.WindowSpec` that the clip-aware
sampler yields; a DataLoader worker reads each window with one slice read per array and collates
them into one block-diagonal :class:`~stage_dist.data.batch.Batch`. The graph itself is built there
too, on the host (see :class:`~stage_dist.data.batch.Padding` for the batch shapes). The shard path,
its sibling, is :mod:`stage_dist.data.tar_windows`; both build their loaders from
:mod:`stage_dist.data.loaders`.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stage_dist.data.batch import Padding, collate
from stage_dist.data.loaders import InferenceCollate, TrainLoader, worker_options
from stage_dist.data.sampler import ClipWindowSampler, plan_inference_windows, rank_slice
from stage_dist.data.window_source import KeyframeNamer
from stage_dist.store.feature_store import FeatureStore
from stage_dist.store.window import InferenceWindow, Window, WindowSpec, max_nodes_per_keyframe


class WindowDataset(Dataset):
    """Map-style dataset whose keys are window specs (or inference windows)."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    def __getitem__(self, key: WindowSpec | InferenceWindow) -> Window | tuple[Window, InferenceWindow]:
        if isinstance(key, InferenceWindow):
            return self.store.read_window(key.spec), key
        return self.store.read_window(key)


def train_loader(
    store: FeatureStore, sampler: ClipWindowSampler, *, num_workers: int, pin_memory: bool, padding: Padding
) -> TrainLoader:
    """One batch per optimizer step, in the sampler's order; it moves the sampler's position."""
    return TrainLoader(sampler, WindowDataset(store), batch_sampler=sampler,
                       collate_fn=partial(collate, padding=padding), pin_memory=pin_memory,
                       **worker_options(num_workers, persistent=True))


def inference_loader(
    store: FeatureStore,
    plans: Sequence[InferenceWindow],
    *,
    windows_per_batch: int,
    num_workers: int,
    pin_memory: bool,
    padding: Padding,
) -> DataLoader:
    """Batches (:class:`~stage_dist.data.window_source.InferenceBatch`) of ``windows_per_batch``
    inference windows, in the given order, collated with ``padding``."""
    batches = [list(plans[i : i + windows_per_batch]) for i in range(0, len(plans), windows_per_batch)]
    return DataLoader(
        WindowDataset(store),
        batch_sampler=batches,
        collate_fn=InferenceCollate(padding),
        generator=torch.Generator(),
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


class StoreWindowSource:
    """A :class:`~stage_dist.data.window_source.WindowSource` over a feature store: the training
    schedule and its position are a :class:`ClipWindowSampler` over the store's clips, inference
    windows are :func:`~stage_dist.data.sampler.plan_inference_windows` split contiguously over ranks."""

    def __init__(self, store: FeatureStore, *, window: int = 6, windows_per_step: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        self.store = store
        self.sampler = ClipWindowSampler(store.clip_lengths, window=window, windows_per_step=windows_per_step,
                                         rank=rank, world_size=world_size, seed=seed)
        self.actor_dim, self.object_dim = store.actor_dim, store.object_dim
        self.class_ids = store.class_ids
        self.num_clips, self.num_keyframes, self.num_actors = store.num_clips, store.num_keyframes, store.num_actors
        self.max_nodes_per_keyframe = max_nodes_per_keyframe(store.actor_ptr, store.object_ptr)
        self.location = str(store.path)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def step(self) -> int:
        return self.sampler.step

    def steps_for_epoch(self, epoch: int) -> int:
        return self.sampler.steps_for_epoch(epoch)

    def padded_windows(self, epoch: int) -> int:
        return self.sampler.padded_windows(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self, step: int | None = None) -> dict:
        return self.sampler.state_dict(step)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def keyframe_namer(self) -> KeyframeNamer:
        store = self.store
        return KeyframeNamer(np.asarray(store.clip_ptr), list(store.video_ids), np.asarray(store.timestamps))

    def train_loader(self, *, num_workers: int, pin_memory: bool, padding: Padding = Padding()) -> TrainLoader:
        return train_loader(self.store, self.sampler, num_workers=num_workers, pin_memory=pin_memory, padding=padding)

    def inference_batches(self, rank: int, world_size: int, *, window: int, context: int, windows_per_batch: int,
                          padding: Padding, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
        plans = plan_inference_windows(self.store.clip_lengths, window, context=context)
        return inference_loader(self.store, rank_slice(plans, rank, world_size), windows_per_batch=windows_per_batch,
                                num_workers=num_workers, pin_memory=pin_memory, padding=padding)
