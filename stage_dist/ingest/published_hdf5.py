"""Readers of the published STAGE feature layouts (I3D and SlowFast HDF5), with input validation.

Two layouts (see docs/design.md, "Input layouts"):

- I3D: ``actors_dir/<video_id>/<timestamp>.h5`` with ``features`` (n, C, t, h, w), ``boxes``
  (n, 4) and ``labels`` (n, 81 or 80); objects in one ``objects.h5`` keyed
  ``<video_id>_<ts>_features|_boxes|_cls_prob`` with the timestamp unpadded.
- SlowFast: one h5 per split, a group ``<clip_number>_<ts>`` per keyframe with ``boxes``,
  ``features`` (n, C) already pooled and ``labels`` (n, 80); clip numbers index a video list.
  Objects come from the same kind of ``objects.h5`` when one is given, else every keyframe
  has zero objects.

What the ``labels`` columns mean: without a label map, AVA's (80 columns = action ids 1..80, or
81 with the background column 0, which is dropped); with one (:class:`LabelColumns`, the
converter's ``--labelmap``), any width K that equals the label map's size, kept as it is.

A source does three things: list its keyframes (names only), :meth:`scan` a clip (shapes only,
used to count rows before anything is written) and read one keyframe's actor or object rows
(values, validated, actor features pooled over t, h, w in float32). Every problem is raised as
:class:`ReaderError` naming the file and key. Sources hold only paths, so they pickle into
worker processes; HDF5 handles are opened lazily, once per process. An I3D source also lists
its keyframe files without opening any (:meth:`I3DReader.keyframe_files`): a rerun compares
their sizes and mtimes with the store's record before deciding to scan.

Datasets are opened and read with h5py's low-level API (``h5f``/``h5d``): the converter opens
every actor file twice (scan, read) and the high-level ``File``/``Dataset`` objects cost more
per small file than reading its data does.

The published objects file names clips with a leading ``-`` without it (the README's key of
clip ``-5KQ66BBWC4`` at 902 is ``5KQ66BBWC4_902_features``): when ``<video_id>_<ts>_*`` is
absent, that variant is accepted (unless it is another clip's key) and counted.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import h5py
import numpy as np

from stage_dist.core.errors import UserInputError
from stage_dist.store.schema import NUM_ACTIONS

log = logging.getLogger(__name__)

DEFAULT_OBJECT_DIM = 2048  # object feature size of the published detector, used when no objects exist
DEFAULT_BOX_TOLERANCE = 0.01  # coordinates this far outside [0, 1] are clipped (detectors that do not clip)
_SAFE_ID = re.compile(r"[A-Za-z0-9_.\-]+")
_I3D_FILE = re.compile(r"(\d+)\.h5")

MissingObjects = Literal["error", "empty"]


class ReaderError(UserInputError):
    """A problem with the input files; the message names the file, the key and what is wrong."""


def check_video_id(video_id: str, where: str) -> str:
    """Return ``video_id`` if it is a safe path component, else raise :class:`ReaderError`."""
    if video_id in (".", "..") or not _SAFE_ID.fullmatch(video_id):
        raise ReaderError(
            f"{where}: clip id {video_id!r} is not a safe path component "
            "(allowed: letters, digits, '_', '-', '.'; not '.' or '..')"
        )
    return video_id


def pool_actor_features(features: np.ndarray) -> np.ndarray:
    """Mean over t, h, w of (n, C, t, h, w) features, in float32 -> (n, C).

    The one pooling rule of the project: the converter, ``--verify`` and the synthetic data's
    SlowFast layout all use it, so pooled values compare exactly.
    """
    n, c = features.shape[:2]
    flat = features.reshape(n, c, math.prod(features.shape[2:]))
    return flat.astype(np.float32, copy=False).mean(axis=2, dtype=np.float32)


@dataclass(frozen=True)
class LabelColumns:
    """Labels of ``width`` columns named by the label map ``labelmap`` (in column order)."""

    width: int
    labelmap: str
    ids: tuple[int, ...] = ()  # the label map's ids in file order (for the error messages)


@dataclass(frozen=True)
class KeyframeInfo:
    """Shapes of one keyframe, found by :meth:`FeatureReader.scan_clip` without reading values."""

    video_id: str
    timestamp: int
    num_actors: int
    num_objects: int
    actor_bytes: int  # bytes of actor data in the source (what reading it costs)
    object_bytes: int
    has_objects: bool  # False: no entry in the objects file (accepted as zero objects)
    object_key_stripped: bool = False  # objects found under the clip id without its leading '-'
    file_stat: tuple[int, int] = (0, 0)  # (size, mtime_ns) of the keyframe's own actor file, if it has one


@dataclass(frozen=True)
class FeatureDims:
    """Per-row shapes every keyframe of a source must share."""

    actor_dim: int
    actor_thw: tuple[int, ...] | None  # (t, h, w) of unpooled actor features; None if pooled
    label_width: int  # AVA: 80 or 81 (column 0 background); with a label map, its size
    object_dim: int
    cls_prob_dim: int | None  # None: no cls_prob in the objects file


@dataclass
class ActorRows:
    """Actor rows of one keyframe, validated, in the store's layout (before the dtype cast)."""

    features: np.ndarray  # (n, C) float32, pooled
    boxes: np.ndarray  # (n, 4) float32
    labels: np.ndarray  # (n, K) uint8, column j is the store's j-th class (AVA: K = 80, action id j + 1)
    spatial: np.ndarray | None = None  # (n, C, t, h, w) float32 when asked for
    clipped: int = 0  # box coordinates clipped into [0, 1] (within the box tolerance)

    @property
    def count(self) -> int:
        return len(self.boxes)


