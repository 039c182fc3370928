"""DataLoaders over a feature store: training steps and inference windows.

A training step is the list of :class:`~stage_dist.batch.WindowSpec` that the clip-aware
sampler yields; a DataLoader worker reads each window with one slice read per array and
collates them into one block-diagonal :class:`~stage_dist.batch.Batch`. The graph itself is
built on the device by the model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from stage_dist.batch import Batch, Window, WindowSpec, collate
from stage_dist.sampler import ClipWindowSampler, InferenceWindow
from stage_dist.store import FeatureStore


class WindowDataset(Dataset):
    """Map-style dataset whose keys are window specs (or inference windows)."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    def __getitem__(self, key: WindowSpec | InferenceWindow) -> Window | tuple[Window, InferenceWindow]:
        if isinstance(key, InferenceWindow):
            return self.store.read_window(key.spec), key
        return self.store.read_window(key)

    def __len__(self) -> int:  # not used by batch samplers; defined for completeness
        return self.store.num_keyframes


def collate_inference(items: Sequence[tuple[Window, InferenceWindow]]) -> tuple[Batch, torch.Tensor]:
    """Collate inference windows; also return which actors each window owns (predicts)."""
    windows = [window for window, _ in items]
    batch = collate(windows)
    keep_start = torch.tensor([plan.keep_start for _, plan in items], dtype=torch.int64)
    keep_stop = torch.tensor([plan.keep_stop for _, plan in items], dtype=torch.int64)
    frame, window_id = batch.actor_frame, batch.actor_window
    owned = (frame >= keep_start[window_id]) & (frame < keep_stop[window_id])
    return batch, owned


def _loader_options(num_workers: int, pin_memory: bool) -> dict:
    options: dict = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    return options


def train_loader(
    store: FeatureStore, sampler: ClipWindowSampler, *, num_workers: int, pin_memory: bool
) -> DataLoader:
    """One batch per optimizer step, in the sampler's order.

    The loader gets its own generator so that creating an iterator (each epoch, or on a
    mid-epoch resume) never consumes the global torch RNG, which dropout uses: exact resume
    depends on it.
    """
    return DataLoader(
        WindowDataset(store),
        batch_sampler=sampler,
        collate_fn=collate,
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
) -> DataLoader:
    """Batches of ``windows_per_batch`` inference windows, in the given order."""
    batches = [list(plans[i : i + windows_per_batch]) for i in range(0, len(plans), windows_per_batch)]
    return DataLoader(
        WindowDataset(store),
        batch_sampler=batches,
        collate_fn=collate_inference,
        generator=torch.Generator(),
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
