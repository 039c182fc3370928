"""WebDataset tar shards: the streaming form of the feature store.

For object storage, or when many nodes read at once, a store is written as tar shards in clip
order. A sample is one clip (default) or one fixed window of a clip; it holds the same arrays as
the store, as ``.npy`` entries, plus ``meta.json`` (clip index, video id, first keyframe and
first actor row in the store, start within the clip). Sample keys are ``c<clip>`` or
``c<clip>-w<start>``: no dots and no path separators, whatever the video ids. A clip never
straddles two shards. ``manifest.json`` (one split per directory) lists the shards with their
sample, clip, keyframe and actor counts, the clip lengths, dims, dtypes and the store's attrs.

Readers:

- :class:`ShardWindowStream` feeds training: it cuts every clip into windows with the same rule
  and the same per-epoch offsets as :class:`~stage_dist.sampler.ClipWindowSampler`, so a window
  read from shards equals ``store.read_window`` of the same spec array for array. Windows pass
  through a shuffle buffer and are grouped into steps. Every rank yields exactly the same number
  of steps, whatever the shard count: shards are dealt to ranks (and DataLoader workers)
  disjointly, a reader that runs out loops over its own shards, and where there are more readers
  than shards, the readers of one shard split its samples.
- :func:`read_clip_samples` yields whole clips for inference, each exactly once across ranks.

URLs are anything webdataset opens (local paths, ``file:``, ``pipe:``, ``http(s):`` ...), as a
list or a brace pattern such as ``shards/train-{000000..000031}.tar``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

from stage_dist.batch import Window, WindowSpec
from stage_dist.errors import UserInputError
from stage_dist.sampler import clip_windows, epoch_generator, parse_position, window_offsets
from stage_dist.store import FeatureStore, StoreError

log = logging.getLogger(__name__)

FORMAT = "stage_dist.shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_WINDOW = 6  # the window whose count the manifest records for clip samples
ARRAY_FIELDS = (
    "timestamps",
    "actor_ptr",
    "actor_features",
    "actor_boxes",
    "actor_labels",
    "object_ptr",
    "object_features",
    "object_boxes",
)
META_ENTRY = "meta.json"
_TAR_BLOCK = 512
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class ShardError(UserInputError):
    """A shard, sample or manifest that cannot be read or does not match what is asked."""


# --------------------------------------------------------------------------- samples


def sample_key(clip: int, start: int | None = None) -> str:
    """Tar key of a clip sample (``c000123``) or a window sample (``c000123-w000006``)."""
    return f"c{clip:06d}" if start is None else f"c{clip:06d}-w{start:06d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)
    return stream.getvalue()


def encode_sample(window: Window, start: int, key: str) -> dict[str, Any]:
    """Tar entries of one sample: every array of ``window`` as ``.npy`` plus ``meta.json``.

    ``start`` is the window's first keyframe within its clip.
    """
    meta = {
        "clip": int(window.clip),
        "video_id": window.video_id,
        "keyframe_start": int(window.keyframe_start),
        "actor_start": int(window.actor_start),
        "start": int(start),
    }
    sample: dict[str, Any] = {"__key__": key, META_ENTRY: json.dumps(meta).encode("utf-8")}
    for name in ARRAY_FIELDS:
        sample[f"{name}.npy"] = _npy_bytes(getattr(window, name))
    return sample


def _tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample takes in a tar file: a header block per entry, data padded to blocks."""
    blocks = sum(1 + -(-len(data) // _TAR_BLOCK) for name, data in sample.items() if name != "__key__")
    return blocks * _TAR_BLOCK


def decode_sample(sample: dict[str, Any]) -> Window:
    """The :class:`Window` of a sample read by webdataset (a dict of raw tar entries)."""
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    try:
        meta = json.loads(sample[META_ENTRY])
        arrays = {
            name: np.lib.format.read_array(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False)
            for name in ARRAY_FIELDS
        }
        window = Window(
            clip=int(meta["clip"]),
            video_id=str(meta["video_id"]),
            keyframe_start=int(meta["keyframe_start"]),
            actor_start=int(meta["actor_start"]),
            **arrays,
        )
    except KeyError as err:
        raise ShardError(f"{where}: missing entry {err.args[0]!r}") from err
    except (ValueError, TypeError, OSError) as err:
        raise ShardError(f"{where}: unreadable entry: {err}") from err
    _check_window(window, where)
    return window


def _check_window(window: Window, where: str) -> None:
    n = window.num_keyframes
    for ptr_name, rows_name in (("actor_ptr", "actor_features"), ("object_ptr", "object_features")):
        ptr, rows = getattr(window, ptr_name), getattr(window, rows_name)
        if len(ptr) != n + 1 or ptr[0] != 0 or ptr[-1] != len(rows):
            raise ShardError(
                f"{where}: {ptr_name} {ptr.tolist()[:4]}... does not describe {len(rows)} rows "
                f"over {n} keyframes"
            )
    for name in ("actor_boxes", "actor_labels"):
        if len(getattr(window, name)) != len(window.actor_features):
            raise ShardError(f"{where}: {name} has {len(getattr(window, name))} rows, expected {len(window.actor_features)}")
    if len(window.object_boxes) != len(window.object_features):
        raise ShardError(f"{where}: object_boxes has {len(window.object_boxes)} rows, expected {len(window.object_features)}")


def cut_window(clip: Window, start: int, length: int) -> Window:
    """Keyframes ``start .. start + length - 1`` of a whole-clip :class:`Window`, as the store
    would read them (views of the clip's arrays, local CSR pointers, global row starts)."""
    if not (0 <= start and length >= 1 and start + length <= clip.num_keyframes):
        raise ValueError(f"window ({start}, {length}) outside clip {clip.clip} of {clip.num_keyframes} keyframes")
    stop = start + length
    a0, a1 = int(clip.actor_ptr[start]), int(clip.actor_ptr[stop])
    o0, o1 = int(clip.object_ptr[start]), int(clip.object_ptr[stop])
    return Window(
        clip=clip.clip,
        video_id=clip.video_id,
        keyframe_start=clip.keyframe_start + start,
        actor_start=clip.actor_start + a0,
        timestamps=clip.timestamps[start:stop],
        actor_ptr=clip.actor_ptr[start : stop + 1] - clip.actor_ptr[start],
        actor_features=clip.actor_features[a0:a1],
        actor_boxes=clip.actor_boxes[a0:a1],
        actor_labels=clip.actor_labels[a0:a1],
        object_ptr=clip.object_ptr[start : stop + 1] - clip.object_ptr[start],
        object_features=clip.object_features[o0:o1],
        object_boxes=clip.object_boxes[o0:o1],
    )


def join_windows(parts: Sequence[Window], where: str = "") -> Window:
    """Consecutive windows of one clip as one window (inverse of cutting)."""
    first = parts[0]
    for before, after in zip(parts, parts[1:]):
        if after.clip != first.clip or after.keyframe_start != before.keyframe_start + before.num_keyframes:
            raise ShardError(
                f"{where}: window samples of clip {first.clip} are not consecutive "
                f"(keyframe {after.keyframe_start} after {before.keyframe_start}+{before.num_keyframes})"
            )
    if len(parts) == 1:
        return first

    def ptr(name: str) -> np.ndarray:
        pointers, offset = [getattr(first, name)[:1]], 0
        for part in parts:
            p = getattr(part, name)
            pointers.append(p[1:] + offset)
            offset += int(p[-1])
        return np.concatenate(pointers)

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    return replace(
        first,
        timestamps=cat("timestamps"),
        actor_ptr=ptr("actor_ptr"),
        actor_features=cat("actor_features"),
        actor_boxes=cat("actor_boxes"),
        actor_labels=cat("actor_labels"),
        object_ptr=ptr("object_ptr"),
        object_features=cat("object_features"),
        object_boxes=cat("object_boxes"),
    )


# --------------------------------------------------------------------------- writing


@dataclass
class _ShardStats:
    name: str
    samples: int = 0
    first_clip: int = 0  # clips first_clip .. stop_clip - 1 (empty clips have no sample)
    stop_clip: int = 0
    keyframes: int = 0
    actors: int = 0
    objects: int = 0
    bytes: int = 0


class _ShardSink:
    """Writes samples clip by clip to ``<prefix>-NNNNNN.tar``, starting a new shard before a clip
    that would push the current one past ``max_bytes``. Each shard is written to a temporary
    name and renamed when complete."""

    def __init__(self, out_dir: Path, prefix: str, max_bytes: int) -> None:
        self.out_dir, self.prefix, self.max_bytes = out_dir, prefix, max_bytes
        self.shards: list[_ShardStats] = []
        self._file: Any = None
        self._writer: wds.TarWriter | None = None

    def _open(self, first_clip: int) -> None:
        self._close_current()
        stats = _ShardStats(name=f"{self.prefix}-{len(self.shards):06d}.tar", first_clip=first_clip)
        self.shards.append(stats)
        self._file = open(self.out_dir / f"{stats.name}.tmp", "wb")
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=0, user="stage_dist", group="stage_dist")

    def add_clip(self, clip: int, windows: Sequence[Window], samples: Sequence[dict[str, Any]]) -> None:
        size = sum(_tar_bytes(s) for s in samples)
        current = self.shards[-1] if self.shards else None
        if current is None or (current.samples and current.bytes + size > self.max_bytes):
            self._open(clip)
            current = self.shards[-1]
        for sample in samples:
            self._writer.write(sample)
        current.samples += len(samples)
        current.stop_clip = clip + 1
        current.keyframes += sum(w.num_keyframes for w in windows)
        current.actors += sum(len(w.actor_boxes) for w in windows)
        current.objects += sum(len(w.object_boxes) for w in windows)
        current.bytes += size

    def _close_current(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        stats = self.shards[-1]
        path = self.out_dir / stats.name
        os.replace(f"{path}.tmp", path)
        stats.bytes = path.stat().st_size
        self._writer = self._file = None

    def close(self) -> list[_ShardStats]:
        self._close_current()
        return self.shards


def _clip_windows_to_write(store: FeatureStore, clip: int, window: int | None) -> list[tuple[int, Window]]:
    first, stop = int(store.clip_ptr[clip]), int(store.clip_ptr[clip + 1])
    if stop == first:
        return []
    if window is None:
        return [(0, store.read_keyframes(first, stop))]
    length = stop - first
    return [
        (start, store.read_window(WindowSpec(clip, start, min(window, length - start))))
        for start in range(0, length, window)
    ]


def _nominal_windows(clip_lengths: Sequence[int], window: int) -> int:
    """Windows of the clips at window ``window`` with no start offset."""
    return int(sum(-(-int(n) // window) for n in clip_lengths))


def write_shards(
    store: FeatureStore,
    out_dir: str | os.PathLike,
    *,
    prefix: str | None = None,
    max_shard_bytes: int = 256 << 20,
    window: int | None = None,
) -> dict:
    """Write a :class:`~stage_dist.store.FeatureStore` as tar shards; returns the manifest.

    Samples are whole clips, or with ``window`` the windows ``0, W, 2W, ...`` of each clip (the
    last one shorter). Shards are ``<prefix>-000000.tar ...`` (``prefix`` defaults to the store's
    split), each at most ``max_shard_bytes`` unless one clip alone is larger. ``manifest.json``
    is written last; shards of an earlier write that are beyond the new count are removed.
    """
    prefix = prefix or store.split or "shards"
    if not _PREFIX_RE.match(prefix):
        raise ShardError(f"shard prefix {prefix!r} must be letters, digits, '_' or '-'")
    if window is not None and window < 1:
        raise ShardError(f"window must be >= 1, got {window}")
    if max_shard_bytes < 1:
        raise ShardError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = out / MANIFEST_NAME
    if existing.exists():
        old_prefix = _read_json(str(existing)).get("prefix")
        if old_prefix != prefix:
            raise ShardError(f"{existing} describes shards {old_prefix!r}, not {prefix!r}: one split per directory")

    num_clips = len(store.clip_ptr) - 1
    if num_clips < 1 or int(store.clip_ptr[-1]) == 0:
        raise ShardError(f"store {getattr(store, 'path', '')} has no keyframes to write")
    clip_lengths = np.diff(np.asarray(store.clip_ptr)).astype(int).tolist()
    sink = _ShardSink(out, prefix, max_shard_bytes)
    dtypes: dict[str, str] = {}
    for clip in tqdm(range(num_clips), desc=f"shards {prefix}", unit="clip", leave=False):
        pieces = _clip_windows_to_write(store, clip, window)
        if not pieces:
            continue
        windows = [w for _, w in pieces]
        for w in windows:
            for name in ARRAY_FIELDS:
                dtype = getattr(w, name).dtype.str
                if dtypes.setdefault(name, dtype) != dtype:
                    raise ShardError(f"clip {clip}: {name} is {dtype}, earlier clips {dtypes[name]}")
        keys = [sample_key(clip, None if window is None else start) for start, _ in pieces]
        samples = [encode_sample(w, start, key) for (start, w), key in zip(pieces, keys)]
        sink.add_clip(clip, windows, samples)
    shards = sink.close()
    _remove_stale_shards(out, prefix, len(shards))

    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "prefix": prefix,
        "split": store.split,
        "sample": "clip" if window is None else "window",
        "window": window,
        "num_shards": len(shards),
        "num_samples": sum(s.samples for s in shards),
        "num_clips": num_clips,
        "num_keyframes": int(sum(clip_lengths)),
        "num_actors": sum(s.actors for s in shards),
        "num_objects": sum(s.objects for s in shards),
        "windows": {str(window or DEFAULT_WINDOW): _nominal_windows(clip_lengths, window or DEFAULT_WINDOW)},
        "max_nodes_per_keyframe": int((np.diff(store.actor_ptr) + np.diff(store.object_ptr)).max(initial=0)),
        "actor_dim": int(store.actor_dim),
        "object_dim": int(store.object_dim),
        "dtypes": dtypes,
        "clip_lengths": clip_lengths,
        "shards": [vars(s) for s in shards],
        "store_attrs": json.loads(json.dumps(dict(store.attrs), default=str)),
    }
    tmp = out / f"{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST_NAME)
    log.info("wrote %d shards (%d samples, %d clips) to %s", len(shards), manifest["num_samples"], num_clips, out)
    return manifest


def _remove_stale_shards(out: Path, prefix: str, count: int) -> None:
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})\.tar$")
    for path in out.iterdir():
        match = pattern.match(path.name)
        if match and int(match.group(1)) >= count:
            log.info("removing stale shard %s", path)
            path.unlink()


def shard_pattern(manifest: dict, base: str | os.PathLike | None = None) -> str:
    """Brace pattern of a manifest's shards (``train-{000000..000031}.tar``), under ``base``."""
    n, prefix = manifest["num_shards"], manifest["prefix"]
    pattern = f"{prefix}-000000.tar" if n == 1 else f"{prefix}-{{000000..{n - 1:06d}}}.tar"
    return pattern if base is None else f"{str(base).rstrip('/')}/{pattern}"


# --------------------------------------------------------------------------- reading


def _read_json(location: str) -> dict:
    try:
        with wds.gopen(location, "rb") as stream:
            return json.loads(stream.read())
    except (OSError, ValueError) as err:
        raise ShardError(f"cannot read {location}: {err}") from err


def load_manifest(location: str | os.PathLike) -> dict:
    """Read and check a ``manifest.json`` (path or URL)."""
    manifest = _read_json(str(location))
    found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
    if found != (FORMAT, FORMAT_VERSION):
        raise ShardError(
            f"{location}: not a {FORMAT} v{FORMAT_VERSION} manifest (format {found[0]!r}, version {found[1]!r})"
        )
    return manifest


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs from a brace pattern (``::`` separates patterns) or a list."""
    expanded = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
    if not expanded:
        raise ShardError(f"no shard URLs in {urls!r}")
    return expanded


def manifest_location(url: str) -> str:
    """Where the manifest of the shard at ``url`` is: ``manifest.json`` beside it."""
    if url.startswith("pipe:"):
        raise ShardError(f"cannot place the manifest of {url!r}: pass manifest= explicitly")
    head, sep, _ = url.rpartition("/")
    return f"{head}/{MANIFEST_NAME}" if sep else MANIFEST_NAME


def shard_name(url: str) -> str:
    """The shard file name a URL points at (as listed in the manifest)."""
    return url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0].split()[0]


def _select_shards(urls: Sequence[str], manifest: dict) -> list[dict]:
    by_name = {shard["name"]: shard for shard in manifest["shards"]}
    selected = []
    for url in urls:
        shard = by_name.get(shard_name(url))
        if shard is None:
            raise ShardError(f"shard {url!r} is not listed in the manifest of {manifest['prefix']!r} shards")
        selected.append(shard)
    return selected


def _tar_samples(url: str) -> Iterator[dict[str, Any]]:
    try:
        yield from wds.tarfile_samples([{"url": url}])
    except (OSError, ValueError, tarfile.TarError) as err:
        raise ShardError(f"cannot read shard {url}: {err}") from err


@dataclass(frozen=True)
class ShardAssignment:
    """What one reader (a rank, or a DataLoader worker of a rank) reads: ``shards`` (indices
    into the URL list), and of each shard's clips those with ``index % parts == part``."""

    shards: tuple[int, ...]
    part: int
    parts: int


def assign_shards(num_shards: int, reader: int, num_readers: int) -> ShardAssignment:
    """Deal shards to readers: disjoint whole shards while there are at least as many shards as
    readers (``reader, reader + num_readers, ...``); otherwise reader ``r`` shares shard
    ``r % num_shards`` with the other readers of that shard, each taking every n-th clip."""
    if not 0 <= reader < num_readers:
        raise ValueError(f"reader must be in [0, {num_readers}), got {reader}")
    if num_shards >= num_readers:
        return ShardAssignment(tuple(range(reader, num_shards, num_readers)), 0, 1)
    shard = reader % num_shards
    return ShardAssignment((shard,), reader // num_shards, len(range(shard, num_readers, num_shards)))


def _clip_units(urls: Sequence[str], shard_order: Iterable[int]) -> Iterator[tuple[int, list[dict]]]:
    """Per shard in ``shard_order``, the raw samples grouped by clip: ``(clip number within the
    shard, samples)``. Grouping needs only the key, so unselected clips are never decoded."""
    for shard in shard_order:
        url = urls[shard]
        group: list[dict] = []
        group_clip, index = None, -1
        for sample in _tar_samples(url):
            clip = sample["__key__"].split("-", 1)[0]
            if clip != group_clip and group:
                yield index, group
                group = []
            if clip != group_clip:
                group_clip, index = clip, index + 1
            group.append(sample)
        if group:
            yield index, group


def _decode_clip(samples: list[dict]) -> Window:
    windows = [decode_sample(s) for s in samples]
    return join_windows(windows, where=str(samples[0].get("__url__")))


def read_clip_samples(
    urls: str | Sequence[str], *, rank: int = 0, world_size: int = 1
) -> Iterator[Window]:
    """Whole clips from shards, in shard order: every keyframe of the shards exactly once over
    ranks ``0 .. world_size - 1`` (each rank reads its :func:`assign_shards` share; window
    samples are joined back into clips)."""
    urls = expand_urls(urls)
    assignment = assign_shards(len(urls), rank, world_size)
    for index, samples in _clip_units(urls, assignment.shards):
        if index % assignment.parts == assignment.part:
            yield _decode_clip(samples)


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


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ShardWindowStream(IterableDataset):
    """Training steps (``list[Window]``, ``windows_per_step`` each) streamed from shards.

    Use with ``DataLoader(stream, batch_size=None, collate_fn=collate, num_workers=N)`` and
    call :meth:`set_epoch` before each epoch; with workers, keep ``persistent_workers=False``
    so that workers see the new epoch. Each epoch every rank yields exactly
    :meth:`steps_for_epoch` steps (by default the step count of
    :class:`~stage_dist.sampler.ClipWindowSampler` over the same clips: the same on all ranks).

    Clip samples are cut with :func:`stage_dist.sampler.clip_windows` and the offsets the
    sampler draws for ``seed + epoch``, so the epoch's windows are the sampler's windows; a
    reader whose shards run out before its steps are done reads them again, and one with more
    windows than steps leaves the rest (a different rest each epoch, as the shard order and the
    buffer are shuffled per epoch). Window samples (shards written with ``window``) are used
    as they are, and ``window`` must match. The steps of an epoch depend on (seed, epoch, rank,
    world size, number of workers) only; :meth:`load_state_dict` resumes mid-epoch exactly.
    """

    def __init__(
        self,
        urls: str | list[str],
        *,
        window: int,
        windows_per_step: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int = 64,
        steps_per_epoch: int | None = None,
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
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.urls = expand_urls(urls)
        if not isinstance(manifest, dict):
            manifest = load_manifest(manifest or manifest_location(self.urls[0]))
        self.manifest = manifest
        shards = _select_shards(self.urls, manifest)
        if manifest["sample"] == "window" and manifest["window"] != window:
            raise ShardError(f"shards hold windows of {manifest['window']} keyframes, not {window}")
        lengths = np.asarray(manifest["clip_lengths"], dtype=np.int64)
        self._clip_lengths = np.zeros_like(lengths)  # lengths of the selected shards' clips only
        for shard in shards:
            clips = slice(shard["first_clip"], shard["stop_clip"])
            self._clip_lengths[clips] = lengths[clips]
        self._window_samples = sum(s["samples"] for s in shards) if manifest["sample"] == "window" else None
        self.window = window
        self.windows_per_step = windows_per_step
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.fixed_steps = steps_per_epoch
        self.epoch = 0
        self._resume_step = 0

    # ---- schedule

    def _offsets(self, epoch: int) -> np.ndarray:
        """The window boundaries ClipWindowSampler draws for ``epoch``."""
        return window_offsets(epoch_generator(self.seed, epoch), len(self._clip_lengths), self.window)

    def windows_for_epoch(self, epoch: int) -> int:
        """Distinct windows of the selected shards in ``epoch``, all ranks together."""
        if self._window_samples is not None:
            return self._window_samples
        return len(clip_windows(self._clip_lengths, self.window, self._offsets(epoch)))

    def steps_for_epoch(self, epoch: int) -> int:
        """Steps every rank yields in ``epoch``."""
        if self.fixed_steps is not None:
            return self.fixed_steps
        return -(-self.windows_for_epoch(epoch) // (self.world_size * self.windows_per_step))

    def __len__(self) -> int:
        return self.steps_for_epoch(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate. A pending resume step is kept only for its own epoch."""
        if epoch != self.epoch:
            self._resume_step = 0
        self.epoch = epoch

    def state_dict(self, step: int) -> dict:
        """``{"epoch", "step"}``, ``step`` being the number of steps of the epoch trained."""
        return {"epoch": int(self.epoch), "step": int(step)}

    def load_state_dict(self, state: dict) -> None:
        """Resume: select ``state["epoch"]``; its next iteration starts at ``state["step"]``."""
        self.epoch, self._resume_step = parse_position(state, "stream")

    # ---- reading

    def _reader_windows(self, reader: int, num_readers: int, epoch: int, rng: np.random.Generator) -> Iterator[Window]:
        """Endless shuffled windows of one reader's share. Each pass reads the share's shards in
        a new random order and shuffles its windows with the buffer, which is drained at the end
        of the pass: a pass yields every window of the share once."""
        assignment = assign_shards(len(self.urls), reader, num_readers)
        offsets = self._offsets(epoch)
        part, parts = assignment.part, assignment.parts
        while True:
            windows = (
                window
                for index, samples in _clip_units(self.urls, rng.permutation(assignment.shards))
                if index % parts == part
                for window in self._cut(samples, offsets)
            )
            produced = 0
            for window in _shuffled(windows, self.shuffle_buffer, rng):
                produced += 1
                yield window
            if produced:
                continue
            if parts == 1:
                raise ShardError(f"shards {[self.urls[s] for s in assignment.shards]} hold no keyframes")
            log.warning(
                "reader %d/%d shares shard %s and has no clip of its own; reading all its clips",
                reader, num_readers, self.urls[assignment.shards[0]],
            )
            part, parts = 0, 1

    def _cut(self, samples: list[dict], offsets: np.ndarray) -> Iterator[Window]:
        if self._window_samples is not None:
            for sample in samples:
                yield decode_sample(sample)
            return
        clip = _decode_clip(samples)
        cuts = clip_windows([clip.num_keyframes], self.window, offsets[clip.clip : clip.clip + 1])
        for _, start, length in cuts.tolist():
            yield cut_window(clip, start, length)

    def __iter__(self) -> Iterator[list[Window]]:
        worker, num_workers = _worker()
        epoch, resume = self.epoch, self._resume_step
        self._resume_step = 0
        total = self.steps_for_epoch(epoch)
        # Global step g is made by worker g % num_workers; after a resume at step s the
        # DataLoader asks worker 0 first, so worker w plays the part of worker (w + s) % n.
        virtual = (worker + resume) % num_workers
        reader = self.rank * num_workers + virtual
        rng = np.random.default_rng([self.seed, epoch, reader])
        windows = self._reader_windows(reader, self.world_size * num_workers, epoch, rng)
        try:
            for step in range(virtual, total, num_workers):
                windows_of_step = [next(windows) for _ in range(self.windows_per_step)]
                if step >= resume:
                    yield windows_of_step
        finally:
            windows.close()


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Write a feature store as WebDataset tar shards plus manifest.json."""
    parser = argparse.ArgumentParser(prog="python -m stage_dist.shards", description=main.__doc__)
    parser.add_argument("store", help="feature store (zarr group of one split) to write as shards")
    parser.add_argument("out_dir", help="directory for the .tar shards and manifest.json (one split per directory)")
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: the store's split)")
    parser.add_argument("--max-shard-mb", type=float, default=256.0, help="shard size limit in MiB (default 256)")
    parser.add_argument("--window", type=int, default=None, help="one sample per window of this many keyframes (default: one sample per clip)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        store = FeatureStore.open(args.store)
        manifest = write_shards(
            store, args.out_dir, prefix=args.prefix, max_shard_bytes=int(args.max_shard_mb * (1 << 20)), window=args.window
        )
    except (ShardError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{manifest['num_shards']} shards, {manifest['num_samples']} samples, {manifest['num_clips']} clips, "
        f"{manifest['num_keyframes']} keyframes: {shard_pattern(manifest, args.out_dir)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
