"""Parallel, resumable, verified conversion of the published HDF5 features into a feature store.

The run, in order:

1. **List and scan** the source (names, then shapes only, in parallel by clip): every
   structural problem is found before anything is written, and the row counts give the
   store's CSR pointers and shard grid. Clips are ordered by video id, keyframes by timestamp.
2. **Create** the store (tables and empty row arrays, attribute ``complete: false``), or find
   the same store from an interrupted run with the same plan and resume it.
3. **Convert** shard by shard: a task owns one shard-aligned row range of ``actors/*`` or of
   ``objects/*``; it reads the keyframes overlapping its rows, validates and pools them,
   writes each of its shards in one piece and then records the shard as done. Tasks run in
   ``--workers`` processes (one writer per shard, largest first); a killed run loses at most
   the shards in flight.
4. **Finish**: set ``complete: true``. ``--verify`` then re-reads the sources and compares every
   keyframe (or a sample) with the store after the pooling/dtype rule.

Errors in the input stop the run with :class:`~stage_dist.sources.SourceError` (file and key
named); the CLI prints them and exits 2. Verification mismatches exit 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
from tqdm import tqdm

from stage_dist import __version__
from stage_dist.sources import (
    I3DSource,
    KeyframeInfo,
    MissingObjects,
    SlowFastSource,
    Source,
    SourceDims,
    SourceError,
    merge_dims,
)
from stage_dist.store import (
    FeatureStore,
    StorageConfig,
    StoreError,
    StoreLayout,
    StoreShape,
    Tables,
    create_store,
    finish_store,
    open_arrays,
    read_attrs,
    record_shard_done,
    shard_done,
    storage_attrs,
)

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_VERIFY_FAILED = 1
PROGRESS_EVERY_BYTES = 8 * 2**20  # a task reports progress after this much input
KILL_AFTER_SHARDS_ENV = "STAGE_CONVERT_KILL_AFTER_SHARDS"  # test hook: SIGKILL self after N shards


class ConvertError(Exception):
    """The conversion cannot go on (e.g. the output holds another store); message says why."""


@dataclass(frozen=True)
class ConvertConfig:
    """Everything a conversion needs. ``store_arguments`` are the ones that shape the store."""

    out: Path
    split: str
    actors_dir: Path | None = None  # I3D layout
    objects_file: Path | None = None  # I3D layout (required) or SlowFast (optional)
    slowfast_file: Path | None = None  # SlowFast layout
    video_list: Path | None = None  # SlowFast layout
    missing_objects: MissingObjects = "error"
    keep_spatial: bool = False
    cls_prob: bool = True
    storage: StorageConfig = field(default_factory=StorageConfig)
    workers: int = 1
    overwrite: bool = False
    verify: bool = False
    verify_sample: int | None = None
    progress: bool = True

    def store_arguments(self) -> dict[str, Any]:
        """The arguments recorded in the store: a rerun must give the same ones to resume."""
        return {
            "split": self.split,
            "missing_objects": self.missing_objects,
            "keep_spatial": self.keep_spatial,
            "cls_prob": self.cls_prob,
            "storage": asdict(self.storage),
        }


def build_source(cfg: ConvertConfig) -> Source:
    if cfg.actors_dir is not None:
        if cfg.objects_file is None:
            raise ConvertError("the I3D layout needs --objects-file with --actors-dir")
        return I3DSource(cfg.actors_dir, cfg.objects_file, cfg.missing_objects)
    if cfg.slowfast_file is None or cfg.video_list is None:
        raise ConvertError("give --actors-dir and --objects-file (I3D) or --slowfast-file and --video-list (SlowFast)")
    if cfg.keep_spatial:
        raise ConvertError("--keep-spatial needs the I3D layout (SlowFast features are already pooled)")
    if cfg.objects_file is None:
        log.warning("no --objects-file: every keyframe of the store will have zero objects")
    return SlowFastSource(cfg.slowfast_file, cfg.video_list, cfg.objects_file, cfg.missing_objects)


# --------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """What the store will hold: keyframes in store order, dims, layout and tables."""

    keyframes: list[KeyframeInfo]
    dims: SourceDims
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


def _scan_clips(source: Source, clips: list[tuple[str, list[int]]]) -> list[tuple[list[KeyframeInfo], SourceDims]]:
    return [source.scan_clip(video_id, stamps) for video_id, stamps in clips]


def _batches(items: list, count: int) -> list[list]:
    """``items`` cut into at most ``count`` consecutive batches (few, large pickled tasks)."""
    size = max(1, -(-len(items) // max(1, count)))
    return [items[i: i + size] for i in range(0, len(items), size)]


def make_plan(source: Source, cfg: ConvertConfig, runner: "Runner") -> Plan:
    """List and scan the source (shapes only) and lay the store out."""
    listing = source.list_keyframes()
    if not listing.clips:
        raise SourceError(f"{source.describe()}: no keyframes found")
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
    )
    return Plan(keyframes, dims, StoreLayout.build(shape, cfg.storage), tables, listing.skipped)


def plan_fingerprint(plan: Plan, source: Source, cfg: ConvertConfig) -> str:
    """Hash of everything that determines the store's content: a resumed run must match it."""
    h = hashlib.sha256()
    h.update(json.dumps([source.describe(), cfg.store_arguments(), asdict(plan.dims)], sort_keys=True,
                        default=list).encode())
    h.update(json.dumps(plan.tables.video_ids).encode())
    for values in plan.tables.arrays().values():
        h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()


