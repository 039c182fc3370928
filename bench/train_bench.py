"""Training throughput and data-path speed on a synthetic store (issue 4, part 8).

Writes, under a temporary directory, a float16 feature store of ``--clips`` x
``--keyframes-per-clip`` keyframes with exactly ``--actors`` actors and ``--objects`` objects per
keyframe at the published dims (1024-dim actors, 2048-dim objects), through the store's writer
API (:func:`~stage_dist.store.feature_store.create_store` /
:func:`~stage_dist.store.feature_store.finish_store`), and the
same keyframes of ``--published-clips`` clips in the published I3D layout (one h5 per keyframe
holding the full ``(n, C, t, h, w)`` float32 actor tensor, plus ``objects.h5``). Then measures:

1. **Training** keyframes/s with :class:`~stage_dist.engine.trainer.Trainer` in-process (world size 1,
   ``--device``, ``--amp``) at 1 window per step (the published recipe) and at 8, with
   ``--workers`` DataLoader workers each. Steps are timed exactly as ``Trainer.train_epoch``
   times them: data wait = time from the end of the previous step until the loader hands over
   the next batch; step time = data wait + ``Trainer.train_step`` (forward, loss, backward,
   Adam; the loss stays on the device, so on a GPU the timed span ends with a synchronisation
   after the last step). The first ``--warmup`` steps (worker start-up) are not counted.
   ``--deterministic`` runs every case a second time, right after (each case runs in a fresh
   process), with the trainer's ``--deterministic``, and prints the ratio of the two.
2. **Data only**, single process, the same shuffled windows read (a) the way the published
   ``AVADataset`` does (per keyframe: open the actor h5 and read features/labels/boxes, open
   ``objects.h5`` and read that keyframe's features/boxes; then concatenate the window like
   ``BatchCollator`` minus its adjacency loop, i.e. favouring the published code) and (b) with
   ``FeatureStore.read_window`` + ``collate``. Each reader runs with a warm page cache and with
   a cold one (every file evicted with ``posix_fadvise(DONTNEED)`` first); the store reader
   also runs without its chunk cache (``cache_mb=0``, every window decodes its chunks: the case
   of a split much larger than the cache), with its default 64 MB cache, from RAM
   (``in_memory=True``, loading time not counted) and from ``--memmap-dir`` files. One process
   is one DataLoader worker: besides keyframes/s of wall time, keyframes per second of the
   process's CPU time say what a worker does on a core of its own (the machine may be shared).
   Target (issue 11, part 4): plain store reads >= 5,000 keyframes/s per worker.
3. **Start-up** at full AVA train counts (235 clips x 897 keyframes, 476,000 actors, 2,100,000
   objects; 4-dim features so the store is small; ``--startup-scale`` shrinks it): seconds
   each kind of process takes, in a fresh interpreter, to open the store and read + collate its
   first window: a rank with plain reads, a loader worker that receives the store pickled, a rank
   with ``--in-memory``, and with ``--memmap-dir`` the node's first process (it decompresses the
   arrays) and the others (they map the files). Target (issue 11, part 1): < 2 s.
4. With CUDA available: keyframes/s at 1 and 32 windows per step with bf16 autocast and the GPU
   utilisation (``torch.cuda.utilization``, else ``nvidia-smi``), sampled during the timed steps.

``--profile`` adds a torch.profiler table of a few training steps (1 window, no workers).

    .venv/bin/python -m bench.train_bench
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import h5py
import numpy as np
import torch
from tqdm import tqdm

from stage_dist.core.config import from_flat
from stage_dist.data.batch import Batch, collate
from stage_dist.engine.distributed import DistEnv, configure_threads
from stage_dist.engine.train_config import TrainConfig
from stage_dist.engine.trainer import Trainer
from stage_dist.store.feature_store import (
    FeatureStore,
    StorageConfig,
    StoreLayout,
    StoreShape,
    Tables,
    create_store,
    finish_store,
    open_arrays,
    storage_attrs,
)
from stage_dist.store.schema import NUM_ACTIONS
from stage_dist.store.window import WindowSpec

log = logging.getLogger("train_bench")
T = TypeVar("T")

FIRST_TIMESTAMP = 902
PUBLISHED_WINDOWS_PER_STEP = 1
TARGETS = {  # issue 4, part 8 (2-core CPU; GPU aims on one GPU)
    "cpu_recipe_kf_s": 150.0,
    "cpu_8_windows_kf_s": 300.0,
    "data_wait_fraction": 0.10,
    "store_vs_published": 10.0,
    "store_kf_s_per_worker": 5000.0,  # issue 11, part 4: 4 loader workers feed 20,000 keyframes/s
    "startup_s": 2.0,  # issue 11, part 1: open a full-AVA-count store and read the first window
    "gpu_1_window_kf_s": 2000.0,
    "gpu_32_windows_kf_s": 20000.0,
}


# --------------------------------------------------------------------------- synthetic data


@dataclass(frozen=True)
class StoreSpec:
    """A synthetic split with a fixed number of actors and objects in every keyframe."""

    clips: int = 40
    keyframes_per_clip: int = 60
    actors: int = 2
    objects: int = 8
    actor_dim: int = 1024
    object_dim: int = 2048
    dtype: str = "float16"
    seed: int = 0

    @property
    def num_keyframes(self) -> int:
        return self.clips * self.keyframes_per_clip


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` valid normalised ``x1, y1, x2, y2`` boxes."""
    centre = rng.uniform(0.2, 0.8, (n, 2))
    half = rng.uniform(0.05, 0.2, (n, 2))
    return np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)


