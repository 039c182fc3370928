"""Parallel, resumable, verified conversion of the published HDF5 features into a feature store.

The run, in order:

1. **List and scan** the source (names, then shapes only, in parallel by clip): every
   structural problem is found before anything is written, and the row counts give the
   store's CSR pointers and shard grid. Clips are ordered by video id, keyframes by timestamp.
2. **Create** the store (tables and empty row arrays, attribute ``complete: false``), or find
   the same store from an interrupted run with the same plan and resume it.
3. **Convert** shard by shard: a task owns one shard-aligned row range of ``actors/*`` or of
   ``objects/*``; it reads the keyframes overlapping its rows, validates and pools them,
   streams each shard's chunks into its file (index last, then renamed into place; memory is
   one chunk per array, not one shard) and then records the shard as done. Tasks run in
   ``--workers`` processes (one writer per shard, largest first); a killed run loses at most
   the shards in flight.
4. **Finish**: set ``complete: true``. ``--verify`` then re-reads the sources and compares every
   keyframe (or a sample) with the store after the pooling/dtype rule, reading only the rows of
   the keyframes it checks. Box coordinates within ``--box-tolerance`` outside [0, 1] are
   clipped (and counted in the summary); further out they are an error.

Before any of it, the output is checked (:mod:`stage_dist.core.outputs`): it must not be, contain or
lie inside an input; an existing directory must be empty or a store this converter wrote
(``--overwrite`` empties only such a store, keeping the directory); and the run holds the
output's lock, so a second converter writing the same ``--out`` stops at once.

A rerun resumes only a store of the same plan; the store records each source file's size and
mtime (per clip for actor files), and the shards that depend on a file that changed since are
converted again, so nothing stale is reported complete. A rerun on a complete store compares
those records only (:func:`unchanged_store`: no HDF5 file is opened) and scans again only when
one differs.

A write error (disk full) or SIGTERM/SIGINT (:func:`main` turns both signals into
:class:`Interrupted`, exit 128 + signal number) stops the workers, removes the partial files of
the shards in flight (:func:`drop_partial_files`) and releases the lock: the finished shards stay
recorded and the next run resumes.

Errors in the input stop the run with :class:`~stage_dist.ingest.published_hdf5.ReaderError` (file and key
named), errors of the output with :class:`~stage_dist.core.outputs.OutputError`; the CLI prints
them on one line and exits 2. Verification mismatches exit 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import multiprocessing.pool
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from multiprocessing.queues import SimpleQueue
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, cast

import numpy as np
import zarr

from stage_dist import __version__
from stage_dist.ava.formats import AvaFormatError, read_labelmap
from stage_dist.core.config import ConfigError, option, section
from stage_dist.core.errors import UserInputError
from stage_dist.core.outputs import (
    OutputDir,
    OutputError,
    empty_directory,
    lock_output,
    prepare_output_dir,
)
from stage_dist.core.progress import progress_bar
from stage_dist.ingest.published_hdf5 import (
    DEFAULT_BOX_TOLERANCE,
    FeatureDims,
    FeatureReader,
    I3DReader,
    KeyframeInfo,
    LabelColumns,
    MissingObjects,
    ReaderError,
    SlowFastReader,
    file_stat,
    merge_dims,
)
from stage_dist.store.feature_store import (
    PROGRESS_DIR,
    FeatureStore,
    StorageConfig,
    StoreLayout,
    StoreShape,
    Tables,
    create_store,
    finish_store,
    open_arrays,
    read_attrs,
    record_path,
    record_shard_done,
    shard_done,
    storage_attrs,
    update_attrs,
)
from stage_dist.store.schema import AVA_CLASS_IDS, DEFAULT_TAR_SHARD_MB, GroupName, describe_classes
from stage_dist.store.zarr_shards import row_writer

log = logging.getLogger(__name__)

PROGRESS_EVERY_BYTES = 8 * 2**20  # a task reports progress after this much input


class ConvertError(UserInputError):
    """The conversion cannot go on (e.g. the output holds another store); message says why."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the converter (raised by :func:`main`'s handlers, so that the
    run stops its workers, drops partial files and releases its lock on the way out)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


Format = Literal["zarr", "zarr,webdataset", "webdataset"]


@dataclass(frozen=True)
class StreamingConfig:
    """The WebDataset (tar shard) form, written from the finished store."""

    format: Format = option("zarr", metavar="FORMAT",
                            help="zarr: the store at --out; zarr,webdataset: the store at --out and tar shards; "
                                 "webdataset: tar shards only, at --out (the store is written first to "
                                 "OUT.store-tmp, then removed)")
    shards_out: Path | None = option(None, help="directory of the tar shards and manifest.json (default: --out with "
                                                "--format webdataset, else --out with suffix .shards)")
    tar_shard_mb: float = option(float(DEFAULT_TAR_SHARD_MB), help="target size of one tar shard in MB")
    tar_window: int | None = option(None, help="one sample per window of this many keyframes (default: one sample "
                                               "per clip)")

    def __post_init__(self) -> None:
        if self.tar_shard_mb <= 0 or (self.tar_window is not None and self.tar_window < 1):
            raise ConfigError(f"--tar-shard-mb must be > 0 and --tar-window >= 1, got {self.tar_shard_mb}, "
                              f"{self.tar_window}")