@dataclass
class ObjectRows:
    """Object rows of one keyframe, validated."""

    features: np.ndarray  # (m, D) float32
    boxes: np.ndarray  # (m, 4) float32
    cls_prob: np.ndarray | None  # (m, P) float32
    clipped: int = 0  # box coordinates clipped into [0, 1] (within the box tolerance)

    @property
    def count(self) -> int:
        return len(self.boxes)


@dataclass
class ReaderListing:
    """All keyframes of a source by clip (sorted), plus what was left out and why."""

    clips: dict[str, list[int]]  # video id -> sorted timestamps
    skipped: list[str] = field(default_factory=list)


class FeatureReader(Protocol):
    layout: str
    label_columns: LabelColumns | None

    def describe(self) -> dict[str, str | None]: ...
    def shared_inputs(self) -> dict[str, list[Path]]: ...
    def list_keyframes(self) -> ReaderListing: ...
    def keyframe_files(self) -> dict[str, list[tuple[int, str]]] | None: ...
    def scan_clip(self, video_id: str, timestamps: list[int]) -> tuple[list[KeyframeInfo], FeatureDims]: ...
    def read_actors(self, video_id: str, timestamp: int, keep_spatial: bool = False) -> ActorRows: ...
    def read_objects(self, video_id: str, timestamp: int) -> ObjectRows: ...


# --------------------------------------------------------------------------- HDF5 helpers


def _one_line(error: Exception) -> str:
    """An error's text on one line (HDF5's messages span several)."""
    return " ".join(str(error).split())


def _not_a_directory(path: Path) -> None:
    if Path(path).is_dir():
        raise ReaderError(f"{path}: is a directory, expected an HDF5 file")


def _open_h5(path: Path) -> h5py.File:
    """A high-level handle, for the files kept open per process (objects, SlowFast)."""
    _not_a_directory(path)
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise ReaderError(f"{path}: file not found") from None
    except OSError as e:  # truncated, not HDF5, unreadable
        raise ReaderError(f"{path}: cannot open as HDF5 (truncated or corrupt?): {_one_line(e)}") from None