def store_attrs(plan: Plan, source: Source, cfg: ConvertConfig, fingerprint: str) -> dict[str, Any]:
    return {
        **storage_attrs(plan.layout),
        "split": cfg.split,
        "video_ids": plan.tables.video_ids,
        "source": {**source.describe(), "label_width": plan.dims.label_width,
                   "actor_thw": list(plan.dims.actor_thw) if plan.dims.actor_thw else None},
        "converter": {"version": __version__, "arguments": cfg.store_arguments()},
        "missing_objects_keyframes": plan.missing_objects,
        "plan_fingerprint": fingerprint,
    }


def prepare_store(plan: Plan, source: Source, cfg: ConvertConfig) -> bool:
    """Create the store, or find a resumable one. Returns False when it is already complete."""
    fingerprint = plan_fingerprint(plan, source, cfg)
    existing = read_attrs(cfg.out)
    if existing is not None and not cfg.overwrite:
        if existing.get("plan_fingerprint") != fingerprint:
            raise ConvertError(
                f"{cfg.out}: holds a store made from other inputs or arguments "
                f"(complete={existing.get('complete')}); pass --overwrite to replace it"
            )
        if existing.get("complete"):
            log.info("%s: store already complete, nothing to convert", cfg.out)
            return False
        log.info("%s: resuming an interrupted conversion", cfg.out)
        return True
    if existing is None and cfg.out.exists() and any(cfg.out.iterdir()) and not cfg.overwrite:
        raise ConvertError(f"{cfg.out}: exists and is not a feature store; pass --overwrite to replace it")
    create_store(cfg.out, plan.layout, plan.tables, store_attrs(plan, source, cfg, fingerprint))
    return True


# --------------------------------------------------------------------------- shard tasks


@dataclass(frozen=True)
class ShardTask:
    """Rows ``row_start:row_stop`` of one row group (its shard ``index``).

    Keyframes ``keyframe_start:keyframe_stop`` are those whose rows overlap the range, plus
    zero-row keyframes at its start (and at the end, for the last shard); a keyframe *belongs*
    to the task that holds its first row (``ptr[k] >= row_start``), which counts its progress.
    """

    group: Literal["actors", "objects"]
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
    source: Source
    layout: StoreLayout
    keyframes: tuple[tuple[str, int], ...]  # (video id, timestamp) by keyframe row
    ptrs: dict[str, np.ndarray]  # group -> CSR pointers (K + 1,)
    keyframe_bytes: dict[str, np.ndarray]  # group -> source bytes per keyframe (K,)
    keep_spatial: bool