@dataclass(frozen=True)
class ConvertConfig:
    """Everything a conversion needs (the flags of ``tools/convert_features.py``). The store is
    written to ``out``; ``store_arguments`` are the settings that shape it."""

    out: Path = option(help="the store directory to write (one per split)")
    actors_dir: Path | None = option(None, help="I3D layout: directory of <video_id>/<timestamp>.h5 actor files")
    objects_file: Path | None = option(None, help="objects .h5 (<video_id>_<ts>_features|_boxes|_cls_prob); required "
                                                  "for I3D, optional for SlowFast (without it every keyframe has "
                                                  "zero objects)")
    slowfast_file: Path | None = option(None, help="SlowFast layout: the split's .h5 of <clip_number>_<ts> groups")
    video_list: Path | None = option(None, help="SlowFast layout: video ids, one a line; clip numbers index it")
    labelmap: Path | None = option(None, help="pbtxt label map naming the class id (and name) of each 'labels' "
                                              "column, in column order; labels of any width K (= its size) are then "
                                              "kept as they are. Without it the labels must be AVA's: 80 columns "
                                              "(ids 1..80) or 81 (column 0 background, dropped)")
    missing_objects: MissingObjects = option("error", help="a keyframe absent from the objects file is an error or "
                                                           "has zero objects (empty)")
    box_tolerance: float = option(DEFAULT_BOX_TOLERANCE, metavar="EPS",
                                  help="box coordinates at most EPS outside [0, 1] are clipped (and counted in the "
                                       "summary); further out they are an error")
    split: str | None = option(None, help="split name recorded in the store (default: --out's name without suffix)")
    keep_spatial: bool = option(False, help="also keep the full (C, t, h, w) actor tensor in actors/spatial (I3D "
                                            "only; large)")
    cls_prob: bool = option(True, help="store the objects' cls_prob")
    overwrite: bool = option(False, help="replace the store at --out (only a store this converter wrote; never "
                                         "other files)")
    storage: StorageConfig = section(StorageConfig, help="store layout")
    streaming: StreamingConfig = section(StreamingConfig, help="streaming form (WebDataset tar shards, written "
                                                               "from the store)")
    workers: int = option(os.cpu_count() or 1, help="worker processes (all cores)")
    verify: bool = option(False, help="re-read the sources and check every keyframe against the store")
    verify_sample: int | None = option(None, metavar="N", help="like --verify, but check N keyframes chosen at "
                                                               "random")
    progress: bool = option(True, help="show a progress bar")
    log_level: str = option("INFO", help="logging level (DEBUG, INFO, WARNING, ...)")

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.verify_sample is not None and self.verify_sample < 1:
            raise ConfigError(f"--verify-sample must be >= 1, got {self.verify_sample}")
        if not 0 <= self.box_tolerance < 0.5:
            raise ConfigError(f"--box-tolerance must be in [0, 0.5), got {self.box_tolerance}")

    @property
    def split_name(self) -> str:
        return self.split or self.out.name.split(".")[0]

    def store_arguments(self) -> dict[str, Any]:
        """The arguments recorded in the store: a rerun must give the same ones to resume."""
        return {
            "split": self.split_name,
            "missing_objects": self.missing_objects,
            "box_tolerance": self.box_tolerance,
            "keep_spatial": self.keep_spatial,
            "cls_prob": self.cls_prob,
            "storage": asdict(self.storage),
            **({"labelmap": str(Path(self.labelmap).resolve())} if self.labelmap is not None else {}),
        }


STORE_KIND = "feature store"


def config_inputs(cfg: ConvertConfig) -> list[tuple[str, Path | None]]:
    """The run's inputs as (flag, path): an output may not be, contain or lie inside one."""
    return [("--actors-dir", cfg.actors_dir), ("--objects-file", cfg.objects_file),
            ("--slowfast-file", cfg.slowfast_file), ("--video-list", cfg.video_list), ("--labelmap", cfg.labelmap)]


def read_class_set(cfg: ConvertConfig) -> tuple[tuple[int, ...], tuple[str, ...] | None]:
    """The store's class set: the ids (and names) of ``--labelmap`` in file order, else AVA's ids
    1..80 without names. A malformed label map (duplicate ids or names, ...) is a ConvertError
    naming the file and line."""
    if cfg.labelmap is None:
        return AVA_CLASS_IDS, None
    try:
        labelmap = read_labelmap(cfg.labelmap)
    except AvaFormatError as err:
        raise ConvertError(str(err)) from None
    return tuple(labelmap), tuple(labelmap.values())


def check_output(cfg: ConvertConfig) -> OutputDir:
    """The checked output directory of ``cfg`` (see :func:`stage_dist.core.outputs.prepare_output_dir`)."""
    return prepare_output_dir(cfg.out, STORE_KIND, inputs=config_inputs(cfg))


def open_feature_reader(cfg: ConvertConfig) -> FeatureReader:
    source = _open_feature_reader(cfg)
    if cfg.labelmap is not None:
        ids = read_class_set(cfg)[0]
        source.label_columns = LabelColumns(len(ids), str(cfg.labelmap), ids)
    return source


def _open_feature_reader(cfg: ConvertConfig) -> FeatureReader:
    if cfg.actors_dir is not None:
        if cfg.objects_file is None:
            raise ConvertError("the I3D layout needs --objects-file with --actors-dir")
        return I3DReader(cfg.actors_dir, cfg.objects_file, cfg.missing_objects, cfg.box_tolerance)
    if cfg.slowfast_file is None or cfg.video_list is None:
        raise ConvertError("give --actors-dir and --objects-file (I3D) or --slowfast-file and --video-list (SlowFast)")
    if cfg.keep_spatial:
        raise ConvertError("--keep-spatial needs the I3D layout (SlowFast features are already pooled)")
    if cfg.objects_file is None:
        log.warning("no --objects-file: every keyframe of the store will have zero objects")
    return SlowFastReader(cfg.slowfast_file, cfg.video_list, cfg.objects_file, cfg.missing_objects,
                          cfg.box_tolerance)


# --------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """What the store will hold: keyframes in store order, dims, layout and tables."""

    keyframes: list[KeyframeInfo]
    dims: FeatureDims
    layout: StoreLayout
    tables: Tables
    skipped: list[str]

    @property
    def input_bytes(self) -> int:
        return sum(k.actor_bytes + k.object_bytes for k in self.keyframes)

    @property
    def missing_objects(self) -> int:
        return sum(not k.has_objects for k in self.keyframes)

    @property
    def stripped_object_keys(self) -> int:
        return sum(k.object_key_stripped for k in self.keyframes)


