"""Converter throughput and memory on >= 2 GB of I3D-layout input (issue 2, part 6).

Writes I3D-layout input (actor tensors (n, 1024, 4, 7, 7) float32 as in the published features,
objects (m, 2048) float32 with cls_prob) under a temp dir, then for 1 GB and 2 GB of it:

- raw read: open every .h5 once and read every dataset (h5py's usual ``File``/``f[name][()]``),
  with the same worker count;
- conversion: ``tools/convert_features.py`` as a subprocess, timed from start to exit (Python
  start-up included); its peak RSS is the largest sum of RSS over its process tree (main and
  workers), sampled every 20 ms with psutil in a separate run, so that the sampling (CPU on a
  2-core machine) does not slow the timed run.

Prints input MB, raw read MB/s, conversion MB/s (of input), time ratio (target <= 2), store size
vs input, and peak RSS (target < 2 GB and flat from 1 GB to 2 GB).

``--rss`` measures instead the memory of one worker writing a full-AVA objects shard (issue 11.3):
input with 65,536 objects of 2048 dims (what one objects shard holds at full AVA scale, 256 MB
of float16 features) and a few 1024-dim actors, converted with ``--min-shards 1`` so that the
objects are one shard; it prints each process's peak RSS (VmHWM, sampled every 20 ms) against
the raw bytes of the largest shard it writes (target <= 1.5x). Both reads see a warm page
cache (one untimed raw read first), so the ratio compares CPU work. Raw read and conversion are
timed ``--repeats`` times, alternating, and the fastest of each is reported (other load on the
machine only ever slows a run down).

``--rerun N`` measures instead a rerun on a complete store (issue 15.7): I3D input of N keyframes
(50 per clip, small arrays: the cost is per file, not per byte), converted once, then the same
command timed ``--repeats`` times from start to exit (``python -m stage_dist.convert``, whose
code comes from the environment's PYTHONPATH); ``--compare DIR`` does the same with the code
at DIR (e.g. another checkout) first, each into its own store, and prints the ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
ACTOR_SHAPE = (1024, 4, 7, 7)
OBJECT_DIM = 2048
KEYFRAMES_PER_CLIP = 50


def write_input(root: Path, gigabytes: float, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """I3D layout of about ``gigabytes`` under ``root``; returns actors dir, objects file, clip ids."""
    rng = np.random.default_rng(seed)
    actors_dir, objects_file = root / "actors", root / "objects.h5"
    actors_dir.mkdir(parents=True)
    actor_bytes = int(np.prod(ACTOR_SHAPE)) * 4
    budget, written, clips = gigabytes * 1e9, 0, list[str]()
    with h5py.File(objects_file, "w") as objects:
        while written < budget:
            video_id = f"-bench_{len(clips):04d}"
            clips.append(video_id)
            (actors_dir / video_id).mkdir()
            for ts in range(902, 902 + KEYFRAMES_PER_CLIP):
                n, m = int(rng.integers(0, 5)), int(rng.integers(0, 12))
                boxes = np.sort(rng.random((n, 2, 2), dtype=np.float32), axis=1).reshape(n, 4)
                labels = np.zeros((n, 81), np.float32)
                labels[np.arange(n), rng.integers(1, 81, n)] = 1
                with h5py.File(actors_dir / video_id / f"{ts:04d}.h5", "w") as f:
                    f["features"] = rng.standard_normal((n, *ACTOR_SHAPE), dtype=np.float32)
                    f["boxes"] = boxes
                    f["labels"] = labels
                obj_boxes = np.sort(rng.random((m, 2, 2), dtype=np.float32), axis=1).reshape(m, 4)
                objects[f"{video_id}_{ts}_features"] = rng.standard_normal((m, OBJECT_DIM), dtype=np.float32)
                objects[f"{video_id}_{ts}_boxes"] = obj_boxes
                objects[f"{video_id}_{ts}_cls_prob"] = rng.random((m, 81), dtype=np.float32)
                written += n * actor_bytes + m * (OBJECT_DIM + 81 + 4) * 4
    return actors_dir, objects_file, clips


def subset(actors_dir: Path, clips: list[str], out: Path) -> Path:
    """An actors dir holding (links to) ``clips`` only."""
    out.mkdir()
    for clip in clips:
        (out / clip).symlink_to(actors_dir / clip)
    return out


def _read_clip(args: tuple[Path, Path, str]) -> int:
    actors_dir, objects_file, clip = args
    total = 0
    with h5py.File(objects_file, "r") as objects:
        for file in sorted((actors_dir / clip).iterdir()):
            with h5py.File(file, "r") as f:
                for name in ("features", "boxes", "labels"):
                    total += f[name][()].nbytes
            for suffix in ("_features", "_boxes", "_cls_prob"):
                total += objects[f"{clip}_{int(file.stem)}{suffix}"][()].nbytes
    return total


def raw_read(actors_dir: Path, objects_file: Path, clips: list[str], workers: int) -> tuple[int, float]:
    """Read every dataset of the input once with ``workers`` processes: (bytes, seconds)."""
    start = time.perf_counter()
    with mp.get_context("fork").Pool(workers) as pool:
        total = sum(pool.imap_unordered(_read_clip, [(actors_dir, objects_file, c) for c in clips]))
    return total, time.perf_counter() - start


def convert(actors_dir: Path, objects_file: Path, out: Path, workers: int,
            sample_rss: bool = False) -> tuple[float, int, str]:
    """Run the converter CLI into a fresh ``out``; returns (seconds, peak RSS of its process
    tree or 0 when not sampled, stdout)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "tools" / "convert_features.py"), "--actors-dir", str(actors_dir),
           "--objects-file", str(objects_file), "--out", str(out), "--workers", str(workers),
           "--no-progress", "--log-level", "ERROR"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while sample_rss and proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"converter failed ({proc.returncode}):\n{stderr}")
    return seconds, peak, stdout


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_objects_shard_input(root: Path, objects: int = 65_536, per_keyframe: int = 64,
                              actor_every: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """I3D input whose objects fill exactly one full-AVA objects shard; few actors."""
    rng = np.random.default_rng(seed)
    actors_dir, objects_file = root / "actors", root / "objects.h5"
    actors_dir.mkdir(parents=True)
    keyframes = objects // per_keyframe
    with h5py.File(objects_file, "w") as f:
        for k in range(keyframes):
            video_id, ts = f"-rss_{k // KEYFRAMES_PER_CLIP:04d}", 902 + k % KEYFRAMES_PER_CLIP
            (actors_dir / video_id).mkdir(exist_ok=True)
            n = int(k % actor_every == 0)
            with h5py.File(actors_dir / video_id / f"{ts:04d}.h5", "w") as a:
                a["features"] = rng.standard_normal((n, *ACTOR_SHAPE), dtype=np.float32)
                a["boxes"] = np.tile(np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), (n, 1))
                labels = np.zeros((n, 81), np.float32)
                labels[:, 1] = 1
                a["labels"] = labels
            f[f"{video_id}_{ts}_features"] = rng.standard_normal((per_keyframe, OBJECT_DIM), dtype=np.float32)
            f[f"{video_id}_{ts}_boxes"] = np.tile(np.array([[0.2, 0.2, 0.6, 0.6]], np.float32), (per_keyframe, 1))
            f[f"{video_id}_{ts}_cls_prob"] = rng.random((per_keyframe, 81), dtype=np.float32)
    return actors_dir, objects_file