def make_context(plan: Plan, source: Source, cfg: ConvertConfig) -> TaskContext:
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


class _RowWriter:
    """Buffers rows of one array and writes each of its shards in one call."""

    def __init__(self, array: Any, start: int, stop: int, shard_rows: int) -> None:
        self.array, self.stop, self.shard_rows = array, stop, shard_rows
        self.block_start, self.fill = start, 0
        self.buffer = np.empty((min(shard_rows, stop - start), *array.shape[1:]), dtype=array.dtype)

    def append(self, rows: np.ndarray) -> None:
        while len(rows):
            take = min(len(rows), len(self.buffer) - self.fill)
            self.buffer[self.fill: self.fill + take] = rows[:take]
            self.fill, rows = self.fill + take, rows[take:]
            if self.fill == len(self.buffer):
                self._flush()

    def _flush(self) -> None:
        self.array[self.block_start: self.block_start + self.fill] = self.buffer[: self.fill]
        self.block_start += self.fill
        self.fill = 0
        remaining = min(self.shard_rows, self.stop - self.block_start)
        if 0 < remaining < len(self.buffer):
            self.buffer = self.buffer[:remaining]

    def close(self, where: str) -> None:
        if self.fill or self.block_start != self.stop:
            raise RuntimeError(f"{where}: wrote rows up to {self.block_start + self.fill}, expected {self.stop}")


def keyframe_rows(source: Source, group: str, video_id: str, timestamp: int,
                  keep_spatial: bool) -> dict[str, np.ndarray]:
    """One keyframe's rows of ``group`` by array key, as the store holds them before the dtype cast."""
    if group == "actors":
        a = source.read_actors(video_id, timestamp, keep_spatial=keep_spatial)
        rows = {"features": a.features, "boxes": a.boxes, "labels": a.labels}
        if a.spatial is not None:
            rows["spatial"] = a.spatial
        return rows
    o = source.read_objects(video_id, timestamp)
    rows = {"features": o.features, "boxes": o.boxes}
    if o.cls_prob is not None:
        rows["cls_prob"] = o.cls_prob
    return rows


def _check_fits(values: np.ndarray, dtype: np.dtype, name: str, where: str) -> None:
    if dtype == np.float16 and values.size and np.abs(values).max() > np.finfo(np.float16).max:
        raise SourceError(f"{where}: {name} exceeds the float16 range; convert with --dtype float32")


def _kill_hook(out: Path) -> None:
    """Test hook: SIGKILL the whole process group once N shards are written (env var)."""
    limit = os.environ.get(KILL_AFTER_SHARDS_ENV)
    if limit and len(list((out / "_progress").glob("*.json"))) >= int(limit):
        os.killpg(os.getpgid(0), 9)


def run_task(ctx: TaskContext, task: ShardTask, report: Callable[[int, int], None]) -> None:
    """Read, validate and write the rows of one shard task, then record it as done.

    ``report(bytes, keyframes)`` receives progress increments.
    """
    group = ctx.layout.group(task.group)
    arrays = open_arrays(ctx.out, [spec.name for spec in group.arrays])
    writers = {spec.name.split("/", 1)[1]: _RowWriter(arrays[spec.name], task.row_start, task.row_stop, spec.shard_rows)
               for spec in group.arrays}
    ptr, sizes = ctx.ptrs[task.group], ctx.keyframe_bytes[task.group]
    done_bytes = done_kf = 0
    for k in range(task.keyframe_start, task.keyframe_stop):
        lo, hi = max(int(ptr[k]), task.row_start), min(int(ptr[k + 1]), task.row_stop)
        if hi > lo:
            video_id, ts = ctx.keyframes[k]
            rows = keyframe_rows(ctx.source, task.group, video_id, ts, ctx.keep_spatial)
            for key, writer in writers.items():
                name = f"{task.group}/{key}"
                if key not in rows:
                    raise SourceError(f"keyframe {video_id} {ts}: has no {name} although other keyframes do")
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
    _kill_hook(ctx.out)
    record_shard_done(ctx.out, task.group, task.index, {"rows": [task.row_start, task.row_stop]})
    report(done_bytes, done_kf)