def _scan_clips(source: FeatureReader,
                clips: list[tuple[str, list[int]]]) -> list[tuple[list[KeyframeInfo], FeatureDims]]:
    return [source.scan_clip(video_id, stamps) for video_id, stamps in clips]


def _batches(items: list, count: int) -> list[list]:
    """``items`` cut into at most ``count`` consecutive batches (few, large pickled tasks)."""
    size = max(1, -(-len(items) // max(1, count)))
    return [items[i: i + size] for i in range(0, len(items), size)]


def make_plan(source: FeatureReader, cfg: ConvertConfig, runner: "Runner") -> Plan:
    """List and scan the source (shapes only) and lay the store out."""
    listing = source.list_keyframes()
    if not listing.clips:
        raise ReaderError(f"{source.describe()}: no keyframes found")
    video_ids = sorted(listing.clips)
    clips = [(v, listing.clips[v]) for v in video_ids]
    scanned = [r for batch in runner.map(partial(_scan_clips, source), _batches(clips, 8 * runner.workers))
               for r in batch]
    keyframes = [kf for infos, _ in scanned for kf in infos]
    dims = merge_dims([d for _, d in scanned], str(source.describe()))
    counts = np.array([[k.num_actors, k.num_objects] for k in keyframes], dtype=np.int64)
    clip_lengths = np.array([len(listing.clips[v]) for v in video_ids], dtype=np.int64)
    tables = Tables(
        video_ids=video_ids,
        clip_ptr=np.concatenate([[0], np.cumsum(clip_lengths)]).astype(np.int64),
        keyframe_clip=np.repeat(np.arange(len(video_ids), dtype=np.int32), clip_lengths),
        timestamps=np.array([k.timestamp for k in keyframes], dtype=np.int32),
        actor_ptr=np.concatenate([[0], np.cumsum(counts[:, 0])]).astype(np.int64),
        object_ptr=np.concatenate([[0], np.cumsum(counts[:, 1])]).astype(np.int64),
    )
    shape = StoreShape(
        num_clips=len(video_ids),
        num_keyframes=len(keyframes),
        num_actors=int(tables.actor_ptr[-1]),
        num_objects=int(tables.object_ptr[-1]),
        actor_dim=dims.actor_dim,
        object_dim=dims.object_dim,
        spatial_thw=dims.actor_thw if cfg.keep_spatial else None,
        cls_prob_dim=dims.cls_prob_dim if cfg.cls_prob else None,
        class_ids=read_class_set(cfg)[0],
        class_names=read_class_set(cfg)[1],
    )
    return Plan(keyframes, dims, StoreLayout.build(shape, cfg.storage), tables, listing.skipped)


def plan_fingerprint(plan: Plan, source: FeatureReader, cfg: ConvertConfig) -> str:
    """Hash of everything that determines the store's content: a resumed run must match it."""
    h = hashlib.sha256()
    h.update(json.dumps([source.describe(), cfg.store_arguments(), asdict(plan.dims)], sort_keys=True,
                        default=list).encode())
    h.update(json.dumps(plan.tables.video_ids).encode())
    if cfg.labelmap is not None:  # the class set it names (AVA stores keep their fingerprint)
        h.update(json.dumps([plan.layout.shape.class_ids, plan.layout.shape.class_names]).encode())
    for values in plan.tables.arrays().values():
        h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()


def _clip_digest(stamps: Iterable[tuple[int, tuple[int, int]]]) -> str:
    """One clip's record: a digest of its keyframes' (timestamp, (size, mtime_ns) of the actor file)."""
    text = "".join(f"{timestamp}:({size}, {mtime_ns});" for timestamp, (size, mtime_ns) in stamps)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shared_files_record(source: FeatureReader) -> dict[str, dict[str, list[int]]]:
    """Size and mtime_ns of the files a whole row group depends on, by group and resolved path."""
    return {group: {str(Path(p).resolve()): list(file_stat(p)) for p in paths}
            for group, paths in source.shared_inputs().items()}


def input_record(plan: Plan, source: FeatureReader) -> dict[str, Any]:
    """Size and mtime_ns of every source file, as the store records them: the files a whole row
    group depends on by path, the actor files of each clip as one digest per clip; and the
    scan's :func:`plan_summary`, for a rerun that finds them unchanged."""
    stamps: dict[str, list[tuple[int, tuple[int, int]]]] = {}
    for k in plan.keyframes:
        stamps.setdefault(k.video_id, []).append((k.timestamp, k.file_stat))
    return {"files": shared_files_record(source),
            "clips": {video_id: _clip_digest(items) for video_id, items in stamps.items()},
            "summary": plan_summary(plan)}


def plan_summary(plan: Plan) -> dict[str, Any]:
    """What a rerun on the complete, unchanged store reports without scanning the source again."""
    return {"keyframes": len(plan.keyframes), "actors": plan.layout.shape.num_actors,
            "objects": plan.layout.shape.num_objects, "clips": plan.layout.shape.num_clips,
            "input_bytes": plan.input_bytes,
            "shards": len(plan.layout.actors.shard_ranges()) + len(plan.layout.objects.shard_ranges()),
            "missing_objects": plan.missing_objects, "stripped_object_keys": plan.stripped_object_keys,
            "skipped": list(plan.skipped)}


def _same_class_set(existing: dict[str, Any], ids: tuple[int, ...], names: tuple[str, ...] | None) -> bool:
    """Whether the store attributes ``existing`` record the class ids and names ``ids``/``names``
    (a store written before class sets were recorded holds AVA's ids, as ``ids`` then does)."""
    return existing.get("class_ids", list(ids)) == list(ids) and existing.get("class_names") == (
        list(names) if names else None)


def unchanged_store(existing: dict[str, Any] | None, source: FeatureReader,
                    cfg: ConvertConfig) -> dict[str, Any] | None:
    """The :func:`plan_summary` recorded in the complete store ``existing`` (its attributes) when
    this run would convert nothing, told from the source files' sizes and mtimes alone: the same
    arguments, input paths and class set, every shared file and every clip's actor files as recorded, no
    keyframe file added or removed. No HDF5 file is opened. None when that cannot be told (not
    complete, ``--overwrite``, a file changed, a store of an older converter): the full scan decides.
    """
    if existing is None or cfg.overwrite or not existing.get("complete"):
        return None
    inputs = existing.get("inputs")
    summary = inputs.get("summary") if isinstance(inputs, dict) else None
    if not isinstance(inputs, dict) or not isinstance(summary, dict):
        return None
    if existing.get("converter", {}).get("arguments") != json.loads(json.dumps(cfg.store_arguments())):
        return None
    described = source.describe()
    if {k: v for k, v in existing.get("source", {}).items() if k in described} != described:
        return None
    if inputs.get("files") != shared_files_record(source):
        return None
    ids, names = read_class_set(cfg)  # a --labelmap edited in place is not a source file's stat
    if not _same_class_set(existing, ids, names):
        return None
    files = source.keyframe_files()  # None: the keyframes live in a shared file, checked above
    if files is not None:
        clips = {video_id: _clip_digest((ts, file_stat(path)) for ts, path in items)
                 for video_id, items in files.items()}
        if clips != inputs.get("clips"):
            return None
    return summary


def store_attrs(plan: Plan, source: FeatureReader, cfg: ConvertConfig, fingerprint: str,
                inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        **storage_attrs(plan.layout),
        "split": cfg.split_name,
        "video_ids": plan.tables.video_ids,
        "source": {**source.describe(), "label_width": plan.dims.label_width,
                   "actor_thw": list(plan.dims.actor_thw) if plan.dims.actor_thw else None},
        "converter": {"version": __version__, "arguments": cfg.store_arguments()},
        "missing_objects_keyframes": plan.missing_objects,
        "plan_fingerprint": fingerprint,
        "inputs": inputs,
    }


def stale_shards(old: dict[str, Any], new: dict[str, Any], plan: Plan, source: FeatureReader,
                 tasks: list[ShardTask]) -> tuple[list[ShardTask], list[str]]:
    """Shard tasks whose source files changed between the records ``old`` and ``new``, and the
    changed files (clip directories for actor files), named."""
    changed: list[str] = []
    stale_groups = set()
    for group, files in new["files"].items():
        for path, stat in files.items():
            if old.get("files", {}).get(group, {}).get(path) != stat:
                changed.append(path)
                stale_groups.add(group)
    old_clips = old.get("clips", {})
    changed_clips = [v for v, digest in new["clips"].items() if old_clips.get(v) != digest]
    changed_keyframes = np.zeros(len(plan.keyframes) + 1, dtype=bool)
    if changed_clips:
        base = getattr(source, "actors_dir", None)
        changed += [str(Path(base) / v) if base is not None else v for v in changed_clips]
        position = {v: i for i, v in enumerate(plan.tables.video_ids)}
        for v in changed_clips:
            c = position[v]
            changed_keyframes[plan.tables.clip_ptr[c]: plan.tables.clip_ptr[c + 1]] = True
    stale = [t for t in tasks if t.group in stale_groups
             or (t.group == "actors"
                 and changed_keyframes[t.keyframe_start: max(t.keyframe_stop, t.keyframe_start + 1)].any())]
    return stale, changed


def _what_differs(existing: dict[str, Any], source: FeatureReader, cfg: ConvertConfig) -> str:
    """Why a store's plan differs from this run's, in words."""
    def flat(arguments: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in arguments.items() if k != "storage"}, **arguments.get("storage", {})}

    old = flat(existing.get("converter", {}).get("arguments", {}))
    new = flat(json.loads(json.dumps(cfg.store_arguments())))
    if old != new:
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return "other arguments (" + ", ".join(f"{k} {old.get(k)!r}, now {new.get(k)!r}" for k in keys) + ")"
    if {k: v for k, v in existing.get("source", {}).items() if k in source.describe()} != source.describe():
        return "other input paths"
    ids, names = read_class_set(cfg)
    if not _same_class_set(existing, ids, names):
        if existing.get("class_ids", list(ids)) == list(ids):
            return "another class set (the same ids, other class names)"
        old_ids = tuple(existing.get("class_ids", AVA_CLASS_IDS))
        return f"another class set ({describe_classes(old_ids)}; now {describe_classes(ids)})"
    return "inputs with other keyframes or row counts (files added, removed or reshaped)"


def prepare_store(plan: Plan, source: FeatureReader, cfg: ConvertConfig, target: OutputDir) -> bool:
    """Create the store, or find a resumable one. Returns False when it is already complete.

    ``target`` is the checked, locked output. A store of another plan is refused unless
    ``--overwrite``; in a store of this plan, shards whose source files changed since they were
    written are marked to be converted again.
    """
    fingerprint = plan_fingerprint(plan, source, cfg)
    inputs = input_record(plan, source)
    existing = read_attrs(cfg.out) if target.state == "ours" else None
    if existing is not None and not cfg.overwrite:
        if existing.get("plan_fingerprint") != fingerprint:
            raise ConvertError(
                f"{cfg.out}: holds a store made from {_what_differs(existing, source, cfg)} "
                f"(complete={existing.get('complete')}); pass --overwrite to replace it"
            )
        if "inputs" not in existing:
            raise ConvertError(f"{cfg.out}: the store does not record its inputs' sizes and times (an older "
                               "converter wrote it), so a change cannot be detected; pass --overwrite to convert again")
        ctx = make_context(plan, source, cfg)
        stale, changed = stale_shards(existing["inputs"], inputs, plan, source, make_tasks(ctx, skip_done=False))
        if not stale:
            if existing.get("complete"):
                log.info("%s: store already complete, nothing to convert", cfg.out)
                return False
            log.info("%s: resuming an interrupted conversion", cfg.out)
            return True
        log.warning("%s: %d source file(s) changed since the store was written (%s); converting the %d "
                    "shard(s) that depend on them again", cfg.out, len(changed),
                    ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else ""), len(stale))
        stale_ids = {(t.group, t.index) for t in stale}
        if existing.get("complete"):
            (cfg.out / PROGRESS_DIR).mkdir(exist_ok=True)
            for group in (plan.layout.actors, plan.layout.objects):
                for index, (r0, r1) in enumerate(group.shard_ranges()):
                    if (group.name, index) not in stale_ids:
                        record_shard_done(cfg.out, group.name, index, {"rows": [r0, r1]})
        else:
            for group_name, index in stale_ids:
                record_path(cfg.out, group_name, index).unlink(missing_ok=True)
        update_attrs(cfg.out, complete=False, inputs=inputs)
        return True
    try:
        create_store(cfg.out, plan.layout, plan.tables, store_attrs(plan, source, cfg, fingerprint, inputs))
    except BaseException:  # e.g. disk full: a half-created store is none, leave the directory empty for a rerun
        with contextlib.suppress(OSError, OutputError):
            empty_directory(cfg.out)
        raise
    return True