def _features(rng: np.random.Generator, rows: int, dim: int, dtype: str) -> np.ndarray:
    """Non-negative features (post-ReLU pooled activations), about half of them zero."""
    values = np.maximum(rng.standard_normal((rows, dim), dtype=np.float32), 0.0)
    return values.astype(dtype)


def write_store(path: Path, spec: StoreSpec, split: str = "train", *, uneven: tuple[tuple[int, int], tuple[int, int]]
                | None = None) -> FeatureStore:
    """Write a complete store with the store's writer API and open it. Every keyframe has
    ``spec.actors`` actors and ``spec.objects`` objects, or with ``uneven=((a0, a1), (o0, o1))``
    counts drawn uniformly from those inclusive ranges (keyframes of uneven size)."""
    rng = np.random.default_rng(spec.seed)
    k = spec.num_keyframes
    if uneven is None:
        actor_counts, object_counts = np.full(k, spec.actors), np.full(k, spec.objects)
    else:
        (a0, a1), (o0, o1) = uneven
        actor_counts, object_counts = rng.integers(a0, a1 + 1, k), rng.integers(o0, o1 + 1, k)
    a, o = int(actor_counts.sum()), int(object_counts.sum())
    tables = Tables(
        video_ids=[f"-bench{c:05d}_x" for c in range(spec.clips)],
        clip_ptr=np.arange(spec.clips + 1, dtype=np.int64) * spec.keyframes_per_clip,
        keyframe_clip=np.repeat(np.arange(spec.clips, dtype=np.int32), spec.keyframes_per_clip),
        timestamps=np.tile(np.arange(FIRST_TIMESTAMP, FIRST_TIMESTAMP + spec.keyframes_per_clip,
                                     dtype=np.int32), spec.clips),
        actor_ptr=np.concatenate(([0], np.cumsum(actor_counts))).astype(np.int64),
        object_ptr=np.concatenate(([0], np.cumsum(object_counts))).astype(np.int64),
    )
    shape = StoreShape(spec.clips, k, a, o, spec.actor_dim, spec.object_dim)
    layout = StoreLayout.build(shape, StorageConfig(dtype=spec.dtype))  # type: ignore[arg-type]
    create_store(path, layout, tables, {**storage_attrs(layout), "split": split,
                                        "video_ids": tables.video_ids, "source": {"kind": "bench"}})
    labels = (rng.random((a, NUM_ACTIONS)) < 0.03).astype(np.uint8)
    rows = {
        "actors/features": _features(rng, a, spec.actor_dim, spec.dtype),
        "actors/boxes": _random_boxes(rng, a),
        "actors/labels": labels,
        "objects/features": _features(rng, o, spec.object_dim, spec.dtype),
        "objects/boxes": _random_boxes(rng, o),
    }
    for name, array in open_arrays(path, list(rows)).items():
        array[:] = rows[name]
    finish_store(path)
    return FeatureStore.open(path)


@dataclass(frozen=True)
class PublishedLayout:
    actors_dir: Path
    objects_file: Path

    def files(self) -> list[Path]:
        return [self.objects_file, *sorted(self.actors_dir.rglob("*.h5"))]