def _peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of a live process, bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_worker_rss(work: Path, workers: int) -> int:
    """Convert a one-objects-shard input; print each process's peak RSS against the shard's raw bytes."""
    import zarr

    t = time.perf_counter()
    actors_dir, objects_file = write_objects_shard_input(work / "rss_input")
    print(f"input: {dir_bytes(work / 'rss_input') / 1e9:.2f} GB written in {time.perf_counter() - t:.0f} s")
    out = work / "rss.zarr"
    cmd = [sys.executable, str(REPO / "tools" / "convert_features.py"), "--actors-dir", str(actors_dir),
           "--objects-file", str(objects_file), "--out", str(out), "--workers", str(workers), "--min-shards", "1",
           "--no-progress", "--log-level", "ERROR"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peaks = psutil.Process(proc.pid), dict[int, int]()
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                peaks[p.pid] = max(peaks.get(p.pid, 0), _peak_rss(p.pid))
        except (psutil.Error, OSError):
            pass
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"converter failed ({proc.returncode}):\n{stderr}")
    group = zarr.open_group(out, mode="r")
    shard_bytes = 0
    for name in ("objects/features", "objects/boxes", "objects/cls_prob"):
        arr = group[name]
        assert isinstance(arr, zarr.Array) and arr.shards, name
        shard_bytes += arr.shards[0] * int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
    features = group["objects/features"]
    assert isinstance(features, zarr.Array) and features.shards
    rows = features.shards[0]
    print(f"objects: {features.shape[0]} rows, shard {rows} rows = {shard_bytes / 2**20:.0f} MiB raw; "
          f"conversion {time.perf_counter() - start:.1f} s")
    main_pid = proc.pid
    for pid, peak in sorted(peaks.items(), key=lambda kv: kv[0] != main_pid):
        role = "main  " if pid == main_pid else "worker"
        print(f"  {role} pid {pid}: peak RSS {peak / 2**20:6.0f} MiB = {peak / shard_bytes:.2f}x the shard's raw bytes")
    worst = max(peak for pid, peak in peaks.items() if pid != main_pid) if len(peaks) > 1 else peaks[main_pid]
    print(f"largest worker peak RSS / shard raw bytes: {worst / shard_bytes:.2f} (target <= 1.5)")
    return worst