def _open_file_id(path: Path) -> h5py.h5f.FileID:
    """Open ``path`` read-only with the low-level API; closing it closes its datasets too."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    _not_a_directory(path)
    try:
        return h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY, fapl=fapl)
    except FileNotFoundError:
        raise ReaderError(f"{path}: file not found") from None
    except OSError as e:  # truncated, not HDF5, unreadable
        raise ReaderError(f"{path}: cannot open as HDF5 (truncated or corrupt?): {_one_line(e)}") from None


def _exists(loc: h5py.h5g.GroupID, name: str, where: str) -> bool:
    try:
        return loc.links.exists(name.encode())
    except OSError as e:
        raise ReaderError(f"{where}: cannot look up {name!r} (corrupt file?): {_one_line(e)}") from None


def _dataset(loc: h5py.h5g.GroupID, name: str, where: str) -> h5py.h5d.DatasetID:
    """Dataset ``name`` of a file or group (a low-level id: ``shape``, ``dtype``, ``read``)."""
    try:
        return h5py.h5d.open(loc, name.encode())
    except KeyError:  # absent, or not a dataset
        if _exists(loc, name, where):
            raise ReaderError(f"{where}: {name!r} is not a dataset") from None
        raise ReaderError(f"{where}: missing dataset {name!r}") from None
    except OSError as e:
        raise ReaderError(f"{where}: cannot read {name!r} (corrupt file?): {_one_line(e)}") from None


def _read(ds: h5py.h5d.DatasetID, name: str, where: str) -> np.ndarray:
    values = np.empty(ds.shape, ds.dtype)
    try:
        ds.read(h5py.h5s.ALL, h5py.h5s.ALL, values)
    except OSError as e:
        raise ReaderError(f"{where}: cannot read {name!r} (truncated or corrupt?): {_one_line(e)}") from None
    return values


def _check_rows(shape: tuple[int, ...], ndim: int, rows: int | None, name: str, where: str) -> None:
    if len(shape) != ndim:
        raise ReaderError(f"{where}: {name!r} has shape {shape}, expected {ndim} dimensions")
    if rows is not None and shape[0] != rows:
        raise ReaderError(
            f"{where}: row counts disagree: {name!r} has {shape[0]} rows, 'boxes' has {rows}"
        )


def _check_label_width(width: int, where: str, columns: LabelColumns | None) -> None:
    if columns is not None:
        if width != columns.width:
            missing = (f"columns {columns.width + 1}..{width} have no entry" if width > columns.width
                       else f"entries {width + 1}..{columns.width} have no column")
            raise ReaderError(
                f"{where}: 'labels' has {width} columns but the label map {columns.labelmap} has {columns.width} "
                f"entries ({missing}); the label map lists one class per column, in column order"
                + _ava_hint(width, columns)
            )
    elif width not in (NUM_ACTIONS, NUM_ACTIONS + 1):
        raise ReaderError(
            f"{where}: 'labels' has {width} columns; expected 81 (column 0 background) or 80 (AVA), or give "
            "--labelmap FILE naming the class id of each column"
        )


def _ava_hint(width: int, columns: LabelColumns) -> str:
    """A pointer for AVA labels given with an AVA label map (e.g. the 60-class evaluation list)."""
    if width in (NUM_ACTIONS, NUM_ACTIONS + 1) and columns.ids and all(1 <= i <= NUM_ACTIONS for i in columns.ids):
        return (f" (AVA's {width}-column labels need no --labelmap: leave it out for action ids 1..80"
                + (", column 0 background" if width > NUM_ACTIONS else "")
                + ", and give the label map to train, infer and the evaluator)")
    return ""


def _check_finite(values: np.ndarray, name: str, where: str) -> None:
    if not np.isfinite(values).all():
        raise ReaderError(f"{where}: {name!r} contains NaN or Inf")


def _check_boxes(boxes: np.ndarray, where: str, tolerance: float) -> tuple[np.ndarray, int]:
    """Boxes as float32, coordinates up to ``tolerance`` outside [0, 1] clipped; (boxes, clipped count).

    A coordinate further out, a flipped box or a non-finite value is a :class:`ReaderError`.
    """
    boxes = boxes.astype(np.float32, copy=False)
    _check_finite(boxes, "boxes", where)
    lo, hi = -tolerance, 1 + tolerance
    outside = ((boxes < lo) | (boxes > hi)).any(axis=1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ReaderError(f"{where}: box {i} {boxes[i].tolist()} lies outside [0, 1] by more than the box "
                          f"tolerance {tolerance:g} (--box-tolerance)")
    clipped = int(((boxes < 0) | (boxes > 1)).sum())
    if clipped:
        boxes = np.clip(boxes, 0, 1)
    flipped = (boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3])
    if flipped.any():
        i = int(np.flatnonzero(flipped)[0])
        raise ReaderError(f"{where}: box {i} {boxes[i].tolist()} has x1 > x2 or y1 > y2")
    return boxes, clipped


def _labels_to_store(labels: np.ndarray, where: str, columns: LabelColumns | None) -> np.ndarray:
    _check_label_width(labels.shape[1], where, columns)
    if columns is None and labels.shape[1] == NUM_ACTIONS + 1:
        labels = labels[:, 1:]
    if not np.isin(labels, (0, 1)).all():
        raise ReaderError(f"{where}: 'labels' holds values other than 0 and 1")
    return labels.astype(np.uint8)


def file_stat(path: str | os.PathLike) -> tuple[int, int]:
    """(size, mtime_ns) of a source file (what tells a resumed conversion that it changed), or
    :class:`ReaderError` naming it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ReaderError(f"{path}: file not found (it was listed at the start of the run)") from None
    except OSError as e:
        raise ReaderError(f"{path}: cannot read: {e.strerror or e}") from None
    return st.st_size, st.st_mtime_ns