def write_published_layout(root: Path, store: FeatureStore, clips: int,
                           thw: tuple[int, int, int]) -> PublishedLayout:
    """The first ``clips`` clips of ``store`` in the published I3D layout (uncompressed h5,
    float32, actor tensor ``(n, C, t, h, w)`` whose mean over t, h, w is the store's feature)."""
    layout = PublishedLayout(root / "actors", root / "objects.h5")
    root.mkdir(parents=True)
    with h5py.File(layout.objects_file, "w") as objects:
        for clip in tqdm(range(clips), desc="published layout", unit="clip", leave=False):
            clip_dir = layout.actors_dir / store.video_ids[clip]
            clip_dir.mkdir(parents=True)
            first = int(store.clip_ptr[clip])
            for k in range(first, int(store.clip_ptr[clip + 1])):
                window = store.read_keyframes(k, k + 1)
                ts = int(window.timestamps[0])
                pooled = window.actor_features.astype(np.float32)
                tensor = np.ascontiguousarray(np.broadcast_to(pooled[:, :, None, None, None],
                                                              (*pooled.shape, *thw)))
                labels = np.concatenate([np.zeros((len(pooled), 1), np.float32),
                                         window.actor_labels.astype(np.float32)], axis=1)
                with h5py.File(clip_dir / f"{ts:04d}.h5", "w") as f:
                    f.create_dataset("features", data=tensor)
                    f.create_dataset("boxes", data=window.actor_boxes)
                    f.create_dataset("labels", data=labels)
                key = f"{store.video_ids[clip]}_{ts}"
                objects.create_dataset(f"{key}_features", data=window.object_features.astype(np.float32))
                objects.create_dataset(f"{key}_boxes", data=window.object_boxes)
    return layout


# --------------------------------------------------------------------------- data-only reads


def read_published_window(layout: PublishedLayout, video_id: str, timestamps: Sequence[int]) -> tuple:
    """One window the way the published ``AVADataset.__getitem__`` + ``BatchCollator`` read it
    (without the adjacency loop): two h5 opens per keyframe, full actor tensors."""
    parts: list[tuple[torch.Tensor, ...]] = []
    for ts in timestamps:
        stamp = f"{ts:04d}"
        with h5py.File(layout.actors_dir / video_id / f"{stamp}.h5", "r") as hf_actors:
            features = torch.from_numpy(hf_actors["features"][()])
            labels = torch.from_numpy(hf_actors["labels"][()])
            boxes = torch.from_numpy(hf_actors["boxes"][()])
        with h5py.File(layout.objects_file, "r") as hf_objects:
            key = f"{video_id}_{stamp.lstrip('0')}"
            object_features = torch.from_numpy(hf_objects[f"{key}_features"][()])
            object_boxes = torch.from_numpy(hf_objects[f"{key}_boxes"][()])
        parts.append((features, labels, boxes, object_features, object_boxes))
    return tuple(torch.cat(column) for column in zip(*parts))