def write_small_input(root: Path, keyframes: int, seed: int = 0) -> tuple[Path, Path]:
    """I3D layout of ``keyframes`` keyframes with small arrays (many files, few bytes)."""
    rng = np.random.default_rng(seed)
    actors_dir, objects_file = root / "actors", root / "objects.h5"
    actors_dir.mkdir(parents=True)
    with h5py.File(objects_file, "w") as objects:
        for k in range(keyframes):
            video_id, ts = f"-rerun_{k // KEYFRAMES_PER_CLIP:05d}", 902 + k % KEYFRAMES_PER_CLIP
            (actors_dir / video_id).mkdir(exist_ok=True)
            n, m = int(rng.integers(0, 4)), int(rng.integers(0, 6))
            labels = np.zeros((n, 81), np.float32)
            labels[:, 1] = 1
            with h5py.File(actors_dir / video_id / f"{ts:04d}.h5", "w") as f:
                f["features"] = rng.standard_normal((n, 16, 1, 1, 1), dtype=np.float32)
                f["boxes"] = np.tile(np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), (n, 1))
                f["labels"] = labels
            objects[f"{video_id}_{ts}_features"] = rng.standard_normal((m, 32), dtype=np.float32)
            objects[f"{video_id}_{ts}_boxes"] = np.tile(np.array([[0.2, 0.2, 0.6, 0.6]], np.float32), (m, 1))
            objects[f"{video_id}_{ts}_cls_prob"] = rng.random((m, 81), dtype=np.float32)
    return actors_dir, objects_file