def _shape(ds: h5py.h5d.DatasetID) -> tuple[tuple[int, ...], int]:
    """(shape, bytes) of a dataset. ``ds.shape`` is a library call each time: ask once."""
    shape = ds.shape
    return shape, int(math.prod(shape)) * ds.get_type().get_size()


class _Handles:
    """HDF5 files kept open for the life of one process (dropped when pickled)."""

    def __init__(self) -> None:
        self._files: dict[Path, h5py.File] = {}
        self._pid = os.getpid()

    def get(self, path: Path) -> h5py.File:
        if self._pid != os.getpid():  # forked: never share HDF5 handles across processes
            self._files, self._pid = {}, os.getpid()
        if path not in self._files:
            self._files[path] = _open_h5(path)
        return self._files[path]

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._files, self._pid = {}, os.getpid()


# --------------------------------------------------------------------------- objects.h5


def _stripped_id(video_id: str, clip_ids: frozenset[str]) -> str | None:
    """The clip id as the published objects file may spell it (leading '-' dropped), if that
    differs from the id and is not the id of another clip of the source."""
    stripped = video_id.lstrip("-")
    if stripped and stripped != video_id and stripped not in clip_ids:
        return stripped
    return None


@dataclass(frozen=True)
class ObjectShapes:
    """Shapes of one keyframe's objects, found by :meth:`ObjectsFile.scan`."""

    rows: int
    nbytes: int
    dim: int  # 0 when the keyframe has no entry
    cls_prob_dim: int | None
    present: bool  # False: no entry (accepted as zero objects)
    key_stripped: bool = False  # found under the clip id without its leading '-'


NO_OBJECTS = ObjectShapes(0, 0, 0, None, False)


class ObjectsFile:
    """The per-keyframe detector outputs, ``<video_id>_<ts>_features|_boxes|_cls_prob``.

    ``clip_ids`` (set by the source's listing) keeps the leading-'-' variant of a key from
    being taken when it is another clip's own key.
    """

    def __init__(self, path: Path, missing: MissingObjects, box_tolerance: float = DEFAULT_BOX_TOLERANCE) -> None:
        self.path = Path(path)
        self.missing = missing
        self.box_tolerance = box_tolerance
        self.clip_ids: frozenset[str] = frozenset()
        self._handles = _Handles()

    def _file(self) -> h5py.h5f.FileID:
        return self._handles.get(self.path).id

    def keyframes(self) -> set[tuple[str, int]]:
        """(video id, timestamp) of every keyframe with a ``_features`` entry."""
        out = set()
        for key in self._handles.get(self.path).keys():
            if key.endswith("_features"):
                video_id, _, ts = key[: -len("_features")].rpartition("_")
                if ts.isdigit() and video_id:
                    out.add((video_id, int(ts)))
        return out

    def unused_keyframes(self, clips: dict[str, list[int]]) -> int:
        """How many keyframes of the file belong to no keyframe of ``clips`` (by the key rule)."""
        present, used = self.keyframes(), set()
        for video_id, stamps in clips.items():
            stripped = _stripped_id(video_id, frozenset(clips))
            for ts in stamps:
                if (video_id, ts) in present:
                    used.add((video_id, ts))
                elif stripped is not None and (stripped, ts) in present:
                    used.add((stripped, ts))
        return len(present - used)

    def key_prefix(self, video_id: str, timestamp: int) -> tuple[str, bool] | None:
        """(``<id>_<ts>`` key prefix, whether the id lost its leading '-'), or None if absent."""
        f = self._file()
        exact = f"{video_id}_{timestamp}"
        if _exists(f, f"{exact}_features", str(self.path)):
            return exact, False
        stripped = _stripped_id(video_id, self.clip_ids)
        if stripped is not None and _exists(f, f"{stripped}_{timestamp}_features", str(self.path)):
            return f"{stripped}_{timestamp}", True
        if self.missing == "error":
            raise ReaderError(
                f"{self.path}: keyframe {video_id} {timestamp} has no objects "
                f"(no key {exact}_features"
                + (f" nor {stripped}_{timestamp}_features" if stripped is not None else "")
                + "); pass --missing-objects empty to accept such keyframes as having zero objects"
            )
        return None

    def scan(self, video_id: str, timestamp: int) -> ObjectShapes:
        """Shapes of one keyframe's objects, without reading values."""
        found = self.key_prefix(video_id, timestamp)
        if found is None:
            return NO_OBJECTS
        f, (prefix, stripped) = self._file(), found
        where = f"{self.path} key {prefix}_*"
        feats, feats_bytes = _shape(_dataset(f, f"{prefix}_features", where))
        boxes, boxes_bytes = _shape(_dataset(f, f"{prefix}_boxes", where))
        _check_rows(boxes, 2, None, f"{prefix}_boxes", where)
        _check_rows(feats, 2, boxes[0], f"{prefix}_features", where)
        cls_dim, nbytes = None, boxes_bytes + feats_bytes
        if _exists(f, f"{prefix}_cls_prob", where):
            cls, cls_bytes = _shape(_dataset(f, f"{prefix}_cls_prob", where))
            _check_rows(cls, 2, boxes[0], f"{prefix}_cls_prob", where)
            cls_dim, nbytes = cls[1], nbytes + cls_bytes
        return ObjectShapes(boxes[0], nbytes, feats[1], cls_dim, True, stripped)

    def read(self, video_id: str, timestamp: int) -> ObjectRows:
        found = self.key_prefix(video_id, timestamp)
        if found is None:
            return ObjectRows(np.zeros((0, 0), np.float32), np.zeros((0, 4), np.float32), None)
        f, prefix = self._file(), found[0]
        where = f"{self.path} key {prefix}_*"
        boxes = _read(_dataset(f, f"{prefix}_boxes", where), f"{prefix}_boxes", where)
        feats = _read(_dataset(f, f"{prefix}_features", where), f"{prefix}_features", where)
        feats = feats.astype(np.float32, copy=False)
        _check_rows(feats.shape, 2, len(boxes), f"{prefix}_features", where)
        _check_finite(feats, f"{prefix}_features", where)
        cls = None
        if _exists(f, f"{prefix}_cls_prob", where):
            cls = _read(_dataset(f, f"{prefix}_cls_prob", where), f"{prefix}_cls_prob", where)
            cls = cls.astype(np.float32, copy=False)
            _check_rows(cls.shape, 2, len(boxes), f"{prefix}_cls_prob", where)
            _check_finite(cls, f"{prefix}_cls_prob", where)
        boxes, clipped = _check_boxes(boxes, f"{where} ({prefix}_boxes)", self.box_tolerance)
        return ObjectRows(feats, boxes, cls, clipped)


