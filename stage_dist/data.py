"""The store path of the window-source contract, and opening a split in either form.

Training reads either a zarr store (random access: :class:`StoreWindowSource`) or WebDataset
shards (streaming: :class:`~stage_dist.shard_stream.ShardWindowStream`); both are a
:class:`~stage_dist.window_source.WindowSource` and give the model the same windows. Over a
store, a training step is the list of :class:`~stage_dist.batch.WindowSpec` that the
clip-aware sampler yields; a DataLoader worker reads each window with one slice read per array
and collates them into one block-diagonal :class:`~stage_dist.batch.Batch`. The graph itself is
built there too, on the host (see :class:`~stage_dist.batch.Padding` for the batch shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from stage_dist.batch import Batch, Padding, Window, WindowSpec, collate
from stage_dist.preemption import ignore_stop_signals
from stage_dist.sampler import ClipWindowSampler, InferenceWindow, plan_inference_windows, shard_for_rank
from stage_dist.split_config import SplitConfig
from stage_dist.store import FeatureStore
from stage_dist.window_source import SHUFFLE_BUFFER, InferenceBatch, WindowSource, max_nodes_per_keyframe


class WindowDataset(Dataset):
    """Map-style dataset whose keys are window specs (or inference windows)."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    def __getitem__(self, key: WindowSpec | InferenceWindow) -> Window | tuple[Window, InferenceWindow]:
        if isinstance(key, InferenceWindow):
            return self.store.read_window(key.spec), key
        return self.store.read_window(key)


class InferenceCollate:
    """Collate inference windows with the inference's :class:`~stage_dist.batch.Padding`; also
    return which actors each window owns (predicts)."""

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


class KeyframeCollate:
    """:class:`InferenceCollate` whose batches also name the keyframes they read
    (an :data:`~stage_dist.window_source.InferenceBatch`)."""

    def __init__(self, padding: Padding) -> None:
        self.collate = InferenceCollate(padding)

    def __call__(self, items: Sequence[tuple[Window, InferenceWindow]]) -> InferenceBatch:
        batch, owned = self.collate(items)
        return batch, owned, [(w.keyframe_start, w.video_id, w.timestamps) for w, _ in items]


def _loader_options(num_workers: int, pin_memory: bool) -> dict:
    options: dict = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        # workers ignore SIGTERM/SIGUSR1: the rank handles them (stage_dist.preemption)
        options.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=ignore_stop_signals)
    return options


def train_loader(
    store: FeatureStore, sampler: ClipWindowSampler, *, num_workers: int, pin_memory: bool, padding: Padding
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
    """Batches (:data:`~stage_dist.window_source.InferenceBatch`) of ``windows_per_batch``
    inference windows, in the given order, collated with ``padding``."""
    batches = [list(plans[i : i + windows_per_batch]) for i in range(0, len(plans), windows_per_batch)]
    return DataLoader(
        WindowDataset(store),
        batch_sampler=batches,
        collate_fn=KeyframeCollate(padding),
        generator=torch.Generator(),
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


class StoreWindowSource:
    """A :class:`~stage_dist.window_source.WindowSource` over a feature store: the training
    schedule is a :class:`ClipWindowSampler` over the store's clips, inference windows are
    :func:`~stage_dist.sampler.plan_inference_windows` split contiguously over ranks."""

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

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def steps_for_epoch(self, epoch: int) -> int:
        return self.sampler.steps_for_epoch(epoch)

    def padded_windows(self, epoch: int) -> int:
        return self.sampler.padded_windows(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self, step: int) -> dict:
        return self.sampler.state_dict(step)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def train_loader(self, *, num_workers: int, pin_memory: bool, padding: Padding = Padding()) -> DataLoader:
        return train_loader(self.store, self.sampler, num_workers=num_workers, pin_memory=pin_memory, padding=padding)

    def inference_batches(self, rank: int, world_size: int, *, window: int, context: int, windows_per_batch: int,
                          padding: Padding, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
        plans = plan_inference_windows(self.store.clip_lengths, window, context=context)
        return inference_loader(self.store, shard_for_rank(plans, rank, world_size), windows_per_batch=windows_per_batch,
                                num_workers=num_workers, pin_memory=pin_memory, padding=padding)


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
        from stage_dist.shard_stream import ShardWindowStream  # imports this module (KeyframeCollate)

        return ShardWindowStream(shards, window=window, windows_per_step=windows_per_step, rank=rank,
                                 world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer,
                                 manifest=shards_manifest)
    feature_store = FeatureStore.open(store, in_memory=in_memory, memmap_dir=memmap_dir)
    return StoreWindowSource(feature_store, window=window, windows_per_step=windows_per_step, rank=rank,
                             world_size=world_size, seed=seed)


@dataclass
class TrainData:
    """The training data as the trainer sees it, whichever form it is stored in: ``steps`` is
    the per-epoch schedule (``set_epoch``, ``load_state_dict`` to resume mid-epoch,
    ``steps_for_epoch`` and ``len``, the same on every rank), ``loader`` its batches."""

    steps: WindowSource
    loader: DataLoader
    actor_dim: int
    object_dim: int
    num_keyframes: int
    num_clips: int
    source: str


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
