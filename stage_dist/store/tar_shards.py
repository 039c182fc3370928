"""The WebDataset tar form of a feature store: sample codec, shard writer, manifest and URLs.

For object storage, or when many nodes read at once, a store is written as tar shards in clip
order. A sample is one clip (default) or one fixed window of a clip; it holds every row array of
the store for its keyframes as ``.npy`` entries (``actor_features``, ``actor_boxes``,
``actor_labels``, ``object_features``, ``object_boxes`` and, when the store has them,
``actor_spatial`` and ``object_cls_prob``), the keyframe table (``timestamps``, CSR pointers
``actor_ptr``/``object_ptr``) and ``meta.json`` (clip index, video id, first keyframe and first
actor row in the store, start within the clip). Sample keys are ``c<clip>`` or
``c<clip>-w<start>``: no dots and no path separators, whatever the video ids. A clip never
straddles two shards. ``manifest.json`` (one split per directory) lists the shards with their
sample, clip, keyframe and actor counts, the clip lengths, dims, dtypes and the store's attrs,
so :func:`shards_to_store` rebuilds the store array for array.

URLs are anything webdataset opens (local paths, ``file:``, ``pipe:``, ``http(s):`` ...), as a
list or a brace pattern such as ``shards/train-{000000..000031}.tar``. The training stream over
shards is :mod:`stage_dist.data.tar_windows`; the command line is :mod:`stage_dist.shards`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from stage_dist.core.errors import UserInputError
from stage_dist.core.outputs import claim_output_dir
from stage_dist.core.progress import progress_bar
from stage_dist.store.feature_store import (
    FeatureStore,
    StorageConfig,
    StoreLayout,
    StoreShape,
    Tables,
    create_store,
    finish_store,
    open_arrays,
    read_attrs,
)
from stage_dist.store.schema import DEFAULT_TAR_SHARD_MB, store_class_ids, store_class_names
from stage_dist.store.window import WINDOW_ROW_ARRAYS, Window, cut_window, max_nodes_per_keyframe

if TYPE_CHECKING:
    import webdataset as wds

log = logging.getLogger(__name__)

FORMAT = "stage_dist.shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_KIND = "webdataset shards"  # the kind stage_dist.core.outputs marks a shards directory with
DEFAULT_WINDOW = 6  # the window whose count the manifest records for clip samples
# The entries a Window is made of, in tar order.
ARRAY_FIELDS = ("timestamps", "actor_ptr", "actor_features", "actor_boxes", "actor_labels",
                "object_ptr", "object_features", "object_boxes")
META_ENTRY = "meta.json"
_TAR_BLOCK = 512
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _webdataset() -> ModuleType:
    """webdataset, imported when a tar is read or written: importing it imports torch
    (``webdataset.compat`` imports ``webdataset.pytorch``), which the store, the converter and
    the manifest checks never need."""
    import webdataset

    return webdataset


class ShardError(UserInputError):
    """A shard, sample or manifest that cannot be read or does not match what is asked."""


def entry_name(store_array: str) -> str:
    """The sample entry (without ``.npy``) of a store row array: ``actors/features`` -> ``actor_features``."""
    group, key = store_array.split("/")
    return f"{group.removesuffix('s')}_{key}"


# --------------------------------------------------------------------------- samples


def sample_key(clip: int, start: int | None = None) -> str:
    """Tar key of a clip sample (``c000123``) or a window sample (``c000123-w000006``)."""
    return f"c{clip:06d}" if start is None else f"c{clip:06d}-w{start:06d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)
    return stream.getvalue()


def _read_npy(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def encode_sample(window: Window, start: int, key: str, extra: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Tar entries of one sample: every array of ``window`` as ``.npy`` plus ``meta.json``.

    ``start`` is the window's first keyframe within its clip; ``extra`` holds the window's rows
    of the store's other row arrays (``actors/spatial``, ``objects/cls_prob``) by store name.
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
    for name, rows in (extra or {}).items():
        sample[f"{entry_name(name)}.npy"] = _npy_bytes(rows)
    return sample


def _tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample takes in a tar file: a header block per entry, data padded to blocks."""
    blocks = sum(1 + -(-len(data) // _TAR_BLOCK) for name, data in sample.items() if name != "__key__")
    return blocks * _TAR_BLOCK


def _where(sample: dict[str, Any]) -> str:
    return f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"


def decode_sample(sample: dict[str, Any]) -> Window:
    """The :class:`Window` of a sample read by webdataset (a dict of raw tar entries); entries
    training does not read (``actor_spatial``, ``object_cls_prob``) are not decoded."""
    where = _where(sample)
    try:
        meta = json.loads(sample[META_ENTRY])
        arrays = {name: _read_npy(sample[f"{name}.npy"]) for name in ARRAY_FIELDS}
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


def decode_extra(sample: dict[str, Any], names: Sequence[str]) -> dict[str, np.ndarray]:
    """The sample's rows of the store row arrays ``names`` that are not part of a Window."""
    try:
        return {name: _read_npy(sample[f"{entry_name(name)}.npy"]) for name in names}
    except KeyError as err:
        raise ShardError(f"{_where(sample)}: missing entry {err.args[0]!r}") from err
    except (ValueError, OSError) as err:
        raise ShardError(f"{_where(sample)}: unreadable entry: {err}") from err


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
            rows, expected = len(getattr(window, name)), len(window.actor_features)
            raise ShardError(f"{where}: {name} has {rows} rows, expected {expected}")
    if len(window.object_boxes) != len(window.object_features):
        rows, expected = len(window.object_boxes), len(window.object_features)
        raise ShardError(f"{where}: object_boxes has {rows} rows, expected {expected}")


def cut_clip(clip: Window, start: int, length: int) -> Window:
    """Keyframes ``start .. start + length - 1`` of a whole-clip :class:`Window`, cut by the
    store's rule (:func:`~stage_dist.store.window.cut_window`): the same arrays as
    ``store.read_window`` of that spec."""
    if not (0 <= start and length >= 1 and start + length <= clip.num_keyframes):
        raise ValueError(f"window ({start}, {length}) outside clip {clip.clip} of {clip.num_keyframes} keyframes")
    fields = {name: field for field, name in WINDOW_ROW_ARRAYS.items()}
    return cut_window(
        clip.clip, clip.video_id, start, start + length,
        timestamps=clip.timestamps, actor_ptr=clip.actor_ptr, object_ptr=clip.object_ptr,
        read_rows=lambda name, a, b: getattr(clip, fields[name])[a:b],
        keyframe_base=clip.keyframe_start, actor_base=clip.actor_start,
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
        self._writer = _webdataset().TarWriter(self._file, encoder=False, mtime=0, user="stage_dist",
                                               group="stage_dist")

    def add_clip(self, clip: int, windows: Sequence[Window], samples: Sequence[dict[str, Any]]) -> None:
        size = sum(_tar_bytes(s) for s in samples)
        current = self.shards[-1] if self.shards else None
        if current is None or (current.samples and current.bytes + size > self.max_bytes):
            self._open(clip)
            current = self.shards[-1]
        assert self._writer is not None  # open with the current shard
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


def _clip_samples_to_write(store: FeatureStore, clip: int, window: int | None,
                           extra: Sequence[str]) -> list[tuple[int, Window, dict[str, np.ndarray]]]:
    """``(start within the clip, window, rows of the extra arrays)`` of each sample of a clip."""
    first, stop = int(store.clip_ptr[clip]), int(store.clip_ptr[clip + 1])
    starts = [0] if window is None else range(0, stop - first, window)
    pieces = []
    for start in starts if stop > first else []:
        k0, k1 = first + start, stop if window is None else min(first + start + window, stop)
        rows = {name: store.read_array(name, *_row_range(store, name, k0, k1)) for name in extra}
        pieces.append((start, store.read_keyframes(k0, k1), rows))
    return pieces


def _row_range(store: FeatureStore, name: str, first: int, stop: int) -> tuple[int, int]:
    ptr = store.actor_ptr if name.startswith("actors/") else store.object_ptr
    return int(ptr[first]), int(ptr[stop])


def extra_arrays(row_arrays: Iterable[str]) -> list[str]:
    """The store row arrays a Window does not hold (``actors/spatial``, ``objects/cls_prob``)."""
    return [name for name in row_arrays if name not in WINDOW_ROW_ARRAYS.values()]


def _nominal_windows(clip_lengths: Sequence[int], window: int) -> int:
    """Windows of the clips at window ``window`` with no start offset."""
    return int(sum(-(-int(n) // window) for n in clip_lengths))


def write_shards(
    store: FeatureStore,
    out_dir: str | os.PathLike,
    *,
    prefix: str | None = None,
    max_shard_bytes: int = DEFAULT_TAR_SHARD_MB << 20,
    window: int | None = None,
    what: str = "shards directory",
) -> dict:
    """Write a :class:`~stage_dist.store.feature_store.FeatureStore` as tar shards; returns the manifest.
    ``what`` names ``out_dir`` in errors (the flag it came from).

    Samples are whole clips, or with ``window`` the windows ``0, W, 2W, ...`` of each clip (the
    last one shorter). Shards are ``<prefix>-000000.tar ...`` (``prefix`` defaults to the store's
    split), each at most ``max_shard_bytes`` unless one clip alone is larger. ``manifest.json``
    is written last; shards of an earlier write that are beyond the new count are removed.
    ``out_dir`` must be new, empty or shards this project wrote (never the store, nor a directory
    of other files), and is locked while it is written (:func:`stage_dist.core.outputs.claim_output_dir`).
    """
    with claim_output_dir(out_dir, SHARDS_KIND, inputs=[("store", getattr(store, "path", None))],
                          what=what) as target:
        return _write_shards(store, target.path, prefix=prefix, max_shard_bytes=max_shard_bytes, window=window)


def _write_shards(store: FeatureStore, out: Path, *, prefix: str | None, max_shard_bytes: int,
                  window: int | None) -> dict:
    prefix = prefix or store.split or "shards"
    if not _PREFIX_RE.match(prefix):
        raise ShardError(f"shard prefix {prefix!r} must be letters, digits, '_' or '-'")
    if window is not None and window < 1:
        raise ShardError(f"window must be >= 1, got {window}")
    if max_shard_bytes < 1:
        raise ShardError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    existing = out / MANIFEST_NAME
    if existing.exists():
        old_prefix = read_json(str(existing)).get("prefix")
        if old_prefix != prefix:
            raise ShardError(f"{existing} describes shards {old_prefix!r}, not {prefix!r}: one split per directory")

    num_clips = len(store.clip_ptr) - 1
    if num_clips < 1 or int(store.clip_ptr[-1]) == 0:
        raise ShardError(f"store {getattr(store, 'path', '')} has no keyframes to write")
    clip_lengths = np.diff(np.asarray(store.clip_ptr)).astype(int).tolist()
    extra = extra_arrays(store.row_arrays())
    sink = _ShardSink(out, prefix, max_shard_bytes)
    dtypes: dict[str, str] = {}
    for clip in progress_bar(range(num_clips), desc=f"shards {prefix}", unit="clip", leave=False):
        pieces = _clip_samples_to_write(store, clip, window, extra)
        if not pieces:
            continue
        for _, w, rows in pieces:
            arrays = {**{name: getattr(w, name) for name in ARRAY_FIELDS},
                      **{entry_name(name): r for name, r in rows.items()}}
            for name, array in arrays.items():
                dtype = array.dtype.str
                if dtypes.setdefault(name, dtype) != dtype:
                    raise ShardError(f"clip {clip}: {name} is {dtype}, earlier clips {dtypes[name]}")
        samples = [encode_sample(w, start, sample_key(clip, None if window is None else start), rows)
                   for start, w, rows in pieces]
        sink.add_clip(clip, [w for _, w, _ in pieces], samples)
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
        "max_nodes_per_keyframe": max_nodes_per_keyframe(store.actor_ptr, store.object_ptr),
        "actor_dim": int(store.actor_dim),
        "object_dim": int(store.object_dim),
        "dtypes": dtypes,
        "extra_arrays": extra,
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


def read_json(location: str) -> dict:
    try:
        with _webdataset().gopen(location, "rb") as stream:
            return json.loads(stream.read())
    except (OSError, ValueError) as err:
        raise ShardError(f"cannot read {location}: {err}") from err


def load_manifest(location: str | os.PathLike) -> dict:
    """Read and check a ``manifest.json`` (path or URL)."""
    manifest = read_json(str(location))
    found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
    if found != (FORMAT, FORMAT_VERSION):
        raise ShardError(
            f"{location}: not a {FORMAT} v{FORMAT_VERSION} manifest (format {found[0]!r}, version {found[1]!r})"
        )
    return manifest


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs from a brace pattern (``::`` separates patterns) or a list."""
    expanded = _webdataset().shardlists.expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
    if not expanded:
        raise ShardError(f"no shard URLs in {urls!r}")
    return expanded


def manifest_location(url: str) -> str:
    """Where the manifest of the shard at ``url`` is: ``manifest.json`` beside it."""
    if url.startswith("pipe:"):
        raise ShardError(f"cannot place the manifest of {url!r} (a pipe: URL): give its manifest.json with "
                         "--shards-manifest PATH_OR_URL")
    head, sep, _ = url.rpartition("/")
    return f"{head}/{MANIFEST_NAME}" if sep else MANIFEST_NAME


def shard_name(url: str) -> str:
    """The shard file name a URL points at (as listed in the manifest)."""
    return url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0].split()[0]


def select_shards(urls: Sequence[str], manifest: dict) -> list[dict]:
    by_name = {shard["name"]: shard for shard in manifest["shards"]}
    selected = []
    for url in urls:
        shard = by_name.get(shard_name(url))
        if shard is None:
            raise ShardError(f"shard {url!r} is not listed in the manifest of {manifest['prefix']!r} shards")
        selected.append(shard)
    return selected


def tar_samples(url: str) -> Iterator[dict[str, Any]]:
    try:
        yield from _webdataset().tarfile_samples([{"url": url}])
    except (OSError, ValueError, tarfile.TarError) as err:
        raise ShardError(f"cannot read shard {url}: {err}") from err


@dataclass(frozen=True)
class ShardAssignment:
    """What one inference rank reads: ``shards`` (indices into the URL list), and of each
    shard's clips those with ``index % parts == part``."""

    shards: tuple[int, ...]
    part: int
    parts: int


def assign_shards(num_shards: int, reader: int, num_readers: int) -> ShardAssignment:
    """Deal shards to readers (inference ranks): disjoint whole shards while there are at least as many shards as
    readers (``reader, reader + num_readers, ...``); otherwise reader ``r`` shares shard
    ``r % num_shards`` with the other readers of that shard, each taking every n-th clip."""
    if not 0 <= reader < num_readers:
        raise ValueError(f"reader must be in [0, {num_readers}), got {reader}")
    if num_shards >= num_readers:
        return ShardAssignment(tuple(range(reader, num_shards, num_readers)), 0, 1)
    shard = reader % num_shards
    return ShardAssignment((shard,), reader // num_shards, len(range(shard, num_readers, num_shards)))


def clip_groups(url: str) -> Iterator[tuple[int, list[dict]]]:
    """The raw samples of one shard grouped by clip: ``(clip index in the store, samples)``.
    Grouping needs only the key, so a caller can skip clips without decoding them."""
    group: list[dict] = []
    group_key = None
    for sample in tar_samples(url):
        key = sample["__key__"].split("-", 1)[0]
        if key != group_key and group:
            yield _clip_of(group), group
            group = []
        group_key = key
        group.append(sample)
    if group:
        yield _clip_of(group), group


def _clip_of(samples: list[dict]) -> int:
    key = samples[0]["__key__"]
    try:
        return int(key.split("-", 1)[0].removeprefix("c"))
    except ValueError:
        raise ShardError(f"{_where(samples[0])}: not a stage_dist sample key") from None


def decode_clip(samples: list[dict]) -> Window:
    """The whole-clip :class:`Window` of a clip's samples (window samples are joined)."""
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
    for shard in assignment.shards:
        for index, (_, samples) in enumerate(clip_groups(urls[shard])):
            if index % assignment.parts == assignment.part:
                yield decode_clip(samples)


def manifest_of(urls: str | Sequence[str], manifest: str | os.PathLike | dict | None = None) -> tuple[list[str], dict]:
    """The expanded URLs and their manifest (``manifest``, or ``manifest.json`` beside the first shard)."""
    expanded = expand_urls(urls)
    if not isinstance(manifest, dict):
        manifest = load_manifest(manifest or manifest_location(expanded[0]))
    return expanded, manifest


def check_complete(urls: Sequence[str], manifest: dict, what: str) -> None:
    """Refuse a subset of the split's shards where every keyframe must be read."""
    given = {shard_name(url) for url in urls}
    missing = [shard["name"] for shard in manifest["shards"] if shard["name"] not in given]
    if missing:
        raise ShardError(f"{what} must read every shard of the split; not given: {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


# --------------------------------------------------------------------------- back to a store


class _RowWriter:
    """Appends rows to a store array, writing whole zarr shards (a partial write rewrites one)."""

    def __init__(self, array: Any, shard_rows: int) -> None:
        self.array, self.shard_rows = array, shard_rows
        self.parts: list[np.ndarray] = []
        self.buffered = self.written = 0

    def append(self, rows: np.ndarray) -> None:
        self.parts.append(rows)
        self.buffered += len(rows)
        if self.buffered >= self.shard_rows:
            self.flush(whole_shards=True)

    def flush(self, whole_shards: bool = False) -> None:
        if not self.parts:
            return
        rows = np.concatenate(self.parts)
        take = len(rows) // self.shard_rows * self.shard_rows if whole_shards else len(rows)
        if self.written + take > self.array.shape[0]:
            raise ShardError(f"shards hold more {self.array.name} rows than their manifest counts "
                             f"({self.array.shape[0]})")
        self.array[self.written : self.written + take] = rows[:take]
        self.written += take
        self.parts, self.buffered = ([rows[take:]] if take < len(rows) else []), len(rows) - take


def shards_to_store(
    urls: str | Sequence[str], out: str | os.PathLike, *, manifest: str | os.PathLike | dict | None = None,
    overwrite: bool = False,
) -> FeatureStore:
    """Rebuild the feature store the shards were written from, at ``out``: the same tables, row
    arrays (``actors/spatial`` and ``objects/cls_prob`` included), chunking and attributes as
    the original store. ``urls`` must be every shard of the split. ``out`` must not exist or be
    empty; with ``overwrite`` it may also be a feature store, which is replaced."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not overwrite:
            raise ShardError(f"{out}: exists; remove it or pass overwrite (--overwrite) to replace a store")
        if read_attrs(out) is None:
            raise ShardError(f"{out}: exists and is not a feature store; not replacing it")
    urls, manifest = manifest_of(urls, manifest)
    check_complete(urls, manifest, "rebuilding the store")
    attrs = {k: v for k, v in manifest["store_attrs"].items() if k != "complete"}
    counts, dims = attrs["counts"], attrs["dims"]
    shape = StoreShape(counts["num_clips"], counts["num_keyframes"], counts["num_actors"], counts["num_objects"],
                       dims["actor_dim"], dims["object_dim"],
                       tuple(dims["spatial_thw"]) if dims.get("spatial_thw") else None, dims.get("cls_prob_dim"),
                       store_class_ids(attrs), store_class_names(attrs))
    layout = StoreLayout.build(shape, StorageConfig(**attrs["storage"]))
    lengths = np.asarray(manifest["clip_lengths"], dtype=np.int64)
    num_keyframes = int(lengths.sum())
    tables = Tables(
        video_ids=list(attrs["video_ids"]),
        clip_ptr=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        keyframe_clip=np.repeat(np.arange(len(lengths)), lengths).astype(np.int32),
        timestamps=np.zeros(num_keyframes, np.int32),  # filled from the samples below
        actor_ptr=np.zeros(num_keyframes + 1, np.int64),
        object_ptr=np.zeros(num_keyframes + 1, np.int64),
    )
    create_store(out, layout, tables, attrs)
    specs = {spec.name: spec for group in (layout.actors, layout.objects) for spec in group.arrays}
    arrays = open_arrays(out, [*specs, "keyframes/timestamp", "keyframes/actor_ptr", "keyframes/object_ptr"])
    writers = {name: _RowWriter(arrays[name], specs[name].shard_rows) for name in specs}
    extra = extra_arrays(specs)
    for url in urls:
        for clip, samples in clip_groups(url):
            k0 = int(tables.clip_ptr[clip]) if 0 <= clip < len(lengths) else -1
            for sample in samples:
                window = decode_sample(sample)
                k1 = window.keyframe_start + window.num_keyframes
                if not k0 <= window.keyframe_start < k1 <= int(tables.clip_ptr[clip + 1]):
                    raise ShardError(f"{_where(sample)}: keyframes {window.keyframe_start}:{k1} are not in clip "
                                     f"{clip} of the manifest")
                tables.timestamps[window.keyframe_start : k1] = window.timestamps
                tables.actor_ptr[window.keyframe_start + 1 : k1 + 1] = np.diff(window.actor_ptr)
                tables.object_ptr[window.keyframe_start + 1 : k1 + 1] = np.diff(window.object_ptr)
                for field, name in WINDOW_ROW_ARRAYS.items():
                    writers[name].append(getattr(window, field))
                for name, rows in decode_extra(sample, extra).items():
                    writers[name].append(rows)
    for name, writer in writers.items():
        writer.flush()
        if writer.written != writer.array.shape[0]:
            raise ShardError(f"shards hold {writer.written} {name} rows, the manifest counts {writer.array.shape[0]}")
    arrays["keyframes/timestamp"][:] = tables.timestamps
    arrays["keyframes/actor_ptr"][:] = np.cumsum(tables.actor_ptr)
    arrays["keyframes/object_ptr"][:] = np.cumsum(tables.object_ptr)
    finish_store(out)
    log.info("rebuilt store %s from %d shards", out, len(urls))
    return FeatureStore.open(out)