def _merge_dims(dims: FeatureDims | None, new: FeatureDims, where: str) -> FeatureDims:
    """Dims so far combined with one keyframe's; a disagreement names the keyframe."""
    if dims is None:
        return new
    for name in ("actor_dim", "actor_thw", "label_width"):
        if getattr(new, name) is not None and getattr(dims, name) != getattr(new, name):
            raise ReaderError(f"{where}: {name} is {getattr(new, name)}, other keyframes have {getattr(dims, name)}")
    if new.object_dim and dims.object_dim and new.object_dim != dims.object_dim:
        raise ReaderError(f"{where}: object feature dim is {new.object_dim}, other keyframes have {dims.object_dim}")
    if new.cls_prob_dim and dims.cls_prob_dim and new.cls_prob_dim != dims.cls_prob_dim:
        raise ReaderError(f"{where}: cls_prob dim is {new.cls_prob_dim}, other keyframes have {dims.cls_prob_dim}")
    return FeatureDims(
        dims.actor_dim,
        dims.actor_thw,
        dims.label_width,
        dims.object_dim or new.object_dim,
        dims.cls_prob_dim or new.cls_prob_dim,
    )


def merge_dims(parts: list[FeatureDims], where: str) -> FeatureDims:
    """Dims shared by all scanned clips (raises if two clips disagree)."""
    dims: FeatureDims | None = None
    for part in parts:
        dims = _merge_dims(dims, part, where)
    if dims is None:
        raise ReaderError(f"{where}: no keyframes found")
    if not dims.object_dim:
        dims = FeatureDims(dims.actor_dim, dims.actor_thw, dims.label_width, DEFAULT_OBJECT_DIM, dims.cls_prob_dim)
    return dims


# --------------------------------------------------------------------------- I3D layout