# --------------------------------------------------------------------------- shard tasks


@dataclass(frozen=True)
class ShardTask:
    """Rows ``row_start:row_stop`` of one row group (its shard ``index``).

    Keyframes ``keyframe_start:keyframe_stop`` are those whose rows overlap the range, plus
    zero-row keyframes at its start (and at the end, for the last shard); a keyframe *belongs*
    to the task that holds its first row (``ptr[k] >= row_start``), which counts its progress.
    """

    group: GroupName
    index: int
    row_start: int
    row_stop: int
    keyframe_start: int
    keyframe_stop: int
    input_bytes: int  # source bytes of the keyframes the task reads


@dataclass(frozen=True)
class TaskContext:
    """What a worker needs besides the task (pickled with each task: paths and plans only)."""

    out: Path
    source: FeatureReader
    layout: StoreLayout
    keyframes: tuple[tuple[str, int], ...]  # (video id, timestamp) by keyframe row
    ptrs: dict[str, np.ndarray]  # group -> CSR pointers (K + 1,)
    keyframe_bytes: dict[str, np.ndarray]  # group -> source bytes per keyframe (K,)
    keep_spatial: bool


def make_context(plan: Plan, source: FeatureReader, cfg: ConvertConfig) -> TaskContext:
    return TaskContext(
        out=cfg.out,
        source=source,
        layout=plan.layout,
        keyframes=tuple((k.video_id, k.timestamp) for k in plan.keyframes),
        ptrs={"actors": plan.tables.actor_ptr, "objects": plan.tables.object_ptr},
        keyframe_bytes={"actors": np.array([k.actor_bytes for k in plan.keyframes], dtype=np.int64),
                        "objects": np.array([k.object_bytes for k in plan.keyframes], dtype=np.int64)},
        keep_spatial=cfg.keep_spatial,
    )