def evict(paths: Sequence[Path]) -> None:
    """Drop ``paths`` from the page cache (the next read comes from disk)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def data_windows(store: FeatureStore, clips: int, window: int, seed: int) -> list[WindowSpec]:
    """Non-overlapping windows tiling the first ``clips`` clips, in a shuffled order."""
    specs = [WindowSpec(c, s, window) for c in range(clips)
             for s in range(0, int(store.clip_lengths[c]) - window + 1, window)]
    order = np.random.default_rng(seed).permutation(len(specs))
    return [specs[i] for i in order]


@dataclass(frozen=True)
class ReadRate:
    """Keyframes/s of one reader: per second of wall time and per second of this process's CPU
    time (what one loader worker does on a core of its own; the machine may be shared)."""

    wall: float
    cpu: float


def time_reader(read: Callable[[WindowSpec], object], windows: Sequence[WindowSpec]) -> ReadRate:
    """Keyframes/s of reading ``windows`` one by one with ``read``."""
    started, cpu_started = time.perf_counter(), time.process_time()
    for spec in windows:
        read(spec)
    keyframes = sum(w.length for w in windows)
    return ReadRate(keyframes / (time.perf_counter() - started),
                    keyframes / max(time.process_time() - cpu_started, 1e-9))


def measure_data(store_path: Path, store: FeatureStore, layout: PublishedLayout,
                 windows: Sequence[WindowSpec]) -> dict[str, ReadRate]:
    """Keyframes/s of each reader (one process: one loader worker), warm and cold page cache."""
    store_files = [p for p in store_path.rglob("*") if p.is_file()]

    def published(spec: WindowSpec) -> object:
        first = int(store.clip_ptr[spec.clip]) + spec.start
        stamps = store.timestamps[first:first + spec.length].tolist()
        return read_published_window(layout, store.video_ids[spec.clip], stamps)

    def store_reader(cache_mb: int, in_memory: bool = False, memmap_dir: Path | None = None
                     ) -> Callable[[WindowSpec], Batch]:
        fresh = FeatureStore.open(store_path, cache_mb=cache_mb, in_memory=in_memory,  # empty cache
                                  memmap_dir=memmap_dir)
        return lambda spec: collate([fresh.read_window(spec)])

    results: dict[str, ReadRate] = {}
    time_reader(published, windows[: max(1, len(windows) // 4)])  # warm the page cache
    results["published, warm"] = time_reader(published, windows)
    evict(layout.files())
    results["published, cold"] = time_reader(published, windows)
    results["store no cache, warm"] = time_reader(store_reader(0), windows)
    evict(store_files)
    results["store no cache, cold"] = time_reader(store_reader(0), windows)
    results["store 64 MB cache, warm"] = time_reader(store_reader(64), windows)
    results["store in RAM (in_memory)"] = time_reader(store_reader(0, in_memory=True), windows)
    memmap_reader = store_reader(0, memmap_dir=store_path.parent / "memmap")
    memmap_reader(windows[0])  # decompresses the arrays once (per node, in a real run)
    results["store memmap (--memmap-dir), warm"] = time_reader(memmap_reader, windows)
    evict(list((store_path.parent / "memmap").rglob("*.npy")))
    results["store memmap (--memmap-dir), cold"] = time_reader(memmap_reader, windows)
    return results


# --------------------------------------------------------------------------- start-up at full scale


AVA_TRAIN_COUNTS = {"clips": 235, "keyframes_per_clip": 897, "actors": 476_000, "objects": 2_100_000}


def write_count_store(path: Path, clips: int, keyframes_per_clip: int, actors: int, objects: int,
                      dim: int = 4, chunk_rows: int = 16, seed: int = 0) -> None:
    """A store with these row counts and ``dim``-wide float16 features, actors and objects spread
    at random over the keyframes, written with the store's writer API. Feature chunks hold
    ``chunk_rows`` rows, as the default 64 KB chunks hold 16 object rows at real dims. Objects have
    a ``cls_prob`` array (which training never reads), left unwritten: it reads as zeros."""
    rng = np.random.default_rng(seed)
    k = clips * keyframes_per_clip

    def ptr(rows: int) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(np.bincount(rng.integers(0, k, rows), minlength=k))]).astype(np.int64)

    tables = Tables(
        video_ids=[f"-scale{c:05d}_" for c in range(clips)],
        clip_ptr=np.arange(clips + 1, dtype=np.int64) * keyframes_per_clip,
        keyframe_clip=np.repeat(np.arange(clips, dtype=np.int32), keyframes_per_clip),
        timestamps=np.tile(np.arange(FIRST_TIMESTAMP, FIRST_TIMESTAMP + keyframes_per_clip, dtype=np.int32), clips),
        actor_ptr=ptr(actors), object_ptr=ptr(objects),
    )
    shape = StoreShape(clips, k, actors, objects, dim, dim, cls_prob_dim=dim)
    layout = StoreLayout.build(shape, StorageConfig(chunk_kb=chunk_rows * dim * 2 / 1024))
    create_store(path, layout, tables, {**storage_attrs(layout), "split": "train",
                                        "video_ids": tables.video_ids, "source": {"kind": "bench"}})
    rows = {
        "actors/features": _features(rng, actors, dim, "float16"),
        "actors/boxes": _random_boxes(rng, actors),
        "actors/labels": (rng.random((actors, NUM_ACTIONS)) < 0.03).astype(np.uint8),
        "objects/features": _features(rng, objects, dim, "float16"),
        "objects/boxes": _random_boxes(rng, objects),
    }
    for name, array in open_arrays(path, list(rows)).items():
        array[:] = rows[name]
    finish_store(path)


def time_startup(store_path: Path, mode: str, memmap_dir: Path, pickled: bytes | None = None) -> dict[str, float]:
    """Seconds this (fresh) process takes to open the store (``mode``: plain, in_memory, memmap;
    ``pickled``: unpickle it, as a spawned DataLoader worker does) and read its first window."""
    started = time.perf_counter()
    if pickled is not None:
        store = pickle.loads(pickled)
    else:
        store = FeatureStore.open(store_path, in_memory=mode == "in_memory",
                                  memmap_dir=memmap_dir if mode == "memmap" else None)
    opened = time.perf_counter()
    collate([store.read_window(WindowSpec(store.num_clips // 2, 400, 6))])
    done = time.perf_counter()
    return {"open": opened - started, "first window": done - opened}


def measure_startup(root: Path, counts: dict[str, int]) -> dict[str, dict[str, float]]:
    """Start-up of each kind of process, each in a fresh interpreter (imports not counted)."""
    store_path = root / "scale.zarr"
    started = time.perf_counter()
    write_count_store(store_path, **counts)
    print(f"wrote a store of {counts} (4-dim features) in {time.perf_counter() - started:.1f} s")
    memmap_dir = root / "scale-memmap"
    pickled = pickle.dumps(FeatureStore.open(store_path))
    cases = {
        "rank (plain reads)": (store_path, "plain", memmap_dir),
        "loader worker (store unpickled)": (store_path, "plain", memmap_dir, pickled),
        "rank, --in-memory": (store_path, "in_memory", memmap_dir),
        "first process of a node, --memmap-dir": (store_path, "memmap", memmap_dir),
        "other processes of the node, --memmap-dir": (store_path, "memmap", memmap_dir),
    }
    return {name: in_fresh_process(time_startup, *case) for name, case in cases.items()}


# --------------------------------------------------------------------------- training


class UtilisationSampler:
    """GPU utilisation (%) sampled every ``interval`` seconds in a thread while active."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> float | None:
        try:
            return float(torch.cuda.utilization())
        except Exception:  # no pynvml: ask nvidia-smi
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                     f"--id={torch.cuda.current_device()}"],
                    capture_output=True, text=True, timeout=5, check=True)
                return float(out.stdout.strip().splitlines()[0])
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = self.read()
            if value is None:
                return
            self.samples.append(value)

    def __enter__(self) -> "UtilisationSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