class I3DReader:
    """``actors_dir/<video_id>/<timestamp>.h5`` plus ``objects.h5``."""

    layout = "i3d"
    label_columns: LabelColumns | None = None  # None: AVA's 80/81 columns (set by the converter's --labelmap)

    def __init__(self, actors_dir: Path, objects_file: Path, missing_objects: MissingObjects = "error",
                 box_tolerance: float = DEFAULT_BOX_TOLERANCE) -> None:
        self.actors_dir = Path(actors_dir)
        self.objects = ObjectsFile(Path(objects_file), missing_objects, box_tolerance)
        self.box_tolerance = box_tolerance
        # file names other than the published <ts:04d>.h5, found by the listing (e.g. 902.h5)
        self._other_names: dict[tuple[str, int], str] = {}

    def describe(self) -> dict[str, str | None]:
        return {"layout": self.layout, "actors_dir": str(self.actors_dir.resolve()),
                "objects_file": str(self.objects.path.resolve())}

    def shared_inputs(self) -> dict[str, list[Path]]:
        """Files every keyframe of a row group depends on (actor files are per keyframe)."""
        return {"actors": [], "objects": [self.objects.path]}

    def actor_path(self, video_id: str, timestamp: int) -> Path:
        """The keyframe's file as listed: zero-padded to 4 digits (0902.h5) unless the listing
        found it under another name."""
        return self.actors_dir / video_id / self._file_name(video_id, timestamp)

    def _file_name(self, video_id: str, timestamp: int) -> str:
        return self._other_names.get((video_id, timestamp)) or f"{timestamp:04d}.h5"

    def keyframe_files(self) -> dict[str, list[tuple[int, str]]]:
        """Each clip's keyframes as (timestamp, actor file path), sorted, listed from the directory
        alone (no HDF5 file is opened): what a rerun compares with the store's record. Paths are
        strings (:meth:`actor_path`'s, without a ``Path`` per file: 43k of them cost a second)."""
        listing, base = self._list_files(), os.fspath(self.actors_dir)
        return {v: [(ts, os.path.join(base, v, self._file_name(v, ts))) for ts in stamps]
                for v, stamps in listing.clips.items()}

    def list_keyframes(self) -> ReaderListing:
        listing = self._list_files()
        self.objects.clip_ids = frozenset(listing.clips)
        extra = self.objects.unused_keyframes(listing.clips)
        if extra:
            listing.skipped.append(f"{self.objects.path}: objects of {extra} keyframes with no actor file ignored")
        return listing

    def _list_files(self) -> ReaderListing:
        """The clips and keyframe files of the actors directory (names only)."""
        if not self.actors_dir.is_dir():
            problem = "is not a directory" if self.actors_dir.exists() else "actors directory not found"
            raise ReaderError(f"{self.actors_dir}: {problem}")
        listing = ReaderListing(clips={})
        self._other_names = {}
        try:
            entries = sorted(os.scandir(self.actors_dir), key=lambda e: e.name)
        except OSError as e:
            raise ReaderError(f"{self.actors_dir}: cannot list the actors directory: {e.strerror or e}") from None
        for entry in entries:
            if entry.name.startswith(".") and entry.name not in (".", ".."):
                listing.skipped.append(f"{entry.path}: hidden entry ignored")
                continue
            try:
                is_dir = entry.is_dir()
                names = sorted(os.listdir(entry.path)) if is_dir else []
            except OSError as e:  # a symlink loop, an unreadable directory
                raise ReaderError(f"{entry.path}: cannot list the clip directory: {e.strerror or e}") from None
            if not is_dir:
                listing.skipped.append(f"{entry.path}: not a clip directory, ignored")
                continue
            video_id = check_video_id(entry.name, str(self.actors_dir))
            stamps: dict[int, str] = {}
            for name in names:
                if name.startswith("."):
                    continue
                match = _I3D_FILE.fullmatch(name)
                if match is None:
                    raise ReaderError(f"{entry.path}/{name}: not a keyframe file (expected <timestamp>.h5)")
                ts = int(match.group(1))
                if ts in stamps:
                    raise ReaderError(f"{entry.path}: {stamps[ts]} and {name} are the same keyframe")
                stamps[ts] = name
            for ts, name in stamps.items():
                if name != f"{ts:04d}.h5":
                    self._other_names[(video_id, ts)] = name
            if stamps:
                listing.clips[video_id] = sorted(stamps)
            else:
                listing.skipped.append(f"{entry.path}: no keyframe files, clip left out")
        return listing

    def scan_clip(self, video_id: str, timestamps: list[int]) -> tuple[list[KeyframeInfo], FeatureDims]:
        infos, dims = [], None
        for ts in timestamps:
            path = self.actor_path(video_id, ts)
            where = str(path)
            stat = file_stat(path)
            f = _open_file_id(path)
            try:
                boxes, boxes_bytes = _shape(_dataset(f, "boxes", where))
                feats, feats_bytes = _shape(_dataset(f, "features", where))
                labels, labels_bytes = _shape(_dataset(f, "labels", where))
            finally:
                f.close()
            _check_rows(boxes, 2, None, "boxes", where)
            _check_rows(feats, 5, boxes[0], "features", where)
            _check_rows(labels, 2, boxes[0], "labels", where)
            _check_label_width(labels[1], where, self.label_columns)
            obj = self.objects.scan(video_id, ts)
            kf_dims = FeatureDims(feats[1], tuple(feats[2:]), labels[1], obj.dim, obj.cls_prob_dim)
            dims = _merge_dims(dims, kf_dims, f"{path} / {self.objects.path} {video_id}_{ts}")
            infos.append(KeyframeInfo(video_id, ts, boxes[0], obj.rows, boxes_bytes + feats_bytes + labels_bytes,
                                      obj.nbytes, obj.present, obj.key_stripped, stat))
        assert dims is not None
        return infos, dims

    def read_actors(self, video_id: str, timestamp: int, keep_spatial: bool = False) -> ActorRows:
        path = self.actor_path(video_id, timestamp)
        where = str(path)
        f = _open_file_id(path)
        try:
            boxes = _read(_dataset(f, "boxes", where), "boxes", where)
            feats = _read(_dataset(f, "features", where), "features", where)
            labels = _read(_dataset(f, "labels", where), "labels", where)
        finally:
            f.close()
        _check_rows(feats.shape, 5, len(boxes), "features", where)
        _check_rows(labels.shape, 2, len(boxes), "labels", where)
        pooled = pool_actor_features(feats)
        _check_finite(pooled, "features", where)
        spatial = feats.astype(np.float32, copy=False) if keep_spatial else None
        boxes, clipped = _check_boxes(boxes, where, self.box_tolerance)
        return ActorRows(pooled, boxes, _labels_to_store(labels, where, self.label_columns), spatial, clipped)

    def read_objects(self, video_id: str, timestamp: int) -> ObjectRows:
        return self.objects.read(video_id, timestamp)