def make_tasks(ctx: TaskContext, skip_done: bool = True) -> list[ShardTask]:
    """Shard tasks of both groups not done yet, largest input first (balances the workers)."""
    tasks = []
    for group in (ctx.layout.actors, ctx.layout.objects):
        ptr, sizes = ctx.ptrs[group.name], ctx.keyframe_bytes[group.name]
        ranges = group.shard_ranges()
        for index, (r0, r1) in enumerate(ranges):
            k0 = int(np.searchsorted(ptr, r0, side="left"))
            if ptr[k0] > r0:  # row r0 lies inside keyframe k0 - 1
                k0 -= 1
            k1 = len(ctx.keyframes) if index + 1 == len(ranges) else int(np.searchsorted(ptr, r1, side="left"))
            if skip_done and shard_done(ctx.out, group.name, index):
                continue
            tasks.append(ShardTask(group.name, index, r0, r1, k0, k1, int(sizes[k0:k1].sum())))
    return sorted(tasks, key=lambda t: (-t.input_bytes, t.group, t.index))


def keyframe_rows(source: FeatureReader, group: str, video_id: str, timestamp: int,
                  keep_spatial: bool) -> tuple[dict[str, np.ndarray], int]:
    """One keyframe's rows of ``group`` by array key, as the store holds them before the dtype
    cast, and how many box coordinates were clipped into [0, 1]."""
    if group == "actors":
        a = source.read_actors(video_id, timestamp, keep_spatial=keep_spatial)
        rows = {"features": a.features, "boxes": a.boxes, "labels": a.labels}
        if a.spatial is not None:
            rows["spatial"] = a.spatial
        return rows, a.clipped
    o = source.read_objects(video_id, timestamp)
    rows = {"features": o.features, "boxes": o.boxes}
    if o.cls_prob is not None:
        rows["cls_prob"] = o.cls_prob
    return rows, o.clipped


def _check_fits(values: np.ndarray, dtype: np.dtype, name: str, where: str) -> None:
    if dtype == np.float16 and values.size and np.abs(values).max() > np.finfo(np.float16).max:
        raise ReaderError(f"{where}: {name} exceeds the float16 range; convert with --dtype float32")