@dataclass(frozen=True)
class TrainCase:
    windows_per_step: int
    workers: int
    device: str
    amp: str
    steps: int
    warmup: int
    deterministic: bool = False


@dataclass
class TrainResult:
    case: TrainCase
    keyframes_per_s: float
    wait_fraction: float
    step_ms: float
    gpu_utilisation: float | None = None
    load_average: float = 0.0  # 1-minute load average when the case ended


def measure_training(store_path: Path, out_dir: Path, case: TrainCase, memmap_dir: Path | None = None
                     ) -> TrainResult:
    """Time ``case.steps`` steps of the Trainer after ``case.warmup``, as ``train_epoch`` does."""
    config = from_flat(TrainConfig, output_dir=str(out_dir), train_store=str(store_path),
                         windows_per_step=case.windows_per_step, workers=case.workers,
                         amp=case.amp, device=case.device, epochs=1000,
                         max_steps=case.warmup + case.steps, deterministic=case.deterministic,
                         memmap_dir=None if memmap_dir is None else str(memmap_dir))
    device = torch.device(case.device)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    configure_threads(0, env, case.workers)  # as `python -m stage_dist.train` does
    trainer = Trainer(config, env)
    trainer.ddp_model.train()
    waits: list[float] = []
    steps: list[float] = []
    keyframes = 0
    cuda = device.type == "cuda"
    utilisation = UtilisationSampler() if cuda else None
    bar = tqdm(total=case.warmup + case.steps, desc=f"train {case.windows_per_step}w/{case.workers}wk",
               unit="step", leave=False)
    epoch = 0
    while len(steps) < case.warmup + case.steps:
        trainer.data.source.load_state_dict({"epoch": epoch, "step": 0})
        step_started = time.perf_counter()
        for batch in trainer.data.loader:
            data_ready = time.perf_counter()
            trainer.train_step(batch)  # no host sync: a GPU may still be running this step
            step_done = time.perf_counter()
            waits.append(data_ready - step_started)
            steps.append(step_done - step_started)
            if len(steps) > case.warmup:
                keyframes += batch.num_keyframes
            if len(steps) == case.warmup and cuda:
                torch.cuda.synchronize()  # the timed steps start with an idle GPU
                step_done = time.perf_counter()
                if utilisation is not None:
                    utilisation.__enter__()
            step_started = step_done
            bar.update(1)
            if len(steps) == case.warmup + case.steps:
                break
        epoch += 1
    if cuda:  # the last steps' GPU work counts
        synchronising = time.perf_counter()
        torch.cuda.synchronize()
        steps[-1] += time.perf_counter() - synchronising
    bar.close()
    if utilisation is not None:
        utilisation.__exit__()
    del trainer  # shuts the persistent workers down
    timed_wait, timed_steps = sum(waits[case.warmup:]), sum(steps[case.warmup:])
    return TrainResult(case, keyframes / timed_steps, timed_wait / timed_steps,
                       1e3 * timed_steps / case.steps,
                       utilisation.mean if utilisation is not None else None, os.getloadavg()[0])