_progress_queue: Any = None  # a pool worker's end of the Runner's progress queue (set at its start)


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue


def _pool_task(ctx: TaskContext, task: ShardTask) -> int:
    run_task(ctx, task, lambda b, k: _progress_queue.put((b, k)))
    return task.input_bytes


# --------------------------------------------------------------------------- running


class Runner:
    """Maps work over ``workers`` forked processes (inline when 1) with progress reports."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._pool = None
        self._queue = None
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

    def run_tasks(self, ctx: TaskContext, tasks: list[ShardTask], on_progress: Callable[[int, int], None]) -> None:
        if self._pool is None:
            for task in tasks:
                run_task(ctx, task, on_progress)
            return
        queue = self._queue
        results = self._pool.imap_unordered(partial(_pool_task, ctx), tasks)
        remaining = len(tasks)
        while remaining:
            try:
                results.next(timeout=0.2)
                remaining -= 1
            except mp.TimeoutError:
                pass
            while not queue.empty():
                on_progress(*queue.get())
        while not queue.empty():
            on_progress(*queue.get())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._queue.close()


# --------------------------------------------------------------------------- verification


def _equal(a: np.ndarray, b: np.ndarray) -> str | None:
    """None if equal, else a short description of the difference."""
    if a.shape != b.shape:
        return f"shape {b.shape} in store, {a.shape} from source"
    if np.array_equal(a, b):
        return None
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return f"{int((diff > 0).sum())} values differ, max |diff| {diff.max():.6g}"


def _verify_keyframes(store: FeatureStore, source: Source, keep_spatial: bool, rows: list[int]) -> list[str]:
    """Mismatches between the store and the source for keyframe rows ``rows``."""
    problems = []
    for k in rows:
        clip = int(store.keyframe_clip[k])
        video_id, ts = store.video_ids[clip], int(store.timestamps[k])
        for group in ("actors", "objects"):
            ptr = store.actor_ptr if group == "actors" else store.object_ptr
            expected = keyframe_rows(source, group, video_id, ts, keep_spatial and group == "actors")
            for name in store.row_arrays():
                g, key = name.split("/")
                if g != group:
                    continue
                got = store.read_array(name, int(ptr[k]), int(ptr[k + 1]))
                want = expected.get(key, np.zeros((0, *got.shape[1:])))
                if len(want) == 0 and len(got) == 0:
                    continue
                problem = _equal(want.astype(got.dtype), got)
                if problem:
                    problems.append(f"{video_id} {ts}: {name}: {problem}")
    return problems


def verify(store: FeatureStore, source: Source, keep_spatial: bool, runner: Runner,
           sample: int | None = None, seed: int = 0) -> tuple[int, list[str]]:
    """Compare every keyframe (or a seeded sample of ``sample``) with the source.

    Returns (keyframes checked, mismatches).
    """
    rows = np.arange(store.num_keyframes)
    if sample is not None and sample < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=sample, replace=False))
    batches = _batches(rows.tolist(), 8 * runner.workers)
    problems: list[str] = []
    for found in runner.map(partial(_verify_keyframes, store, source, keep_spatial), batches):
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
        out += [f"skipped: {s}" for s in self.skipped] or ["skipped: nothing"]
        if self.verified is not None:
            out.append(f"verified {self.verified} keyframes: {len(self.mismatches)} mismatches")
            out += [f"  MISMATCH {m}" for m in self.mismatches]
        return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def convert(cfg: ConvertConfig) -> ConvertSummary:
    """Convert (or resume converting) the source of ``cfg`` into the store ``cfg.out``."""
    start = time.perf_counter()
    phases: dict[str, float] = {}
    runner = Runner(cfg.workers)  # before any HDF5 file is opened: workers fork clean
    try:
        source = build_source(cfg)
        plan = make_plan(source, cfg, runner)
        phases["scan"] = time.perf_counter() - start
        for line in plan.skipped:
            log.warning("%s", line)
        if plan.stripped_object_keys:
            log.warning("objects of %d keyframes found under keys without the clip id's leading '-'",
                        plan.stripped_object_keys)
        todo = prepare_store(plan, source, cfg)
        phases["create"] = time.perf_counter() - start - sum(phases.values())
        ctx = make_context(plan, source, cfg)
        all_tasks = make_tasks(ctx, skip_done=False)
        tasks = make_tasks(ctx) if todo else []
        read_bytes = sum(t.input_bytes for t in tasks)
        with tqdm(total=read_bytes, unit="B", unit_scale=True, desc="converting", disable=not cfg.progress,
                  dynamic_ncols=True) as bar:
            keyframes_done = [0]

            def on_progress(nbytes: int, keyframes: int) -> None:
                keyframes_done[0] += keyframes
                bar.set_postfix_str(f"keyframes {keyframes_done[0]}/{len(plan.keyframes)}", refresh=False)
                bar.update(nbytes)

            runner.run_tasks(ctx, tasks, on_progress)
        if todo:
            finish_store(cfg.out)
        phases["convert"] = time.perf_counter() - start - sum(phases.values())
        summary = ConvertSummary(
            keyframes=len(plan.keyframes), actors=plan.layout.shape.num_actors,
            objects=plan.layout.shape.num_objects, clips=plan.layout.shape.num_clips,
            mb_in=plan.input_bytes / 1e6, mb_read=read_bytes / 1e6, mb_out=_dir_bytes(cfg.out) / 1e6,
            seconds=0.0, shards=len(all_tasks), shards_resumed=len(all_tasks) - len(tasks) if todo else len(all_tasks),
            missing_objects=plan.missing_objects, stripped_object_keys=plan.stripped_object_keys,
            skipped=plan.skipped, phases=phases,
        )
        if cfg.verify or cfg.verify_sample is not None:
            store = FeatureStore.open(cfg.out, cache_mb=0)
            summary.verified, summary.mismatches = verify(store, source, cfg.keep_spatial, runner, cfg.verify_sample)
            phases["verify"] = time.perf_counter() - start - sum(phases.values())
        summary.seconds = time.perf_counter() - start
        return summary
    finally:
        runner.close()


# --------------------------------------------------------------------------- CLI


FORMATS = ("zarr", "zarr,webdataset", "webdataset")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_features",
        description="Convert published STAGE features (I3D or SlowFast HDF5 layout) into a sharded, "
                    "clip-ordered zarr v3 feature store. Resumable: rerun the same command after an "
                    "interruption. Exit codes: 0 ok, 1 --verify found mismatches, 2 bad input or output.",
    )
    src = p.add_argument_group("source (I3D: --actors-dir + --objects-file; SlowFast: --slowfast-file + --video-list)")
    src.add_argument("--actors-dir", type=Path, help="I3D layout: directory of <video_id>/<timestamp>.h5 actor files")
    src.add_argument("--objects-file", type=Path,
                     help="objects .h5 (<video_id>_<ts>_features|_boxes|_cls_prob); required for I3D, "
                          "optional for SlowFast (without it every keyframe has zero objects)")
    src.add_argument("--slowfast-file", type=Path, help="SlowFast layout: the split's .h5 of <clip_number>_<ts> groups")
    src.add_argument("--video-list", type=Path, help="SlowFast layout: video ids, one a line; clip numbers index it")
    src.add_argument("--missing-objects", choices=("error", "empty"), default="error",
                     help="a keyframe absent from the objects file is an error (default) or has zero objects")
    out = p.add_argument_group("store")
    out.add_argument("--out", type=Path, required=True, help="the store directory to write (one per split)")
    out.add_argument("--split", help="split name recorded in the store (default: --out's name without suffix)")
    out.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="feature dtype on disk")
    out.add_argument("--keep-spatial", action="store_true",
                     help="also keep the full (C, t, h, w) actor tensor in actors/spatial (I3D only; large)")
    out.add_argument("--no-cls-prob", action="store_true", help="do not store the objects' cls_prob")
    out.add_argument("--chunk-kb", type=float, default=StorageConfig.chunk_kb,
                     help="target chunk size of the feature arrays in KB (the unit one read decodes)")
    out.add_argument("--shard-mb", type=float, default=StorageConfig.shard_mb, help="target shard file size in MB")
    out.add_argument("--min-shards", type=int, default=StorageConfig.min_shards,
                     help="split each row group into at least this many shards when it is small (parallelism)")
    out.add_argument("--compression", choices=("zstd", "none"), default="zstd", help="chunk compression")
    out.add_argument("--overwrite", action="store_true", help="delete what is at --out and start over")
    stream = p.add_argument_group("streaming form (WebDataset tar shards, written from the store)")
    stream.add_argument("--format", choices=FORMATS, default="zarr", metavar="FORMAT",
                        help="zarr (default): the store at --out; zarr,webdataset: the store at --out and tar "
                             "shards; webdataset: tar shards only, at --out (the store is written first to "
                             "OUT.store-tmp, then removed)")
    stream.add_argument("--shards-out", type=Path,
                        help="directory of the tar shards and manifest.json (default: --out with --format "
                             "webdataset, else --out with suffix .shards)")
    stream.add_argument("--tar-shard-mb", type=float, default=256, help="target size of one tar shard in MB")
    stream.add_argument("--tar-window", type=int,
                        help="one sample per window of this many keyframes (default: one sample per clip)")
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    run.add_argument("--verify", action="store_true", help="re-read the sources and check every keyframe against the store")
    run.add_argument("--verify-sample", type=int, metavar="N", help="like --verify, but check N keyframes chosen at random")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)")
    return p


def store_out(args: argparse.Namespace) -> Path:
    """Where the store is written: --out, or beside it when only shards are asked for."""
    return args.out if "zarr" in args.format.split(",") else args.out.with_name(args.out.name + ".store-tmp")


def shards_out(args: argparse.Namespace) -> Path:
    """Where the tar shards are written: --shards-out, else --out (webdataset only) or OUT.shards."""
    if args.shards_out:
        return args.shards_out
    return args.out.with_suffix(".shards") if "zarr" in args.format.split(",") else args.out


def config_from_args(args: argparse.Namespace) -> ConvertConfig:
    return ConvertConfig(
        out=store_out(args),
        split=args.split or args.out.name.split(".")[0],
        actors_dir=args.actors_dir,
        objects_file=args.objects_file,
        slowfast_file=args.slowfast_file,
        video_list=args.video_list,
        missing_objects=args.missing_objects,
        keep_spatial=args.keep_spatial,
        cls_prob=not args.no_cls_prob,
        storage=StorageConfig(dtype=args.dtype, chunk_kb=args.chunk_kb, shard_mb=args.shard_mb,
                              min_shards=args.min_shards, compression=args.compression),
        workers=args.workers,
        overwrite=args.overwrite,
        verify=args.verify,
        verify_sample=args.verify_sample,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = convert(config_from_args(args))
        for line in summary.lines():
            print(line)
        if summary.mismatches:
            return EXIT_VERIFY_FAILED
        if "webdataset" in args.format:
            print(write_streaming_form(args))
    except (SourceError, StoreError, ConvertError) as e:
        print(f"convert_features: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def write_streaming_form(args: argparse.Namespace) -> str:
    """Write the finished store as tar shards (:func:`shards_out`); drop the store unless kept."""
    from stage_dist.shard_format import ShardError, shard_pattern, write_shards  # imports torch: only when asked

    store, target = store_out(args), shards_out(args)
    try:
        manifest = write_shards(FeatureStore.open(store), target,
                                max_shard_bytes=int(args.tar_shard_mb * (1 << 20)), window=args.tar_window)
    except ShardError as e:
        raise ConvertError(str(e)) from e
    if store != args.out:
        shutil.rmtree(store)
    return (f"webdataset: {manifest['num_shards']} shards, {manifest['num_samples']} samples -> "
            f"{shard_pattern(manifest, target)}")


if __name__ == "__main__":
    sys.exit(main())