def run_task(ctx: TaskContext, task: ShardTask, report: Callable[[int, int], None]) -> int:
    """Read, validate and write the rows of one shard task, then record it as done.

    ``report(bytes, keyframes)`` receives progress increments. Returns the number of box
    coordinates clipped into [0, 1] in the keyframes the task owns.
    """
    group = ctx.layout.group(task.group)
    arrays = open_arrays(ctx.out, [spec.name for spec in group.arrays])
    writers = {spec.name.split("/", 1)[1]: row_writer(arrays[spec.name], ctx.out, task.row_start, task.row_stop,
                                                       spec.shard_rows)
               for spec in group.arrays}
    ptr, sizes = ctx.ptrs[task.group], ctx.keyframe_bytes[task.group]
    done_bytes = done_kf = clipped = 0
    for k in range(task.keyframe_start, task.keyframe_stop):
        lo, hi = max(int(ptr[k]), task.row_start), min(int(ptr[k + 1]), task.row_stop)
        if hi > lo:
            video_id, ts = ctx.keyframes[k]
            rows, keyframe_clipped = keyframe_rows(ctx.source, task.group, video_id, ts, ctx.keep_spatial)
            clipped += keyframe_clipped if ptr[k] >= task.row_start else 0
            for key, writer in writers.items():
                name = f"{task.group}/{key}"
                if key not in rows:
                    raise ReaderError(f"keyframe {video_id} {ts}: has no {name} although other keyframes do")
                values = rows[key][lo - int(ptr[k]): hi - int(ptr[k])]
                _check_fits(values, writer.array.dtype, name, f"keyframe {video_id} {ts}")
                writer.append(values)
            done_bytes += int(sizes[k])
        done_kf += int(task.group == "actors" and ptr[k] >= task.row_start)
        if done_bytes >= PROGRESS_EVERY_BYTES:
            report(done_bytes, done_kf)
            done_bytes = done_kf = 0
    for key, writer in writers.items():
        writer.close(f"{ctx.out} {task.group}/{key}")
    record_shard_done(ctx.out, task.group, task.index, {"rows": [task.row_start, task.row_stop]})
    report(done_bytes, done_kf)
    return clipped


_progress_queue: Any = None  # a pool worker's end of the Runner's progress queue (set at its start)


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue
    # the main process handles SIGINT (a terminal's Ctrl-C reaches the whole group) and SIGTERM,
    # then terminates the workers: a worker just stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _pool_task(ctx: TaskContext, task: ShardTask) -> int:
    return run_task(ctx, task, lambda b, k: _progress_queue.put((b, k)))


# --------------------------------------------------------------------------- running


