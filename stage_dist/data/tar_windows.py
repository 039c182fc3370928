"""Streaming a split from WebDataset tar shards: the shard path of the window-source contract.

:class:`TarWindowStream` feeds training: it cuts every clip into windows with the same rule
and the same per-epoch offsets as :class:`~stage_dist.data.sampler.ClipWindowSampler`, so a window
read from shards equals ``store.read_window`` of the same spec array for array, and over all
ranks and DataLoader workers every window of the epoch is yielded exactly once, plus the few
repeats (padding) that make every rank's step count equal, whatever the shard sizes.

How (:func:`plan_epoch`): the epoch's windows are laid out in one sequence, shard by shard in
an order shuffled per epoch and clip by clip within a shard (counts come from the manifest, so
nothing is read to plan). Each reader (a rank, or a DataLoader worker of a rank) needs
``windows_per_step`` windows for each of its steps; the sequence is cut into one contiguous
segment per reader, no longer than what the reader needs and as equal as possible. A reader
reads only the shards its segment touches (from the first of its clips to the last, skipping
other clips without decoding them), shuffles its windows through a buffer, then repeats its
first windows to fill its last steps (a reader with no window of its own repeats the first
windows of the sequence). Inference reads whole clips (:func:`~stage_dist.store.tar_shards.read_clip_samples`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Generator, Iterable, Iterator, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from stage_dist.data.batch import Padding, collate
from stage_dist.data.loaders import InferenceCollate, TrainLoader, worker_options
from stage_dist.data.sampler import EpochPosition, clip_windows, epoch_generator, plan_inference_windows, window_offsets
from stage_dist.data.window_source import SHUFFLE_BUFFER, InferenceBatch, KeyframeNamer, batches_of
from stage_dist.store.schema import store_class_ids
from stage_dist.store.tar_shards import (
    ShardError,
    check_complete,
    clip_groups,
    cut_clip,
    decode_clip,
    decode_sample,
    manifest_of,
    read_clip_samples,
    select_shards,
)
from stage_dist.store.window import InferenceWindow, Window


@dataclass(frozen=True)
class EpochPlan:
    """Which windows of an epoch each reader yields (identical in every process).

    ``shard_order`` is the epoch's order of the selected shards (indices into the URL list);
    ``shard_start[i]`` is the position in the epoch's window sequence of the first window of
    shard ``shard_order[i]`` (one more entry: the total). Reader ``r`` owns sequence positions
    ``segments[r]:segments[r + 1]`` and must yield ``quotas[r]`` windows.
    """

    shard_order: np.ndarray
    shard_start: np.ndarray
    clip_windows: np.ndarray  # (num clips,) windows of each clip this epoch
    quotas: np.ndarray
    segments: np.ndarray

    @property
    def total(self) -> int:
        return int(self.shard_start[-1])

    @property
    def padded(self) -> int:
        return int(self.quotas.sum()) - self.total


def fill_segments(quotas: Sequence[int] | np.ndarray, total: int) -> np.ndarray:
    """Segment sizes: ``total`` windows over readers, each at most its quota, as equal as
    possible (every reader gets ``min(quota, L)`` or one more for a common level ``L``)."""
    quota_array = np.asarray(quotas, dtype=np.int64)
    if total > quota_array.sum():
        raise ValueError(f"{total} windows do not fit quotas summing to {int(quota_array.sum())}")
    low, high = 0, int(quota_array.max(initial=0))
    while low < high:  # the highest level whose fill fits in total
        mid = (low + high + 1) // 2
        low, high = (mid, high) if np.minimum(quota_array, mid).sum() <= total else (low, mid - 1)
    sizes = np.minimum(quota_array, low)
    rest = total - int(sizes.sum())
    sizes[np.flatnonzero(quota_array > low)[:rest]] += 1
    return sizes


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _shuffled(items: Iterator[Window], size: int, rng: np.random.Generator) -> Iterator[Window]:
    """Buffer shuffle: once ``size`` items are held, each new item replaces a random held one,
    which is emitted."""
    buffer: list[Window] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class TarWindowStream(EpochPosition, IterableDataset):
    """Training steps (``list[Window]``, ``windows_per_step`` each) streamed from shards; a
    :class:`~stage_dist.data.window_source.WindowSource`.

    Use :meth:`train_loader` (it moves the stream's position, epoch after epoch), or
    ``DataLoader(stream, batch_size=None, collate_fn=collate, num_workers=N)`` (workers not
    persistent) and :meth:`set_epoch` before each epoch.
    Each epoch every rank yields exactly :meth:`steps_for_epoch` steps, the step count of
    :class:`~stage_dist.data.sampler.ClipWindowSampler` over the same clips; the epoch's windows are
    the sampler's windows (clip samples are cut with the offsets it draws for ``seed + epoch``;
    window samples, from shards written with ``window``, are used as they are and ``window``
    must match), each yielded once over all ranks and workers, :meth:`padded_windows` of them
    twice. The steps of an epoch depend on (seed, epoch, rank, world size, number of workers)
    only; :meth:`load_state_dict` resumes mid-epoch exactly.
    """

    def __init__(
        self,
        urls: str | list[str],
        *,
        window: int = 6,
        windows_per_step: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        manifest: str | dict | None = None,
    ) -> None:
        super().__init__()
        if window < 1 or windows_per_step < 1 or shuffle_buffer < 1:
            raise ValueError(
                f"window, windows_per_step and shuffle_buffer must be >= 1, "
                f"got {window}, {windows_per_step}, {shuffle_buffer}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.urls, self.manifest = manifest_of(urls, manifest)
        self.location = urls if isinstance(urls, str) else f"{len(self.urls)} shards from {self.urls[0]}"
        self.shards = select_shards(self.urls, self.manifest)
        if self.manifest["sample"] == "window" and self.manifest["window"] != window:
            raise ShardError(f"shards hold windows of {self.manifest['window']} keyframes, not {window}")
        self.actor_dim: int = self.manifest["actor_dim"]
        self.object_dim: int = self.manifest["object_dim"]
        self.class_ids: tuple[int, ...] = store_class_ids(self.manifest.get("store_attrs", {}))
        self.num_clips: int = self.manifest["num_clips"]
        self.num_keyframes: int = self.manifest["num_keyframes"]
        self.num_actors: int = self.manifest["num_actors"]
        self.max_nodes_per_keyframe: int = self.manifest["max_nodes_per_keyframe"]
        lengths = np.asarray(self.manifest["clip_lengths"], dtype=np.int64)
        self._clip_lengths = np.zeros_like(lengths)  # lengths of the selected shards' clips only
        for shard in self.shards:
            clips = slice(shard["first_clip"], shard["stop_clip"])
            self._clip_lengths[clips] = lengths[clips]
        self.window = window
        self.windows_per_step = windows_per_step
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer

    # ---- schedule

    def _clip_window_counts(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(windows of each clip, each clip's first window boundary)`` for ``epoch``."""
        if self.manifest["sample"] == "window":  # fixed windows 0, W, 2W, ...
            offsets = np.zeros(len(self._clip_lengths), dtype=np.int64)
        else:  # the boundaries ClipWindowSampler draws for the epoch
            offsets = window_offsets(epoch_generator(self.seed, epoch), len(self._clip_lengths), self.window)
        cuts = clip_windows(self._clip_lengths, self.window, offsets)
        return np.bincount(cuts[:, 0], minlength=len(self._clip_lengths)), offsets

    def windows_for_epoch(self, epoch: int) -> int:
        """Distinct windows of the selected shards in ``epoch``, all ranks together."""
        return int(self._clip_window_counts(epoch)[0].sum())

    def steps_for_epoch(self, epoch: int) -> int:
        """Steps every rank yields in ``epoch``."""
        return -(-self.windows_for_epoch(epoch) // (self.world_size * self.windows_per_step))

    def padded_windows(self, epoch: int) -> int:
        """Windows of ``epoch`` yielded twice (all ranks together) so that ranks' steps are equal."""
        return self.steps_for_epoch(epoch) * self.world_size * self.windows_per_step - self.windows_for_epoch(epoch)

    def plan_epoch(self, epoch: int, num_workers: int) -> EpochPlan:
        """Every reader's windows of ``epoch`` with ``num_workers`` DataLoader workers per rank."""
        counts, _ = self._clip_window_counts(epoch)
        per_shard = np.array([counts[s["first_clip"] : s["stop_clip"]].sum() for s in self.shards], dtype=np.int64)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        shard_start = np.concatenate([[0], np.cumsum(per_shard[order])])
        steps = -(-int(shard_start[-1]) // (self.world_size * self.windows_per_step))
        worker_steps = [len(range(v, steps, num_workers)) for v in range(num_workers)]
        quotas = np.array(worker_steps * self.world_size, dtype=np.int64) * self.windows_per_step
        sizes = fill_segments(quotas, int(shard_start[-1]))
        return EpochPlan(order, shard_start, counts, quotas, np.concatenate([[0], np.cumsum(sizes)]))

    def __len__(self) -> int:
        return self.steps_for_epoch(self.epoch)

    # ---- reading

    def _sequence(self, plan: EpochPlan, offsets: np.ndarray, start: int, stop: int) -> Iterator[Window]:
        """Windows ``start:stop`` of the epoch's sequence, in sequence order."""
        first = int(np.searchsorted(plan.shard_start, start, side="right")) - 1
        for i in range(max(first, 0), len(plan.shard_order)):
            position = int(plan.shard_start[i])
            if position >= stop:
                return
            shard = int(plan.shard_order[i])
            first_clip, stop_clip = self.shards[shard]["first_clip"], self.shards[shard]["stop_clip"]
            for clip, samples in clip_groups(self.urls[shard]):
                if not first_clip <= clip < stop_clip:
                    raise ShardError(f"{self.urls[shard]}: holds clip {clip}, its manifest entry clips "
                                     f"{first_clip}..{stop_clip - 1}")
                count = int(plan.clip_windows[clip])
                if position + count > start:
                    windows = list(self._cut(samples, offsets))
                    if len(windows) != count:
                        raise ShardError(f"{self.urls[shard]}: clip {clip} gives {len(windows)} windows, its "
                                         f"manifest length {int(self._clip_lengths[clip])} gives {count}")
                    yield from windows[max(start - position, 0) : stop - position]
                position += count
                if position >= stop:
                    break

    def _cut(self, samples: list[dict], offsets: np.ndarray) -> Iterator[Window]:
        if self.manifest["sample"] == "window":
            for sample in samples:
                yield decode_sample(sample)
            return
        clip = decode_clip(samples)
        cuts = clip_windows([clip.num_keyframes], self.window, offsets[clip.clip : clip.clip + 1])
        for _, start, length in cuts.tolist():
            yield cut_clip(clip, start, length)

    def _reader_windows(self, plan: EpochPlan, reader: int, epoch: int) -> Generator[Window, None, None]:
        """Reader ``reader``'s ``quotas[reader]`` windows: its segment shuffled, then repeats."""
        _, offsets = self._clip_window_counts(epoch)
        start, stop = int(plan.segments[reader]), int(plan.segments[reader + 1])
        quota = int(plan.quotas[reader])
        rng = np.random.default_rng([self.seed, epoch, reader])
        kept: list[Window] = []
        if stop > start:
            for window in _shuffled(self._sequence(plan, offsets, start, stop), self.shuffle_buffer, rng):
                if len(kept) < quota - (stop - start):
                    kept.append(window)
                yield window
        else:  # no window of its own: repeat the first windows of the sequence
            kept = list(self._sequence(plan, offsets, 0, min(quota, plan.total)))
        for i in range(quota - (stop - start)):
            yield kept[i % len(kept)]

    def __iter__(self) -> Iterator[list[Window]]:
        worker, num_workers = _worker()
        epoch, resume = self.epoch, self._take_resume_step()
        plan = self.plan_epoch(epoch, num_workers)
        if plan.total == 0:
            raise ShardError(f"shards {self.location} hold no keyframes")
        total = self.steps_for_epoch(epoch)
        # Global step g is made by worker g % num_workers; after a resume at step s the
        # DataLoader asks worker 0 first, so worker w plays the part of worker (w + s) % n.
        virtual = (worker + resume) % num_workers
        windows = self._reader_windows(plan, self.rank * num_workers + virtual, epoch)
        try:
            for step in range(virtual, total, num_workers):
                windows_of_step = [next(windows) for _ in range(self.windows_per_step)]
                if step >= resume:
                    yield windows_of_step
        finally:
            windows.close()

    def keyframe_namer(self) -> KeyframeNamer:
        return KeyframeNamer.from_clip_lengths(self.manifest.get("clip_lengths", []))  # no video ids

    def train_loader(self, *, num_workers: int, pin_memory: bool, padding: Padding = Padding()) -> TrainLoader:
        """This rank's steps as collated batches. Workers are not persistent: each epoch's
        iterator must see the stream's new epoch."""
        return TrainLoader(self, self, batch_size=None, collate_fn=partial(collate, padding=padding),
                           pin_memory=pin_memory, **worker_options(num_workers, persistent=False))

    # ---- inference

    def inference_batches(
        self, rank: int, world_size: int, *, window: int, context: int, windows_per_batch: int,
        padding: Padding, num_workers: int = 0, pin_memory: bool = False,
    ) -> Iterable[InferenceBatch]:
        """Rank ``rank``'s inference batches: whole clips of its shards (each clip once over the
        ranks, read in this process: ``num_workers`` and ``pin_memory`` are not used), cut into
        the windows of :func:`~stage_dist.data.sampler.plan_inference_windows`."""
        check_complete(self.urls, self.manifest, "inference")
        collate_windows = InferenceCollate(padding)

        def windows() -> Iterator[tuple[Window, InferenceWindow]]:
            for clip in read_clip_samples(self.urls, rank=rank, world_size=world_size):
                for plan in plan_inference_windows([clip.num_keyframes], window, context=context):
                    yield cut_clip(clip, plan.spec.start, plan.spec.length), plan

        return (collate_windows(items) for items in batches_of(windows(), windows_per_batch))