def measure_rerun(work: Path, keyframes: int, workers: int, repeats: int, compare: Path | None) -> None:
    """Convert ``keyframes`` keyframes once per code version, then time reruns on the complete store."""
    t = time.perf_counter()
    actors_dir, objects_file = write_small_input(work / "input", keyframes)
    print(f"input: {keyframes} keyframes in {keyframes // KEYFRAMES_PER_CLIP} clips, written in "
          f"{time.perf_counter() - t:.0f} s (workers {workers}, cpus {os.cpu_count()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    versions = [("compare", str(compare))] if compare is not None else []
    versions.append(("this", os.environ.get("PYTHONPATH", str(REPO))))
    best = {}
    for name, code in versions:
        out = work / f"store_{name}.zarr"
        cmd = [sys.executable, "-m", "stage_dist.convert", "--actors-dir", str(actors_dir), "--objects-file",
               str(objects_file), "--out", str(out), "--workers", str(workers), "--no-progress",
               "--log-level", "ERROR"]
        env = dict(os.environ, PYTHONPATH=code)  # run in `work`: `-m` puts the cwd first on sys.path
        times, stdout = [], ""
        for attempt in range(1 + repeats):  # the first run converts; the others are reruns
            start = time.perf_counter()
            run = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, check=False)
            times.append(time.perf_counter() - start)
            if run.returncode != 0:
                raise SystemExit(f"converter ({code}) failed ({run.returncode}):\n{run.stderr}")
            stdout = run.stdout
        best[name] = min(times[1:])
        phases = next((line for line in stdout.splitlines() if line.startswith("seconds by")), "")
        print(f"{name} code ({code}): conversion {times[0]:.1f} s; rerun on the complete store "
              f"{' '.join(f'{x:.2f}' for x in times[1:])} s (best {best[name]:.2f} s; last rerun: {phases})")
    if compare is not None:
        print(f"rerun time ratio, compare / this: {best['compare'] / best['this']:.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="input size in GB (1 and 2 GB are measured by default)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for raw read and conversion")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the input is written")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of raw read and conversion (fastest kept)")
    parser.add_argument("--keep", action="store_true", help="keep the generated input and stores")
    parser.add_argument("--rss", action="store_true",
                        help="only measure per-worker peak RSS writing a full-AVA objects shard (65,536 x 2048)")
    parser.add_argument("--rerun", type=int, metavar="N", default=None,
                        help="only time a rerun on a complete store of N keyframes (small arrays)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="with --rerun: also time the code at this directory (PYTHONPATH), first")
    args = parser.parse_args(argv)
    if args.rerun is not None:
        work = Path(tempfile.mkdtemp(prefix="convert_bench_rerun_", dir=args.tmp))
        try:
            measure_rerun(work, args.rerun, args.workers, args.repeats, args.compare)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.rss:
        work = Path(tempfile.mkdtemp(prefix="convert_bench_rss_", dir=args.tmp))
        try:
            measure_worker_rss(work, args.workers)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        return 0

    free = shutil.disk_usage(args.tmp).free
    if free < 3 * args.gb * 1e9:
        print(f"need {3 * args.gb:.1f} GB free in {args.tmp}, have {free / 1e9:.1f} GB", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="convert_bench_", dir=args.tmp))
    try:
        t = time.perf_counter()
        actors_dir, objects_file, clips = write_input(work / "input", args.gb)
        print(f"input: {len(clips)} clips x {KEYFRAMES_PER_CLIP} keyframes, "
              f"{dir_bytes(work / 'input') / 1e9:.2f} GB written in {time.perf_counter() - t:.0f} s "
              f"(workers {args.workers}, cpus {os.cpu_count()})")
        print(f"{'input GB':>8} {'raw MB/s':>9} {'conv MB/s':>9} {'ratio':>6} {'store/in':>8} {'peak RSS MB':>11}")
        for fraction in (0.5, 1.0):
            chosen = clips[: max(1, round(len(clips) * fraction))]
            dirname = actors_dir if fraction == 1.0 else subset(actors_dir, chosen, work / f"actors_{fraction}")
            out = work / f"store_{fraction}.zarr"
            raw_read(dirname, objects_file, chosen, args.workers)  # warm the page cache
            raw_times, conv_times = [], []
            for _ in range(max(1, args.repeats)):
                nbytes, raw_s = raw_read(dirname, objects_file, chosen, args.workers)
                conv_s, _, stdout = convert(dirname, objects_file, out, args.workers)
                raw_times.append(raw_s)
                conv_times.append(conv_s)
            raw_s, conv_s = min(raw_times), min(conv_times)
            store = dir_bytes(out)
            _, peak, _ = convert(dirname, objects_file, out, args.workers, sample_rss=True)
            print(f"{nbytes / 1e9:8.2f} {nbytes / 1e6 / raw_s:9.0f} {nbytes / 1e6 / conv_s:9.0f} "
                  f"{conv_s / raw_s:6.2f} {store / nbytes:8.3f} {peak / 2**20:11.0f}"
                  f"   (raw {raw_s:.2f} s, conversion {conv_s:.2f} s incl. startup; all runs: raw "
                  f"{' '.join(f'{t:.2f}' for t in raw_times)}, conversion {' '.join(f'{t:.2f}' for t in conv_times)})")
            lines = stdout.splitlines()
            timing = [line for line in lines if line.startswith("seconds by")]
            print("    converter: " + " | ".join(lines[1:2] + timing))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