# --------------------------------------------------------------------------- SlowFast layout


def read_video_list(path: Path) -> list[str]:
    """Video ids, one a line, in the order the clip numbers index (blank lines ignored)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ReaderError(f"{path}: cannot read video list: {_one_line(e)}") from None
    ids: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        video_id = line.strip()
        if not video_id:
            continue
        check_video_id(video_id, f"{path} line {lineno}")
        if video_id in seen:
            raise ReaderError(f"{path} line {lineno}: video id {video_id!r} repeats line {seen[video_id]}")
        seen[video_id] = lineno
        ids.append(video_id)
    return ids


class SlowFastReader:
    """One h5 per split: group ``<clip_number>_<ts>`` per keyframe, plus a video list."""

    layout = "slowfast"
    label_columns: LabelColumns | None = None  # None: AVA's 80/81 columns (set by the converter's --labelmap)

    def __init__(self, slowfast_file: Path, video_list: Path, objects_file: Path | None = None,
                 missing_objects: MissingObjects = "error", box_tolerance: float = DEFAULT_BOX_TOLERANCE) -> None:
        self.slowfast_file = Path(slowfast_file)
        self.video_list = Path(video_list)
        self.box_tolerance = box_tolerance
        self.objects = ObjectsFile(Path(objects_file), missing_objects, box_tolerance) if objects_file else None
        self._handles = _Handles()
        self._keys: dict[tuple[str, int], str] | None = None

    def describe(self) -> dict[str, str | None]:
        return {"layout": self.layout, "slowfast_file": str(self.slowfast_file.resolve()),
                "video_list": str(self.video_list.resolve()),
                "objects_file": str(self.objects.path.resolve()) if self.objects else None}

    def shared_inputs(self) -> dict[str, list[Path]]:
        """Files every keyframe of a row group depends on."""
        return {"actors": [self.slowfast_file, self.video_list],
                "objects": [self.objects.path] if self.objects else []}

    def keyframe_files(self) -> dict[str, list[tuple[int, str]]] | None:
        """None: the keyframes live inside the SlowFast file (its size and mtime stand for them)."""
        return None

    def _file(self) -> h5py.File:
        return self._handles.get(self.slowfast_file)

    def _key_map(self) -> dict[tuple[str, int], str]:
        """(video id, timestamp) -> group key, for every group of the file."""
        if self._keys is None:
            videos = read_video_list(self.video_list)
            keys: dict[tuple[str, int], str] = {}
            for key in self._file().keys():
                clip, _, ts = key.rpartition("_")
                if not (clip.isdigit() and ts.isdigit()):
                    raise ReaderError(f"{self.slowfast_file}: key {key!r} is not <clip_number>_<timestamp>")
                if int(clip) >= len(videos):
                    raise ReaderError(
                        f"{self.slowfast_file}: key {key!r}: clip number {int(clip)} is beyond the "
                        f"{len(videos)} videos of {self.video_list}"
                    )
                ident = (videos[int(clip)], int(ts))
                if ident in keys:
                    raise ReaderError(f"{self.slowfast_file}: keys {keys[ident]!r} and {key!r} are the same keyframe")
                keys[ident] = key
            self._keys = keys
        return self._keys

    def list_keyframes(self) -> ReaderListing:
        listing = ReaderListing(clips={})
        for video_id, ts in sorted(self._key_map()):
            listing.clips.setdefault(video_id, []).append(ts)
        if self.objects is None:
            listing.skipped.append("no --objects-file: every keyframe has zero objects")
        else:
            self.objects.clip_ids = frozenset(listing.clips)
            extra = self.objects.unused_keyframes(listing.clips)
            if extra:
                listing.skipped.append(
                    f"{self.objects.path}: objects of {extra} keyframes not in {self.slowfast_file} ignored"
                )
        return listing

    def _group(self, video_id: str, timestamp: int) -> tuple[h5py.h5g.GroupID, str]:
        key = self._key_map()[(video_id, timestamp)]
        where = f"{self.slowfast_file} key {key}"
        try:
            group = self._file()[key]
        except OSError as e:
            raise ReaderError(f"{where}: cannot read group (corrupt file?): {_one_line(e)}") from None
        if not isinstance(group, h5py.Group):
            raise ReaderError(f"{where}: expected a group with boxes/features/labels")
        return group.id, where

    def scan_clip(self, video_id: str, timestamps: list[int]) -> tuple[list[KeyframeInfo], FeatureDims]:
        infos, dims = [], None
        for ts in timestamps:
            group, where = self._group(video_id, ts)
            boxes, boxes_bytes = _shape(_dataset(group, "boxes", where))
            feats, feats_bytes = _shape(_dataset(group, "features", where))
            labels, labels_bytes = _shape(_dataset(group, "labels", where))
            _check_rows(boxes, 2, None, "boxes", where)
            _check_rows(feats, 2, boxes[0], "features", where)
            _check_rows(labels, 2, boxes[0], "labels", where)
            _check_label_width(labels[1], where, self.label_columns)
            obj = self.objects.scan(video_id, ts) if self.objects else NO_OBJECTS
            kf_dims = FeatureDims(feats[1], None, labels[1], obj.dim, obj.cls_prob_dim)
            dims = _merge_dims(dims, kf_dims, where)
            infos.append(KeyframeInfo(video_id, ts, boxes[0], obj.rows, boxes_bytes + feats_bytes + labels_bytes,
                                      obj.nbytes, obj.present, obj.key_stripped))
        assert dims is not None
        return infos, dims

    def read_actors(self, video_id: str, timestamp: int, keep_spatial: bool = False) -> ActorRows:
        if keep_spatial:
            raise ReaderError(
                f"{self.slowfast_file}: SlowFast features are already pooled; --keep-spatial needs the I3D layout")
        group, where = self._group(video_id, timestamp)
        boxes = _read(_dataset(group, "boxes", where), "boxes", where)
        feats = _read(_dataset(group, "features", where), "features", where).astype(np.float32, copy=False)
        labels = _read(_dataset(group, "labels", where), "labels", where)
        _check_rows(feats.shape, 2, len(boxes), "features", where)
        _check_rows(labels.shape, 2, len(boxes), "labels", where)
        _check_finite(feats, "features", where)
        boxes, clipped = _check_boxes(boxes, where, self.box_tolerance)
        return ActorRows(feats, boxes, _labels_to_store(labels, where, self.label_columns), clipped=clipped)

    def read_objects(self, video_id: str, timestamp: int) -> ObjectRows:
        if self.objects is None:
            return ObjectRows(np.zeros((0, 0), np.float32), np.zeros((0, 4), np.float32), None)
        return self.objects.read(video_id, timestamp)