class Runner:
    """Maps work over ``workers`` forked processes (inline when 1) with progress reports."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._pool: multiprocessing.pool.Pool | None = None
        self._queue: SimpleQueue | None = None  # the workers' progress reports, made with the pool
        if self.workers > 1:
            # fork: workers start instantly and inherit nothing open (created before any
            # HDF5 file is opened); zarr resets its event loop in forked children. Progress
            # comes back on a queue the workers inherit (no manager process to start).
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            context = mp.get_context(method)
            self._queue = context.SimpleQueue()
            self._pool = context.Pool(self.workers, initializer=_init_worker, initargs=(self._queue,))

    def map(self, fn: Callable, items: Iterable) -> Iterable:
        """Ordered map (used for the scan and verification)."""
        if self._pool is None:
            return map(fn, items)
        return self._pool.imap(fn, list(items))

    def run_tasks(self, ctx: TaskContext, tasks: list[ShardTask], on_progress: Callable[[int, int], None]) -> int:
        """Run the shard tasks; returns the box coordinates they clipped."""
        if self._pool is None:
            return sum(run_task(ctx, task, on_progress) for task in tasks)
        queue = self._queue
        assert queue is not None
        results = self._pool.imap_unordered(partial(_pool_task, ctx), tasks)
        remaining, clipped = len(tasks), 0
        while remaining:
            try:
                clipped += results.next(timeout=0.2)
                remaining -= 1
            except mp.TimeoutError:
                pass
            while not queue.empty():
                on_progress(*queue.get())
        while not queue.empty():
            on_progress(*queue.get())
        return clipped

    def close(self, *, abandon: bool = False) -> None:
        """Stop the workers. ``abandon`` (after an error or a signal): a worker may have died while
        holding one of the pool's queue locks (a SIGTERM to the whole process group), and
        ``Pool.terminate()`` and the pool's exit hook take those locks (CPython's known deadlock),
        so the workers are killed and reaped directly and the pool is dropped without them."""
        if self._pool is None:
            return
        if abandon:  # Pool has no public handle on any of this
            pool: Any = self._pool  # the private attributes below are in no stub
            pool._worker_handler._state = mp.pool.TERMINATE  # no replacement for a killed worker
            for _ in range(2):  # again for one the handler may have started meanwhile
                for worker in list(pool._pool):
                    worker.kill()
                    worker.join()
                pool._worker_handler.join(timeout=2.0)
            pool._terminate.cancel()  # its exit hook would terminate() the pool and wait on those locks
        else:
            self._pool.terminate()
            self._pool.join()
            assert self._queue is not None
            self._queue.close()
        self._pool = None


# --------------------------------------------------------------------------- verification


def _equal(a: np.ndarray, b: np.ndarray) -> str | None:
    """None if equal, else a short description of the difference."""
    if a.shape != b.shape:
        return f"shape {b.shape} in store, {a.shape} from source"
    if np.array_equal(a, b):
        return None
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return f"{int((diff > 0).sum())} values differ, max |diff| {diff.max():.6g}"


@dataclass(frozen=True)
class VerifyItem:
    """One keyframe to verify: its name and its row ranges in the store."""

    video_id: str
    timestamp: int
    actors: tuple[int, int]
    objects: tuple[int, int]


_verify_arrays: dict[tuple[str, tuple[str, ...]], dict[str, zarr.Array]] = {}  # per process: opened once


def _row_arrays(path: Path, names: tuple[str, ...]) -> dict[str, zarr.Array]:
    key = (str(path), names)
    if key not in _verify_arrays:
        _verify_arrays.clear()
        _verify_arrays[key] = open_arrays(path, names, mode="r")
    return _verify_arrays[key]


def _read_rows(array: zarr.Array, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
    """Rows ``r0:r1`` of each range, in one selection: only the chunks holding them are decoded."""
    index = np.concatenate([np.arange(r0, r1) for r0, r1 in ranges] or [np.zeros(0, np.int64)]).astype(np.int64)
    # an integer index array selects an array (never zarr's scalar case)
    rows = (cast(np.ndarray, array.get_orthogonal_selection((index,))) if len(index)
            else np.zeros((0, *array.shape[1:]), array.dtype))
    bounds = np.cumsum([0] + [r1 - r0 for r0, r1 in ranges])
    return [rows[bounds[i]: bounds[i + 1]] for i in range(len(ranges))]


def _verify_keyframes(path: Path, names: tuple[str, ...], source: FeatureReader, keep_spatial: bool,
                      items: list[VerifyItem]) -> list[str]:
    """Mismatches between the store at ``path`` and the source for the keyframes ``items``.

    Reads only the rows of ``items`` (one selection per array), so a sample costs O(its rows).
    """
    arrays = _row_arrays(path, names)
    stored = {name: _read_rows(arrays[name], [getattr(i, name.split("/")[0]) for i in items]) for name in names}
    problems = []
    for n, item in enumerate(items):
        for group in ("actors", "objects"):
            expected, _ = keyframe_rows(source, group, item.video_id, item.timestamp,
                                        keep_spatial and group == "actors")
            for name in names:
                g, key = name.split("/")
                if g != group:
                    continue
                got = stored[name][n]
                want = expected.get(key, np.zeros((0, *got.shape[1:])))
                if len(want) == 0 and len(got) == 0:
                    continue
                problem = _equal(want.astype(got.dtype), got)
                if problem:
                    problems.append(f"{item.video_id} {item.timestamp}: {name}: {problem}")
    return problems


def verify(store: FeatureStore, source: FeatureReader, keep_spatial: bool, runner: Runner,
           sample: int | None = None, seed: int = 0) -> tuple[int, list[str]]:
    """Compare every keyframe (or a seeded sample of ``sample``) with the source.

    Workers get the keyframes' names and row ranges (not the store) and read just those rows,
    opening the store's arrays once per process. Returns (keyframes checked, mismatches).
    """
    rows = np.arange(store.num_keyframes)
    if sample is not None and sample < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=sample, replace=False))
    items = [VerifyItem(store.video_ids[int(store.keyframe_clip[k])], int(store.timestamps[k]),
                        (int(store.actor_ptr[k]), int(store.actor_ptr[k + 1])),
                        (int(store.object_ptr[k]), int(store.object_ptr[k + 1]))) for k in rows.tolist()]
    names = tuple(store.row_arrays())
    problems: list[str] = []
    for found in runner.map(partial(_verify_keyframes, store.path, names, source, keep_spatial),
                            _batches(items, 8 * runner.workers)):
        problems.extend(found)
    return len(rows), problems


# --------------------------------------------------------------------------- the run


@dataclass
class ConvertSummary:
    keyframes: int
    actors: int
    objects: int
    clips: int
    mb_in: float  # source bytes of the whole store
    mb_read: float  # source bytes read by this run (less when resumed)
    mb_out: float  # bytes of the store on disk
    seconds: float
    shards: int
    shards_resumed: int  # already done by an earlier, interrupted run
    missing_objects: int  # keyframes with no objects entry, accepted as empty
    stripped_object_keys: int  # keyframes whose objects key lacks the clip id's leading '-'
    skipped: list[str]
    clipped: int = 0  # box coordinates clipped into [0, 1] (within --box-tolerance) by this run
    box_tolerance: float = DEFAULT_BOX_TOLERANCE
    phases: dict[str, float] = field(default_factory=dict)  # seconds by phase (scan, create, convert, verify)
    verified: int | None = None
    mismatches: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        rate = self.mb_read / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"clips {self.clips}  keyframes {self.keyframes}  actors {self.actors}  objects {self.objects}",
            f"MB in {self.mb_in:.1f}  MB read {self.mb_read:.1f}  MB out {self.mb_out:.1f}  "
            f"seconds {self.seconds:.1f}  MB/s {rate:.1f}",
            f"shards {self.shards} ({self.shards_resumed} done by an earlier run)  "
            f"keyframes without objects accepted as empty: {self.missing_objects}",
        ]
        out.append("seconds by phase: " + "  ".join(f"{k} {v:.2f}" for k, v in self.phases.items()))
        if self.stripped_object_keys:
            out.append(f"objects of {self.stripped_object_keys} keyframes found under keys without the clip id's "
                       "leading '-' (as in the published objects file: clip -5KQ66BBWC4 at 902 is "
                       "5KQ66BBWC4_902_features), accepted")
        out.append(f"box coordinates clipped into [0, 1] (within --box-tolerance {self.box_tolerance:g}): "
                   f"{self.clipped}")
        out += [f"skipped: {s}" for s in self.skipped] or ["skipped: nothing"]
        if self.verified is not None:
            out.append(f"verified {self.verified} keyframes: {len(self.mismatches)} mismatches")
            out += [f"  MISMATCH {m}" for m in self.mismatches]
        return out


def drop_partial_files(out: Path) -> None:
    """Remove what writers stopped mid-file left in the store ``out`` (the run holds its lock and
    no worker runs): shard files being streamed, progress records and zarr's metadata being
    written. Finished shards, their records and the metadata stay, so a rerun resumes."""
    out = Path(out)
    partial = [*out.glob(f"{PROGRESS_DIR}/*.tmp*"), *out.rglob(".*.tmp[0-9]*"), *out.rglob("*.partial")]
    for path in partial:
        try:
            if path.is_file():
                path.unlink()
        except OSError:
            pass


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def convert(cfg: ConvertConfig) -> ConvertSummary:
    """Convert (or resume converting) the source of ``cfg`` into the store ``cfg.out``.

    The output is checked and locked before the source is read; ``cfg.out`` is used resolved
    (a symlinked ``--out`` writes into its target).
    """
    start = time.perf_counter()
    phases: dict[str, float] = {}
    target = check_output(cfg)  # refuse a bad output before any work
    runner = Runner(cfg.workers)  # before any HDF5 file is opened (workers fork clean) and before the lock
    lock, created = None, False
    try:
        if target.state == "new":
            try:
                target.path.mkdir(parents=True)
                created = True
            except FileExistsError:  # another run made it meanwhile: the lock decides
                pass
            except OSError as e:
                raise OutputError(f"--out {cfg.out}: cannot create it: {e.strerror or e}") from None
        lock = lock_output(target.path)
        target = check_output(cfg)  # again under the lock: another run may have written it meanwhile
        cfg = replace(cfg, out=target.path)
        source = open_feature_reader(cfg)
        recorded = unchanged_store(read_attrs(cfg.out) if target.state == "ours" else None, source, cfg)
        if recorded is not None:  # complete, and no source file changed: nothing is opened
            phases["scan"] = time.perf_counter() - start
            log.info("%s: store already complete, nothing to convert (every source file's size and mtime as "
                     "recorded)", cfg.out)
            for line in recorded["skipped"]:
                log.warning("%s", line)
            summary = ConvertSummary(
                keyframes=recorded["keyframes"], actors=recorded["actors"], objects=recorded["objects"],
                clips=recorded["clips"], mb_in=recorded["input_bytes"] / 1e6, mb_read=0.0,
                mb_out=_dir_bytes(cfg.out) / 1e6, seconds=0.0, shards=recorded["shards"],
                shards_resumed=recorded["shards"], missing_objects=recorded["missing_objects"],
                stripped_object_keys=recorded["stripped_object_keys"], skipped=list(recorded["skipped"]),
                box_tolerance=cfg.box_tolerance, phases=phases)
            if cfg.verify or cfg.verify_sample is not None:
                source.list_keyframes()  # what reading keyframes needs (the objects' key rule)
                store = FeatureStore.open(cfg.out, cache_mb=0)
                summary.verified, summary.mismatches = verify(store, source, cfg.keep_spatial, runner,
                                                              cfg.verify_sample)
                phases["verify"] = time.perf_counter() - start - sum(phases.values())
            summary.seconds = time.perf_counter() - start
            return summary
        plan = make_plan(source, cfg, runner)
        phases["scan"] = time.perf_counter() - start
        for line in plan.skipped:
            log.warning("%s", line)
        if plan.stripped_object_keys:
            log.warning("objects of %d keyframes found under keys without the clip id's leading '-'",
                        plan.stripped_object_keys)
        todo = prepare_store(plan, source, cfg, target)
        phases["create"] = time.perf_counter() - start - sum(phases.values())
        ctx = make_context(plan, source, cfg)
        all_tasks = make_tasks(ctx, skip_done=False)
        tasks = make_tasks(ctx) if todo else []
        read_bytes = sum(t.input_bytes for t in tasks)
        with progress_bar(total=read_bytes, unit="B", unit_scale=True, desc="converting", disable=not cfg.progress,
                          dynamic_ncols=True) as bar:
            keyframes_done = [0]

            def on_progress(nbytes: int, keyframes: int) -> None:
                keyframes_done[0] += keyframes
                bar.set_postfix_str(f"keyframes {keyframes_done[0]}/{len(plan.keyframes)}", refresh=False)
                bar.update(nbytes)

            clipped = runner.run_tasks(ctx, tasks, on_progress)
        if todo:
            finish_store(cfg.out)
        phases["convert"] = time.perf_counter() - start - sum(phases.values())
        summary = ConvertSummary(
            keyframes=len(plan.keyframes), actors=plan.layout.shape.num_actors,
            objects=plan.layout.shape.num_objects, clips=plan.layout.shape.num_clips,
            mb_in=plan.input_bytes / 1e6, mb_read=read_bytes / 1e6, mb_out=_dir_bytes(cfg.out) / 1e6,
            seconds=0.0, shards=len(all_tasks), shards_resumed=len(all_tasks) - len(tasks) if todo else len(all_tasks),
            missing_objects=plan.missing_objects, stripped_object_keys=plan.stripped_object_keys,
            skipped=plan.skipped, clipped=clipped, box_tolerance=cfg.box_tolerance, phases=phases,
        )
        if cfg.verify or cfg.verify_sample is not None:
            store = FeatureStore.open(cfg.out, cache_mb=0)
            summary.verified, summary.mismatches = verify(store, source, cfg.keep_spatial, runner, cfg.verify_sample)
            phases["verify"] = time.perf_counter() - start - sum(phases.values())
        summary.seconds = time.perf_counter() - start
        return summary
    except BaseException:
        if threading.current_thread() is threading.main_thread():
            for stop in STOP_SIGNALS:  # a second signal must not cut the clean-up short
                signal.signal(stop, signal.SIG_IGN)
        runner.close(abandon=True)  # no worker writes any more
        if lock is not None:
            drop_partial_files(target.path)
        raise
    finally:
        runner.close()
        if created and lock is not None and target.path.is_dir() and not any(target.path.iterdir()):
            target.path.rmdir()  # a run that stopped before writing leaves no empty directory behind
        if lock is not None:
            lock.release()


def store_out(cfg: ConvertConfig) -> Path:
    """Where the store is written: --out, or beside it when only shards are asked for."""
    formats = cfg.streaming.format.split(",")
    return cfg.out if "zarr" in formats else cfg.out.with_name(cfg.out.name + ".store-tmp")


def shards_out(cfg: ConvertConfig) -> Path:
    """Where the tar shards are written: --shards-out, else --out (webdataset only) or OUT.shards."""
    if cfg.streaming.shards_out:
        return cfg.streaming.shards_out
    return cfg.out.with_suffix(".shards") if "zarr" in cfg.streaming.format.split(",") else cfg.out