def in_fresh_process(function: Callable[..., T], *args: object) -> T:
    """Run one measurement in a new interpreter: a case's DataLoader workers, thread settings and
    allocator state must not leak into the next (they cost up to 2x on 2 cores)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def profile_training(store_path: Path, out_dir: Path, steps: int, rows: int = 15) -> str:
    """torch.profiler table (self CPU time) of ``steps`` recipe steps with no workers."""
    config = from_flat(TrainConfig, output_dir=str(out_dir), train_store=str(store_path), workers=0, amp="off",
                       device="cpu", max_steps=steps + 2)
    trainer = Trainer(config, DistEnv(0, 1, 0, torch.device("cpu"), None))
    trainer.ddp_model.train()
    batches = iter(trainer.data.loader)
    for _ in range(2):
        trainer.train_step(next(batches))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("data: read + collate"):
                batch = next(batches)
            trainer.train_step(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# --------------------------------------------------------------------------- report


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of a float32 matmul with torch's default threads: a yardstick of how much CPU this
    run got (the machine may be shared), to compare runs."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value < target
    return "PASS" if ok else "MISS"


def print_training(results: Sequence[TrainResult], title: str) -> None:
    print(f"\n{title}")
    print(f"{'windows/step':>12} {'workers':>7} {'amp':>5} {'determ.':>7} {'step ms':>8} {'keyframes/s':>12} "
          f"{'data wait':>10} {'GPU util':>9} {'load avg':>9}")
    for r in results:
        util = "-" if r.gpu_utilisation is None else f"{r.gpu_utilisation:.0f}%"
        determ = "on" if r.case.deterministic else "off"
        print(f"{r.case.windows_per_step:>12} {r.case.workers:>7} {r.case.amp:>5} {determ:>7} {r.step_ms:>8.1f} "
              f"{r.keyframes_per_s:>12.1f} {r.wait_fraction:>9.1%} {util:>9} {r.load_average:>9.2f}")
    plain = {replace(r.case, deterministic=False): r for r in results if not r.case.deterministic}
    for r in results:
        base = plain.get(replace(r.case, deterministic=False))
        if r.case.deterministic and base is not None:
            print(f"--deterministic, {r.case.windows_per_step} window(s)/step, {r.case.workers} workers: "
                  f"{r.keyframes_per_s / base.keyframes_per_s:.3f} x the keyframes/s without it")


def print_targets(rows: Sequence[tuple[str, float, float, bool, str]]) -> None:
    print("\ntargets")
    print(f"{'figure':<52} {'measured':>10} {'target':>10} {'ratio':>7}  verdict")
    for name, value, target, higher, unit in rows:
        ratio = value / target if higher else target / max(value, 1e-9)
        sign = ">=" if higher else "<"
        print(f"{name:<52} {value:>9.1f}{unit} {sign:>2}{target:>7.1f}{unit} {ratio:>6.2f}x  "
              f"{verdict(value, target, higher)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clips", type=int, default=40, help="clips in the synthetic store")
    parser.add_argument("--keyframes-per-clip", type=int, default=60, help="keyframes per clip")
    parser.add_argument("--actors", type=int, default=2, help="actors in every keyframe")
    parser.add_argument("--objects", type=int, default=8, help="objects in every keyframe")
    parser.add_argument("--published-clips", type=int, default=6,
                        help="clips also written in the published I3D layout for the data-only "
                        "comparison (each keyframe is ~1.6 MB with 2 actors)")
    parser.add_argument("--actor-thw", type=int, nargs=3, default=(4, 7, 7), metavar=("T", "H", "W"),
                        help="t h w of the published actor tensor (published I3D features: 4 7 7)")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 0],
                        help="DataLoader worker counts to measure")
    parser.add_argument("--windows-per-step", type=int, nargs="+", default=[1, 8],
                        help="windows per step to measure (1 is the published recipe)")
    parser.add_argument("--window", type=int, default=6, help="keyframes per window")
    parser.add_argument("--keyframes", type=int, default=960,
                        help="keyframes trained per timed CPU case (steps = this / keyframes per step)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps before each case")
    parser.add_argument("--gpu-windows-per-step", type=int, nargs="+", default=[1, 32],
                        help="windows per step of the GPU table (CUDA only)")
    parser.add_argument("--gpu-keyframes", type=int, default=30000,
                        help="keyframes trained per timed GPU case")
    parser.add_argument("--gpu-workers", type=int, default=4, help="DataLoader workers on the GPU")
    parser.add_argument("--skip-cpu", action="store_true",
                        help="skip the CPU training cases (e.g. on a GPU machine)")
    parser.add_argument("--skip-data", action="store_true", help="skip the data-only comparison")
    parser.add_argument("--skip-startup", action="store_true",
                        help="skip the start-up measurement on a store with full AVA train counts")
    parser.add_argument("--startup-scale", type=float, default=1.0,
                        help="clips, actors and objects of the start-up store as a fraction of AVA train's")
    parser.add_argument("--deterministic", action="store_true",
                        help="run every training case again, right after, with --deterministic (its cost)")
    parser.add_argument("--memmap", action="store_true",
                        help="train with --memmap-dir (node-shared decompressed copy) instead of zarr reads")
    parser.add_argument("--profile", action="store_true",
                        help="also print a torch.profiler table of a few recipe steps on CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and window order")
    parser.add_argument("--tmp-dir", help="where to write the temporary data (default: system temp)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    spec = StoreSpec(clips=args.clips, keyframes_per_clip=args.keyframes_per_clip,
                     actors=args.actors, objects=args.objects, seed=args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f}; matmul yardstick {matmul_gflops():.0f} GFLOP/s")
    print(f"store: {spec.clips} clips x {spec.keyframes_per_clip} keyframes, {spec.actors} actors "
          f"({spec.actor_dim}) + {spec.objects} objects ({spec.object_dim}) per keyframe, {spec.dtype}; "
          f"window {args.window}")
    root = Path(tempfile.mkdtemp(prefix="train_bench_", dir=args.tmp_dir))
    targets: list[tuple[str, float, float, bool, str]] = []
    try:
        started = time.perf_counter()
        store_path = root / "train.zarr"
        store = write_store(store_path, spec)
        print(f"wrote the store in {time.perf_counter() - started:.1f} s")

        if not args.skip_data:
            clips = min(args.published_clips, spec.clips)
            started = time.perf_counter()
            layout = write_published_layout(root / "i3d", store, clips, tuple(args.actor_thw))
            size = sum(p.stat().st_size for p in layout.files())
            print(f"wrote {clips} clips in the published layout ({size / 1e6:.0f} MB) in "
                  f"{time.perf_counter() - started:.1f} s")
            windows = data_windows(store, clips, args.window, args.seed)
            data = measure_data(store_path, store, layout, windows)
            print(f"\ndata only, one process (= one loader worker): {len(windows)} windows of "
                  f"{args.window} keyframes (shuffled), read + concatenate/collate")
            print(f"{'reader':<36} {'keyframes/s':>12} {'per CPU s':>10}   vs published (same cache state): "
                  "wall, CPU")
            for name, rate in data.items():
                base = data["published, cold" if "cold" in name else "published, warm"]
                print(f"{name:<36} {rate.wall:>12.1f} {rate.cpu:>10.1f} {rate.wall / base.wall:>9.1f}x "
                      f"{rate.cpu / base.cpu:>9.1f}x")
            for reader in ("store no cache", "store memmap (--memmap-dir)"):
                for cache_state in ("warm", "cold"):
                    targets.append((f"{reader} vs published, {cache_state} (x)",
                                    data[f"{reader}, {cache_state}"].wall / data[f"published, {cache_state}"].wall,
                                    TARGETS["store_vs_published"], True, "x"))
            targets.append(("store plain reads per loader worker (kf/CPU s)", data["store no cache, warm"].cpu,
                            TARGETS["store_kf_s_per_worker"], True, ""))

        if not args.skip_startup:
            counts = AVA_TRAIN_COUNTS if args.startup_scale == 1 else \
                {k: max(1, int(v * args.startup_scale)) if k != "keyframes_per_clip" else v
                 for k, v in AVA_TRAIN_COUNTS.items()}
            startup = measure_startup(root, counts)
            print(f"\nstart-up per process at {args.startup_scale:g} x full AVA train counts: open the store, "
                  "read + collate a window of 6 keyframes (interpreter and imports not counted)")
            print(f"{'process':<44} {'open s':>8} {'first window s':>15} {'total s':>8}")
            for name, times in startup.items():
                total = sum(times.values())
                print(f"{name:<44} {times['open']:>8.3f} {times['first window']:>15.3f} {total:>8.3f}")
            for name in ("rank (plain reads)", "loader worker (store unpickled)",
                         "other processes of the node, --memmap-dir"):
                targets.append((f"start-up, {name} (s)", sum(startup[name].values()), TARGETS["startup_s"],
                                False, "s"))

        if not args.skip_cpu:
            results = []
            for windows_per_step in args.windows_per_step:
                for workers in args.workers:
                    steps = max(1, args.keyframes // (windows_per_step * args.window))
                    case = TrainCase(windows_per_step, workers, "cpu", "off", steps, args.warmup)
                    for deterministic in (False, True) if args.deterministic else (False,):
                        results.append(in_fresh_process(measure_training, store_path, root / "run",
                                                        replace(case, deterministic=deterministic),
                                                        root / "memmap" if args.memmap else None))
            reads = "--memmap-dir" if args.memmap else "zarr, 64 MB chunk cache"
            print_training(results, f"training on CPU (Trainer in-process, world size 1, amp off, reads: {reads})")
            for r in (r for r in results if not r.case.deterministic):
                w, k = r.case.windows_per_step, r.case.workers
                key = "cpu_recipe_kf_s" if w == PUBLISHED_WINDOWS_PER_STEP else "cpu_8_windows_kf_s"
                if w in (1, 8):
                    targets.append((f"CPU keyframes/s, {w} window(s)/step, {k} workers",
                                    r.keyframes_per_s, TARGETS[key], True, ""))
                targets.append((f"CPU data wait, {w} window(s)/step, {k} workers (%)",
                                100 * r.wait_fraction, 100 * TARGETS["data_wait_fraction"], False, "%"))

        if torch.cuda.is_available():
            print(f"\nGPU: {torch.cuda.get_device_name()}")
            results = []
            for windows_per_step in args.gpu_windows_per_step:
                steps = max(1, args.gpu_keyframes // (windows_per_step * args.window))
                case = TrainCase(windows_per_step, args.gpu_workers, "cuda", "bf16", steps, args.warmup)
                for deterministic in (False, True) if args.deterministic else (False,):
                    results.append(in_fresh_process(measure_training, store_path, root / "run",
                                                    replace(case, deterministic=deterministic)))
            print_training(results, "training on one GPU (bf16)")
            for r in (r for r in results if not r.case.deterministic):
                gpu_key = {1: "gpu_1_window_kf_s", 32: "gpu_32_windows_kf_s"}.get(r.case.windows_per_step)
                if gpu_key:
                    targets.append((f"GPU keyframes/s, {r.case.windows_per_step} window(s)/step (aim)",
                                    r.keyframes_per_s, TARGETS[gpu_key], True, ""))
                targets.append((f"GPU data wait, {r.case.windows_per_step} window(s)/step (%)",
                                100 * r.wait_fraction, 100 * TARGETS["data_wait_fraction"], False, "%"))
        else:
            print("\nGPU: CUDA not available, GPU figures skipped")

        print_targets(targets)
        if args.profile:
            print("\ntorch.profiler, 20 recipe steps (1 window, no workers), CPU")
            print(profile_training(store_path, root / "profile", steps=20))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}; "
          f"matmul yardstick {matmul_gflops():.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
