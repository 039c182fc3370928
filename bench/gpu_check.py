"""One command that checks the CUDA path end to end and benchmarks it (issue 10, item 3).

    PYTHONUNBUFFERED=1 python bench/gpu_check.py --json gpu_check.json       # one GPU, <= 8 min
    python bench/gpu_check.py --cpu-smoke --json smoke.json                   # tiny, CPU, < 3 min

It needs only the repository (``stage_dist`` is found through ``PYTHONPATH``, set here for every
child process) and torch, h5py, zarr, numcodecs, webdataset, tensorboard, tqdm: no network.
Every end-to-end part runs the project's command lines as child processes
(``python -m stage_dist.synth``, ``tools/convert_features.py``, ``python -m stage_dist.train``,
``torchrun ... stage_dist.infer``); the profiler and the steady-state inference timing import
the library (``stage_dist.engine.trainer.Trainer``; ``stage_dist.engine.inference.predict`` over the
``WindowSource`` of ``stage_dist.data.splits.open_window_source``), each in a child process of its own
(``--_worker``).

Sections, in this order (each one is caught: an error is recorded in the JSON and the run goes
on; the JSON is rewritten after every section, so a killed run still leaves what it measured):

- ``environment``: torch / CUDA / cuDNN / NCCL versions, device, bf16 support, package versions
  (stops the run, every other section skipped, without CUDA or without zarr/numcodecs/webdataset);
- ``data``: synthetic AVA-like data at the published sizes (1024-dim actors, 2048-dim objects,
  up to 3 actors and 30 objects per keyframe; the measured means are reported), converted
  (train from the I3D layout, val from the SlowFast layout);
- ``throughput_recipe_eager`` / ``throughput_windows32``: training keyframes/s and data-wait
  fraction (the trainer's TensorBoard scalars, median of the second half of the run), peak GPU
  memory (``torch.cuda.max_memory_allocated`` of the trainer process, read at exit by a small
  wrapper) and the seconds from start to the first logged step. Both read the node-shared
  decompressed store (``--memmap-dir``, built by the first run and mapped by every later one);
  a run whose config.json does not name it, or that leaves no ``.npy`` there, is an error;
- ``throughput_inference``: steady-state ``predict`` keyframes/s over the train store (passes
  after a warm-up, through ``--memmap-dir``; data wait = time spent in the DataLoader's
  ``__next__``) and the CLI's own figure (start-up included);
- ``profiler``: the real ``Trainer.fit`` loop with ``Trainer.train_step`` wrapped so that each
  step is marked for ``torch.profiler`` (no step of the profiled window is a log step):
  kernel launches, CUDA graph launches and host syncs (``cudaStreamSynchronize``,
  ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, ``cudaMemcpy``) per step on the GPU;
  on every device the host reads of tensor values (``aten::_local_scalar_dense``: ``.item()``,
  ``int()``, ``bool()``) with the source line of each. Passes when the profiled steps ran, the
  step received a ``stage_dist.data.batch.Batch`` whose ``Graph`` was built in collate (on the host,
  before ``Batch.to``), and no host read is issued by stage_dist code inside ``train_step``
  (on the CPU, fused Adam reads its step counters on the host inside the kernel: torch's own
  reads, listed, not counted; they live on the device on the GPU);
- ``throughput_recipe_compiled``: the recipe with ``--compile``: steady-state keyframes/s (as
  above, compilation excluded), and compilation on its own: seconds spent compiling
  (``torch._dynamo.utils.calculate_time_spent``: frames and backward graphs; CUDA graph
  recording is not in it), graphs compiled, and seconds to the first logged step against the
  eager run's; then a profile of compiled steps. In ``--cpu-smoke`` the wrapper sets
  ``torch.compile``'s backend to ``aot_eager`` (dynamo's full-graph capture and AOT autograd
  without Inductor's C++ build, which takes minutes on a small CPU);
- ``train_resume``: bf16 recipe run A uninterrupted; run B SIGKILLed by itself while its second
  checkpoint is being written (mid-run; a wrapper patches ``os.replace``), then restarted with
  the same command; A's and B's final checkpoints compared tensor by tensor: model and optimizer
  bitwise (else the largest absolute difference) and every rank's RNG states equal. Without
  DataLoader workers and with 2; on the GPU also with ``--deterministic`` when the trainer has
  that flag, and then only the deterministic variants must be bitwise (the others are reported:
  the backward of CUDA's gather/index ops accumulates with atomic adds, in no fixed order);
- ``train_fp16`` (fp16 + ``--grad-clip``) and ``train_amp_off``: 20 steps each, finite loss
  and weights;
- ``cross_device``: a GPU-trained and a CPU-trained checkpoint each inferred on the GPU and on
  the CPU (``--amp off``): results.csv byte-identical, or the largest score difference;
- ``inference_consistency``: results.csv of the GPU checkpoint at two ``--window`` /
  ``--windows-per-batch`` settings and on 1, 2 and 3 ranks, compared by sha256. On one GPU the
  extra ranks are emulated: every rank uses ``cuda:0`` and a gloo process group (NCCL refuses
  two ranks on one device, and ``init_distributed`` binds rank r to ``cuda:LOCAL_RANK``), set up
  by the same wrapper (``LOCAL_RANK=0``, backend forced to gloo).

The correctness phases run their child processes side by side (``Sizes.parallel``); the
throughput sections run alone.

Targets (one H200, bf16; PASS/MISS in the table, ``n/a`` in ``--cpu-smoke``): recipe >= 2,000
keyframes/s eager and >= 5,000 compiled; 32 windows/step >= 30,000 keyframes/s with data wait
< 10 %; inference >= 50,000 keyframes/s; host syncs per training step 0 outside log steps.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

SECTIONS = (
    "environment", "data", "throughput_recipe_eager", "throughput_windows32", "throughput_inference",
    "profiler", "train_resume", "train_fp16", "train_amp_off", "cross_device", "inference_consistency",
    "throughput_recipe_compiled",
)
# Sections whose result is a correctness verdict (``passed``), as opposed to a measurement.
CHECKS = ("data", "train_resume", "train_fp16", "train_amp_off", "cross_device", "inference_consistency",
          "profiler")
# Resume is checked without DataLoader workers and with the trainer's default of 2 (the loader then
# prefetches, and builds its iterator differently).
RESUME_WORKERS = (0, 2)
CSV_TOLERANCE = 1e-3  # largest |score difference| accepted between devices (scores are probabilities)
CHECKPOINT_NAME = re.compile(r"^ckpt_e(\d+)_s(\d+)\.pt$")


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU check and the CPU smoke run."""

    mode: str  # "cuda" | "cpu-smoke"
    device: str  # device of the GPU-side runs
    other_device: str  # device of the CPU side of the cross-device check
    budget_s: float
    parallel: int  # child processes at once in the correctness phases
    synth: tuple[str, ...]
    train_amp: str
    recipe_steps: int
    compiled_steps: int
    windows32: int  # windows per step of the "32 windows" run (smaller in the smoke run)
    windows32_steps: int
    log_every: int
    recipe_workers: int
    windows32_workers: int
    resume_steps: int
    resume_every: int
    short_steps: int
    profile_steps: tuple[int, int, int]  # profiler schedule: wait, warmup, active
    infer_passes: int
    infer_workers: int
    threads: int  # intra-op threads of each correctness child (they run side by side)
    compile_backend: str  # torch.compile backend forced by the wrapper ("": the trainer's own choice)
    checks_reserve_s: float  # seconds of the budget the --compile section leaves to the correctness checks


CUDA_SIZES = Sizes(
    mode="cuda", device="cuda", other_device="cpu", budget_s=450, parallel=4,
    synth=("--train-clips", "160", "--val-clips", "10", "--keyframes-per-clip", "100", "--max-actors", "3",
           "--max-objects", "30", "--actor-dim", "1024", "--object-dim", "2048", "--actor-thw", "1", "1", "1"),
    train_amp="bf16", recipe_steps=2000, compiled_steps=3000, windows32=32, windows32_steps=600, log_every=50,
    recipe_workers=4, windows32_workers=8, resume_steps=200, resume_every=50, short_steps=20,
    profile_steps=(5, 5, 10), infer_passes=5, infer_workers=4, threads=3, compile_backend="",
    checks_reserve_s=110,
)
SMOKE_SIZES = Sizes(
    mode="cpu-smoke", device="cpu", other_device="cpu", budget_s=170, parallel=2,
    synth=("--train-clips", "4", "--val-clips", "2", "--keyframes-per-clip", "24", "--max-actors", "3",
           "--max-objects", "8", "--actor-dim", "32", "--object-dim", "64", "--actor-thw", "1", "1", "1"),
    train_amp="bf16", recipe_steps=30, compiled_steps=30, windows32=4, windows32_steps=12, log_every=5,
    recipe_workers=0, windows32_workers=0, resume_steps=12, resume_every=3, short_steps=20,
    profile_steps=(1, 1, 4), infer_passes=2, infer_workers=0, threads=1, compile_backend="aot_eager",
    checks_reserve_s=60,
)


# ----------------------------------------------------------------------------- report


class Report:
    """The JSON report: ``meta``, one entry per section, ``checks`` and ``targets``; rewritten
    atomically after every section."""

    def __init__(self, path: Path | None, meta: dict) -> None:
        self.path = path
        self.data: dict[str, Any] = {"meta": meta, "sections": {}, "checks": {}, "targets": []}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict]:
        entry: dict[str, Any] = {"status": "ok"}
        self.data["sections"][name] = entry
        started = time.monotonic()
        print(f"[{_clock()}] {name} ...", flush=True)
        try:
            yield entry
        except Skip as skip:
            entry["status"] = "skipped"
            entry["reason"] = str(skip)
        except Exception as error:  # noqa: BLE001 - every failure is recorded, the run goes on
            entry["status"] = "error"
            entry["error"] = f"{type(error).__name__}: {error}"
            entry["traceback"] = traceback.format_exc()[-3000:]
        # A section whose work ran in a parallel phase reports that work's own duration.
        entry["seconds"] = round(entry.pop("_seconds", time.monotonic() - started), 1)
        if name in CHECKS:
            self.data["checks"][name] = entry.get("passed") if entry["status"] == "ok" else False
        print(f"[{_clock()}] {name}: {entry['status']} ({entry['seconds']} s) {entry.get('summary', '')}"
              f"{entry.get('reason', '')}{entry.get('error', '')}", flush=True)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


class Skip(Exception):
    """A section that does not apply (no --compile flag, no time left): recorded as skipped."""


def _clock() -> str:
    return time.strftime("%H:%M:%S")


class Budget:
    """The run's total time; child processes get what is left (at most their own cap)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, cap: float) -> float:
        left = self.left() - 3
        if left < 5:
            raise Skip("time budget spent")
        return min(cap, left)


# ----------------------------------------------------------------------------- child processes

# Runs a module like ``python -m`` with optional hooks set through the environment:
# GPU_CHECK_STATS_FILE: at exit write, one file per rank, the process's start time, its
#   torch.cuda.max_memory_allocated (and reserved) and, if it compiled, the seconds dynamo and the
#   backend spent compiling and the number of graphs;
# GPU_CHECK_COMPILE_BACKEND=name: torch.compile with this backend (and no mode) whatever it is asked;
# GPU_CHECK_EMULATE_RANKS=1: every rank on cuda:0 with a gloo process group (several ranks, one GPU);
# GPU_CHECK_KILL_AT_CHECKPOINT=k: SIGKILL this process when its k-th checkpoint is about to be renamed
# into place (the checkpoint writer's atomic os.replace), i.e. mid-run and mid-write.
WRAPPER = r'''
import atexit, json, os, re, runpy, signal, sys, time

module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
started = time.time()
stats_file = os.environ.get("GPU_CHECK_STATS_FILE")
if stats_file:
    def _write_stats():
        stats = {"started": started}
        try:
            import torch
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                stats.update(max_allocated=torch.cuda.max_memory_allocated(),
                             max_reserved=torch.cuda.max_memory_reserved())
            if "torch._dynamo" in sys.modules:
                from torch._dynamo import utils
                compiled = {"graphs": utils.counters["stats"]["unique_graphs"]}
                if compiled["graphs"]:
                    stats["compile"] = compiled
                    spent = utils.calculate_time_spent()
                    compiled.update(seconds=spent.get("total_wall_time"), phases=spent)
        except Exception as error:
            stats["error"] = f"{type(error).__name__}: {error}"
        with open(f"{stats_file}.rank{os.environ.get('RANK', '0')}", "w") as handle:
            json.dump(stats, handle)
    atexit.register(_write_stats)
compile_backend = os.environ.get("GPU_CHECK_COMPILE_BACKEND")
if compile_backend:
    import torch
    _compile = torch.compile
    def _compile_with_backend(*args, **kwargs):
        kwargs.update(backend=compile_backend, mode=None)
        return _compile(*args, **kwargs)
    torch.compile = _compile_with_backend
if os.environ.get("GPU_CHECK_EMULATE_RANKS") == "1":
    os.environ["LOCAL_RANK"] = "0"
    import torch.distributed as dist
    _init_process_group = dist.init_process_group
    def _gloo_process_group(*args, **kwargs):
        kwargs.pop("device_id", None)
        if args:
            args = ("gloo",) + tuple(args[1:])
        else:
            kwargs["backend"] = "gloo"
        return _init_process_group(*args, **kwargs)
    dist.init_process_group = _gloo_process_group
kill_at = int(os.environ.get("GPU_CHECK_KILL_AT_CHECKPOINT", "0"))
if kill_at:
    _replace = os.replace
    _count = [0]
    def _replace_or_die(src, dst, *args, **kwargs):
        if re.match(r"ckpt_.*\.pt$", os.path.basename(os.fspath(dst))):
            _count[0] += 1
            if _count[0] >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *args, **kwargs)
    os.replace = _replace_or_die
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


@dataclass
class Proc:
    """A finished child process."""

    name: str
    argv: list[str]
    returncode: int | None
    seconds: float
    log: Path
    timed_out: bool = False

    @property
    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, chars: int = 2000) -> str:
        return self.output[-chars:]

    def check(self) -> "Proc":
        if self.timed_out:
            raise RuntimeError(f"{self.name}: timed out after {self.seconds:.0f} s; log {self.log}:\n{self.tail()}")
        if self.returncode != 0:
            raise RuntimeError(f"{self.name}: exit code {self.returncode}; log {self.log}:\n{self.tail()}")
        return self


class Runner:
    """Starts child processes in the repository with ``stage_dist`` importable, logs each one's
    output to ``WORKDIR/logs/NAME.log`` and kills its whole process group when it ends."""

    def __init__(self, workdir: Path, budget: Budget) -> None:
        self.workdir, self.budget = workdir, budget
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.wrapper = workdir / "gpu_check_wrapper.py"
        self.wrapper.write_text(WRAPPER)
        path = os.environ.get("PYTHONPATH")
        self.env = dict(os.environ, PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""),
                        PYTHONUNBUFFERED="1", TQDM_DISABLE="1")

    def run(self, name: str, args: Sequence[str | os.PathLike[str]], *, cap: float,
            env: dict[str, str] | None = None) -> Proc:
        timeout = self.budget.timeout(cap)
        log = self.logs / f"{name}.log"
        argv = [str(a) for a in args]
        started = time.monotonic()
        with open(log, "w") as handle:
            handle.write("$ " + " ".join(argv) + "\n")
            handle.flush()
            child = subprocess.Popen(argv, cwd=REPO, env={**self.env, **(env or {})}, stdout=handle,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            timed_out = False
            try:
                returncode: int | None = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(child.pid)
                returncode = child.wait()
            finally:
                _kill_group(child.pid)  # loader workers or ranks left behind
        return Proc(name, argv, returncode, time.monotonic() - started, log, timed_out)

    def module(self, name: str, module: str, args: Sequence[Any], *, cap: float, env: dict | None = None,
               nproc: int = 0) -> Proc:
        """``python WRAPPER module args`` (``nproc`` > 0: under ``torchrun --nproc_per_node``)."""
        launcher = [PYTHON] if not nproc else [PYTHON, "-m", "torch.distributed.run", "--standalone",
                                               f"--nproc_per_node={nproc}"]
        return self.run(name, [*launcher, self.wrapper, module, *args], cap=cap, env=env)

    def worker(self, name: str, kind: str, args: dict, *, cap: float) -> dict:
        """Run ``gpu_check.py --_worker KIND`` (library-level measurements) and return its JSON."""
        spec, result = self.logs / f"{name}.in.json", self.logs / f"{name}.out.json"
        spec.write_text(json.dumps(args))
        result.unlink(missing_ok=True)
        self.run(name, [PYTHON, Path(__file__).resolve(), "--_worker", kind, "--_spec", spec, "--_result", result],
                 cap=cap).check()
        return json.loads(result.read_text())


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_parallel(jobs: dict[str, Callable[[], Any]], parallel: int) -> dict[str, tuple[Any, float]]:
    """Run independent jobs on threads: name -> (the job's result or the exception it raised, seconds)."""

    def timed(job: Callable[[], Any]) -> tuple[Any, float]:
        started = time.monotonic()
        try:
            return job(), time.monotonic() - started
        except Exception as error:  # noqa: BLE001 - returned to the section that owns the job
            return error, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {name: pool.submit(timed, job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def _value(result: Any) -> Any:
    if isinstance(result, BaseException):
        raise result
    return result


# ----------------------------------------------------------------------------- pure helpers


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compare_results_csv(a: Path, b: Path) -> dict:
    """Two AVA results.csv files: byte-identical (sha256), else whether they hold the same rows
    (video, timestamp, box, action) and the largest absolute score difference."""
    sha_a, sha_b = sha256(a), sha256(b)
    if sha_a == sha_b:
        return {"identical": True, "same_rows": True, "max_abs_score_diff": 0.0, "sha256": sha_a}

    def rows(path: Path) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in path.read_text().splitlines():
            key, _, score = line.rpartition(",")
            out[key] = float(score)
        return out

    rows_a, rows_b = rows(a), rows(b)
    same = rows_a.keys() == rows_b.keys()
    common = rows_a.keys() & rows_b.keys()
    diff = max((abs(rows_a[k] - rows_b[k]) for k in common), default=math.nan)
    return {"identical": False, "same_rows": same, "rows": [len(rows_a), len(rows_b)],
            "max_abs_score_diff": diff, "sha256": [sha_a, sha_b]}


def steady(values: Sequence[float]) -> float | None:
    """The median of the second half of a run's logged values (start-up and compilation excluded)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return statistics.median(values[len(values) // 2:])


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar of the TensorBoard event files under ``directory``: tag -> [(step, value, wall time)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def newest_checkpoint(directory: Path) -> Path:
    found = [(int(m[1]), int(m[2]), p) for p in directory.glob("ckpt_*.pt") if (m := CHECKPOINT_NAME.match(p.name))]
    if not found:
        raise RuntimeError(f"no checkpoint in {directory}")
    return max(found)[2]


def compare_states(a: Any, b: Any, path: str = "") -> dict:
    """Recursive comparison of two checkpoint trees: which leaves differ and the largest absolute
    difference of differing tensors/arrays/numbers (NaN where not numeric)."""
    import numpy as np
    import torch

    differing: list[str] = []
    worst = 0.0

    def walk(x: Any, y: Any, where: str) -> None:
        nonlocal worst
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y), key=str):
                if key not in x or key not in y:
                    differing.append(f"{where}/{key} (missing on one side)")
                else:
                    walk(x[key], y[key], f"{where}/{key}")
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif isinstance(x, (torch.Tensor, np.ndarray)) or isinstance(y, (torch.Tensor, np.ndarray)):
            u, v = torch.as_tensor(x), torch.as_tensor(y)
            if u.shape != v.shape or u.dtype != v.dtype:
                differing.append(f"{where} (shape/dtype {tuple(u.shape)} {u.dtype} vs {tuple(v.shape)} {v.dtype})")
                worst = math.nan
            elif not torch.equal(u, v):
                differing.append(where)
                if u.is_floating_point() or u.is_complex():
                    worst = max(worst, float((u.double() - v.double()).abs().max()))
                elif u.dtype != torch.bool:
                    worst = max(worst, float((u.long() - v.long()).abs().max()))
        elif x != y and not (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)):
            differing.append(where)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                worst = max(worst, abs(float(x) - float(y)))

    walk(a, b, path)
    return {"equal": not differing, "differing": differing[:20], "num_differing": len(differing),
            "max_abs_diff": worst}


def evaluate_targets(sections: dict, smoke: bool) -> list[dict]:
    """The issue's targets for one H200 (bf16) against the measured values."""

    def get(section: str, key: str) -> float | None:
        value = sections.get(section, {}).get(key)
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None

    rows = [
        ("recipe eager, keyframes/s", get("throughput_recipe_eager", "keyframes_per_s"), ">=", 2000),
        ("recipe compiled, keyframes/s", get("throughput_recipe_compiled", "keyframes_per_s"), ">=", 5000),
        ("32 windows/step, keyframes/s", get("throughput_windows32", "keyframes_per_s"), ">=", 30000),
        ("32 windows/step, data wait", get("throughput_windows32", "data_wait_fraction"), "<", 0.10),
        ("inference, keyframes/s", get("throughput_inference", "keyframes_per_s"), ">=", 50000),
        ("host syncs per step (no log step)", get("profiler", "host_syncs_per_step"), "==", 0),
    ]
    targets = []
    for name, value, op, goal in rows:
        if value is None:
            result = "n/a"
        elif smoke:
            result = "n/a (cpu-smoke)"
        else:
            ok = {">=": value >= goal, "<": value < goal, "==": value == goal}[op]
            result = "PASS" if ok else "MISS"
        targets.append({"target": name, "value": value, "goal": f"{op} {goal}", "result": result})
    return targets


# ----------------------------------------------------------------------------- the check


class GpuCheck:
    def __init__(self, sizes: Sizes, workdir: Path, report: Report, reuse_data: bool) -> None:
        self.sizes, self.workdir, self.report, self.reuse_data = sizes, workdir, report, reuse_data
        self.budget = Budget(sizes.budget_s)
        self.runner = Runner(workdir, self.budget)
        self.train_store = workdir / "data" / "train.zarr"
        self.val_store = workdir / "data" / "val.zarr"
        self.train_keyframes = 0
        # On the work directory's disk, not /dev/shm (a container's may hold 64 MB): the page cache
        # makes it as fast once read.
        self.memmap_dir = workdir / "memmap"
        self.train_help = ""
        self.gpu_checkpoint: Path | None = None  # the eager throughput run's (bf16, on the device)
        self.cpu_checkpoint: Path | None = None  # a short run on the CPU
        self.cpu_checkpoint_error = "not trained yet"
        self.fatal = ""  # set when nothing after the environment can run

    # -- helpers --------------------------------------------------------------------------

    def has_train_flag(self, flag: str) -> bool:
        return re.search(rf"(^|\s){re.escape(flag)}(\s|,|=|$)", self.train_help, re.M) is not None

    def epochs_for(self, steps: int, windows_per_step: int) -> int:
        """Enough epochs for ``steps`` (each epoch has about keyframes / keyframes-per-step steps)."""
        per_epoch = max(1, self.train_keyframes // (6 * windows_per_step) // 2)
        return steps // per_epoch + 2

    def train_args(self, out: Path, *, steps: int, amp: str, windows_per_step: int = 1, workers: int = 1,
                   device: str | None = None, log_every: int | None = None, checkpoint_every: int = 0,
                   threads: int = 0, memmap: bool = False, extra: Sequence[str] = ()) -> list[str]:
        args = ["--train-store", self.train_store, "--output-dir", out, "--max-steps", steps,
                "--epochs", self.epochs_for(steps, windows_per_step), "--window", 6,
                "--windows-per-step", windows_per_step, "--amp", amp, "--workers", workers,
                "--device", device or self.sizes.device, "--log-every", log_every or self.sizes.log_every,
                "--checkpoint-every", checkpoint_every, "--seed", 0]
        if threads:
            args += ["--threads", threads]
        if memmap:
            args += ["--memmap-dir", self.memmap_dir]
        return [str(a) for a in [*args, *extra]]

    def infer_args(self, checkpoint: Path, out: Path, *, device: str, amp: str = "auto", window: int = 24,
                   windows_per_batch: int = 32, store: Path | None = None, threads: int | None = None,
                   workers: int = 1) -> list[str]:
        return [str(a) for a in ["--store", store or self.val_store, "--checkpoint", checkpoint, "--out", out,
                                 "--device", device, "--amp", amp, "--window", window,
                                 "--windows-per-batch", windows_per_batch, "--workers", workers,
                                 "--threads", threads or self.sizes.threads]]

    def stats_env(self, name: str, compiled: bool = False) -> tuple[dict[str, str], Path]:
        """The wrapper's environment for a run whose exit statistics are read by :meth:`read_stats`."""
        stats = self.runner.logs / f"{name}.stats"
        env = {"GPU_CHECK_STATS_FILE": str(stats)}
        if compiled and self.sizes.compile_backend:
            env["GPU_CHECK_COMPILE_BACKEND"] = self.sizes.compile_backend
        return env, stats

    @staticmethod
    def read_stats(stats: Path) -> dict:
        """Rank 0's exit statistics, with the largest peak GPU memory of all ranks."""
        ranks = {p.name: json.loads(p.read_text()) for p in stats.parent.glob(stats.name + ".rank*")}
        if not ranks:
            raise RuntimeError(f"the run left no {stats.name}.rank* (did it exit through Python?)")
        result = ranks.get(f"{stats.name}.rank0", next(iter(ranks.values())))
        peaks = [r["max_allocated"] for r in ranks.values() if "max_allocated" in r]
        return {**result, "max_allocated": max(peaks) if peaks else None}

    def check_memmap(self, out: Path) -> dict:
        """The run at ``out`` read the node-shared decompressed store: its config.json names
        ``--memmap-dir`` and the train store's arrays are there as .npy files."""
        configured = json.loads((out / "config.json").read_text())["data"]["memmap_dir"]
        arrays = sorted(p.name for p in self.memmap_dir.glob(f"{self.train_store.name}-*/*.npy"))
        if configured != str(self.memmap_dir) or not arrays:
            raise RuntimeError(f"{out.name} did not read the decompressed store: config memmap_dir {configured!r}, "
                               f".npy files in {self.memmap_dir}: {arrays}")
        return {"dir": configured, "arrays": arrays, "mb": round(_du(self.memmap_dir) / 1e6, 1)}

    # -- sections -------------------------------------------------------------------------

    def run(self) -> None:
        with self.report.section("environment") as entry:
            self.environment(entry)
        if self.fatal:
            for name in SECTIONS[1:]:
                self.report.data["sections"][name] = {"status": "skipped", "reason": self.fatal}
            self.report.data["checks"].update({name: False for name in CHECKS})
            return
        for name in ("data", "throughput_recipe_eager", "throughput_windows32", "throughput_inference",
                     "profiler", "throughput_recipe_compiled"):
            with self.report.section(name) as entry:
                getattr(self, name)(entry)
        self.training_checks()
        self.inference_checks()

    def environment(self, entry: dict) -> None:
        info = self.runner.worker("environment", "environment", {}, cap=120)
        entry.update(info)
        cuda = info.get("cuda_available")
        entry["summary"] = (f"{info.get('device_name', 'no CUDA device')}, torch {info.get('torch')}, "
                            f"CUDA {info.get('cuda')}, NCCL {info.get('nccl')}, bf16 {info.get('bf16_supported')}")
        missing = [name for name in ("zarr", "numcodecs", "webdataset") if info["packages"].get(name) is None]
        if self.sizes.mode == "cuda" and not cuda:
            self.fatal = "CUDA is not available here: run with --cpu-smoke on a machine without a GPU"
        elif missing:
            self.fatal = f"not installed: {', '.join(missing)} (carry their wheels: README, GPU check)"
        if self.fatal:
            raise RuntimeError(self.fatal)
        help_proc = self.runner.run("train_help", [PYTHON, "-m", "stage_dist.train", "--help"], cap=60).check()
        self.train_help = help_proc.output
        entry["train_flags"] = {"--deterministic": self.has_train_flag("--deterministic")}

    def data(self, entry: dict) -> None:
        root = self.workdir / "data"
        marker = root / "done.json"
        made = json.loads(marker.read_text()) if marker.exists() else {}
        if self.reuse_data and made.get("synth") == list(self.sizes.synth):
            counts = made["counts"]
            entry["reused"] = True
        else:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            synth = root / "synth"
            proc = self.runner.run("synth", [PYTHON, "-m", "stage_dist.synth", "--out", synth, *self.sizes.synth],
                                   cap=240).check()
            entry["synth_seconds"] = round(proc.seconds, 1)
            counts = json.loads((synth / "synth.json").read_text())["counts"]
            workers = str(os.cpu_count() or 1)
            train_paths, val_paths = synth / "train", synth / "val"
            jobs = {
                "train": lambda: self.runner.run("convert_train", [
                    PYTHON, "tools/convert_features.py", "--actors-dir", train_paths / "i3d" / "actors",
                    "--objects-file", train_paths / "i3d" / "objects.h5", "--out", self.train_store,
                    "--workers", workers, "--no-progress"], cap=180).check(),
                "val": lambda: self.runner.run("convert_val", [
                    PYTHON, "tools/convert_features.py", "--slowfast-file", val_paths / "slowfast" / "features.h5",
                    "--video-list", val_paths / "slowfast" / "videos.txt",
                    "--objects-file", val_paths / "i3d" / "objects.h5", "--out", self.val_store,
                    "--workers", workers, "--no-progress"], cap=180).check(),
            }
            results = run_parallel(jobs, 2)
            entry["convert_seconds"] = {k: round(_value(v).seconds, 1) for k, (v, _) in results.items()}
            marker.write_text(json.dumps({"synth": list(self.sizes.synth), "counts": counts}))
        entry["counts"] = counts
        train = counts["train"]
        self.train_keyframes = train["keyframes"]
        entry["actors_per_keyframe"] = round(train["actors"] / train["keyframes"], 2)
        entry["objects_per_keyframe"] = round(train["objects"] / train["keyframes"], 2)
        entry["store_mb"] = {name: round(_du(path) / 1e6, 1) for name, path in
                             (("train", self.train_store), ("val", self.val_store))}
        entry["passed"] = all((path / "zarr.json").exists() for path in (self.train_store, self.val_store)) \
            and train["keyframes"] > 0
        entry["summary"] = (f"train {train['keyframes']} keyframes ({entry['actors_per_keyframe']} actors, "
                            f"{entry['objects_per_keyframe']} objects per keyframe), val {counts['val']['keyframes']}")

    def _throughput(self, entry: dict, name: str, *, steps: int, windows_per_step: int, workers: int,
                    compiled: bool = False, cap: float = 240) -> Path:
        out = self.workdir / name
        shutil.rmtree(out, ignore_errors=True)
        env, stats_file = self.stats_env(name, compiled)
        log_every = self.sizes.log_every if windows_per_step == 1 else max(2, self.sizes.log_every // 5)
        args = self.train_args(out, steps=steps, amp=self.sizes.train_amp, windows_per_step=windows_per_step,
                               workers=workers, log_every=log_every, memmap=True,
                               extra=["--compile"] if compiled else [])
        proc = self.runner.module(name, "stage_dist.train", args, cap=cap, env=env).check()
        stats = self.read_stats(stats_file)
        scalars = read_scalars(out / "tensorboard")
        rates = scalars.get("train/keyframes_per_s", [])
        waits = [v for _, v, _ in scalars.get("train/data_wait_fraction", [])]
        entry.update(
            steps=steps, windows_per_step=windows_per_step, workers=workers, log_every=log_every,
            keyframes_per_s=steady([v for _, v, _ in rates]), data_wait_fraction=steady(waits),
            keyframes_per_s_logged=[v for _, v, _ in rates],
            seconds_to_first_log=round(rates[0][2] - stats["started"], 1) if rates else None,
            peak_gpu_memory_mb=_mb(stats["max_allocated"]), process_seconds=round(proc.seconds, 1),
            memmap=self.check_memmap(out),
        )
        if compiled:
            compile_stats = stats.get("compile") or {}
            entry.update(compile_backend=self.sizes.compile_backend or "the trainer's (compile_model)",
                         compile_seconds=compile_stats.get("seconds"), graphs_compiled=compile_stats.get("graphs"),
                         compile_phases=compile_stats.get("phases"))
            if not compile_stats.get("graphs"):
                raise RuntimeError(f"{name}: --compile compiled no graph ({stats.get('error', 'no dynamo counters')})")
        entry["summary"] = (f"{_fmt(entry['keyframes_per_s'])} keyframes/s, data wait "
                            f"{_pct(entry['data_wait_fraction'])}, peak GPU {_fmt(entry['peak_gpu_memory_mb'])} MB, "
                            f"first log after {_fmt(entry['seconds_to_first_log'])} s")
        return out

    def throughput_recipe_eager(self, entry: dict) -> None:
        out = self._throughput(entry, "throughput_recipe_eager", steps=self.sizes.recipe_steps, windows_per_step=1,
                               workers=self.sizes.recipe_workers)
        self.gpu_checkpoint = newest_checkpoint(out / "checkpoints")

    def throughput_windows32(self, entry: dict) -> None:
        self._throughput(entry, "throughput_windows32", steps=self.sizes.windows32_steps,
                         windows_per_step=self.sizes.windows32, workers=self.sizes.windows32_workers)

    def throughput_recipe_compiled(self, entry: dict) -> None:
        reserve = self.sizes.checks_reserve_s  # leave the correctness phases their time
        cap = self.budget.left() - reserve
        if cap < 30:
            raise Skip(f"time budget: {self.budget.left():.0f} s left, {reserve:.0f} s kept for the checks")
        self._throughput(entry, "throughput_recipe_compiled", steps=self.sizes.compiled_steps, windows_per_step=1,
                         workers=self.sizes.recipe_workers, compiled=True, cap=min(cap, 300))
        eager = self.report.data["sections"].get("throughput_recipe_eager", {})
        if eager.get("keyframes_per_s") and entry.get("keyframes_per_s"):
            entry["speedup_vs_eager"] = round(entry["keyframes_per_s"] / eager["keyframes_per_s"], 2)
        entry["eager_seconds_to_first_log"] = eager.get("seconds_to_first_log")
        entry["summary"] = (f"{_fmt(entry['keyframes_per_s'])} keyframes/s steady "
                            f"(x{_fmt(entry.get('speedup_vs_eager'))} eager), compiling "
                            f"{_fmt(entry['compile_seconds'])} s for {entry['graphs_compiled']} graphs, first log "
                            f"after {_fmt(entry['seconds_to_first_log'])} s (eager "
                            f"{_fmt(entry['eager_seconds_to_first_log'])} s), data wait "
                            f"{_pct(entry['data_wait_fraction'])}, peak GPU {_fmt(entry['peak_gpu_memory_mb'])} MB")
        if self.budget.left() > reserve + 45:  # launches and syncs per compiled step
            try:
                entry["profile"] = self._profile("profiler_compiled", compiled=True, cap=self.budget.left() - reserve)
            except Exception as error:  # noqa: BLE001 - the throughput above stands
                entry["profile"] = {"error": f"{type(error).__name__}: {error}"[-2000:]}
        else:
            entry["profile"] = {"skipped": f"time budget: {self.budget.left():.0f} s left"}

    def throughput_inference(self, entry: dict) -> None:
        spec = {"store": str(self.train_store), "checkpoint": str(self.gpu_checkpoint or ""),
                "device": self.sizes.device, "amp": self.sizes.train_amp, "window": 24, "windows_per_batch": 32,
                "workers": self.sizes.infer_workers, "passes": self.sizes.infer_passes,
                "memmap_dir": str(self.memmap_dir)}
        try:
            steady_result = self.runner.worker("throughput_inference", "inference", spec, cap=180)
            entry.update(steady_result)
        except Exception as error:  # noqa: BLE001 - the CLI figure below still stands
            entry["library_error"] = f"{type(error).__name__}: {error}"[-2000:]
        if self.gpu_checkpoint is not None:
            out = self.workdir / "throughput_inference_cli.csv"
            threads = 4 if self.sizes.device == "cuda" else 1
            proc = self.runner.module("throughput_inference_cli", "stage_dist.infer", self.infer_args(
                self.gpu_checkpoint, out, device=self.sizes.device, store=self.train_store, threads=threads,
                workers=self.sizes.infer_workers), cap=180).check()
            found = re.search(r"\(([\d.]+) keyframes/s", proc.output)
            entry["cli_keyframes_per_s_with_startup"] = float(found[1]) if found else None
            entry["cli_process_seconds"] = round(proc.seconds, 1)
        if entry.get("keyframes_per_s") is None:
            if "library_error" in entry:
                raise RuntimeError(entry["library_error"])
            raise RuntimeError("no inference throughput measured")
        entry["summary"] = (f"{_fmt(entry['keyframes_per_s'])} keyframes/s steady (CLI with start-up "
                            f"{_fmt(entry.get('cli_keyframes_per_s_with_startup'))}), data wait "
                            f"{_pct(entry.get('data_wait_fraction'))}, "
                            f"peak GPU {_fmt(entry.get('peak_gpu_memory_mb'))} MB")

    def _profile(self, name: str, *, compiled: bool = False, cap: float = 180) -> dict:
        wait, warmup, active = self.sizes.profile_steps
        steps = wait + warmup + active + 2
        out = self.workdir / name
        shutil.rmtree(out, ignore_errors=True)
        args = self.train_args(out, steps=steps, amp=self.sizes.train_amp, workers=self.sizes.recipe_workers,
                               log_every=10**6, memmap=True, extra=["--compile"] if compiled else [])
        return self.runner.worker(name, "profile", {
            "argv": args, "device": self.sizes.device, "wait": wait, "warmup": warmup, "active": active,
            "compile_backend": self.sizes.compile_backend if compiled else ""}, cap=cap)

    def profiler(self, entry: dict) -> None:
        entry.update(self._profile("profiler"))
        entry["passed"] = (entry["profiled_steps"] == self.sizes.profile_steps[2] and entry["graph_built_in_collate"]
                           and entry["labels_uint8_on_host"] and entry["stage_dist_reads_in_train_step_per_step"] == 0)
        entry["summary"] = (f"{_fmt(entry.get('kernel_launches_per_step'))} kernel launches, "
                            f"{_fmt(entry.get('host_syncs_per_step'))} host syncs, "
                            f"{_fmt(entry['stage_dist_reads_in_train_step_per_step'])} host reads by stage_dist in "
                            f"train_step ({_fmt(entry['host_reads_per_step'])} in all) per step; graph built in "
                            f"collate: {entry['graph_built_in_collate']}")

    # -- correctness: training ------------------------------------------------------------

    def training_checks(self) -> None:
        s = self.sizes
        cpu_out = self.workdir / "train_cpu"
        variants: dict[str, tuple[int, tuple[str, ...]]] = {f"workers{w}": (w, ()) for w in RESUME_WORKERS}
        required = list(variants)
        if s.mode == "cuda" and self.has_train_flag("--deterministic"):
            # CUDA's default kernels need not repeat bit for bit; --deterministic is what must.
            variants["workers2_deterministic"] = (2, ("--deterministic",))
            required = ["workers2_deterministic"]
        jobs: dict[str, Callable[[], Any]] = {
            **{f"resume_{name}": functools.partial(self._train_resume, name, w, x)
               for name, (w, x) in variants.items()},
            "train_fp16": lambda: self._short_run("train_fp16", "fp16", ["--grad-clip", "1.0"]),
            "train_amp_off": lambda: self._short_run("train_amp_off", "off", []),
            "cpu_checkpoint": lambda: self._short_run("train_cpu", "off", [], device=s.other_device, out=cpu_out),
        }
        try:
            self.budget.timeout(60)
            results = run_parallel(jobs, s.parallel)
        except Skip as skip:
            results = {name: (skip, 0.0) for name in jobs}
        with self.report.section("train_resume") as entry:
            entry["variants"] = {}
            for name in variants:
                value, seconds = results[f"resume_{name}"]
                try:
                    entry["variants"][name] = {**_value(value), "seconds": round(seconds, 1)}
                except Exception as error:  # noqa: BLE001 - one variant's failure is that variant's result
                    entry["variants"][name] = {"passed": False, "error": f"{type(error).__name__}: {error}"[-3000:]}
            entry["required"] = required
            entry["passed"] = all(entry["variants"][name]["passed"] for name in required)
            entry["summary"] = "; ".join(
                f"{k}{'' if k in required else ' (reported, not required)'}: "
                f"{v.get('summary') or v.get('error', '').splitlines()[0]}" for k, v in entry["variants"].items())
            entry["_seconds"] = max(results[f"resume_{name}"][1] for name in variants)
        for name in ("train_fp16", "train_amp_off"):
            with self.report.section(name) as entry:
                value, seconds = results[name]
                entry.update(_value(value), _seconds=seconds)
        value, _ = results["cpu_checkpoint"]
        if isinstance(value, BaseException):
            self.cpu_checkpoint_error = f"{type(value).__name__}: {value}"
        else:
            self.cpu_checkpoint = newest_checkpoint(cpu_out / "checkpoints")

    def _train_resume(self, variant: str, workers: int, extra: Sequence[str]) -> dict:
        """Uninterrupted run A; run B killed mid-run, then restarted; A's and B's final checkpoints."""
        s = self.sizes
        a, b = self.workdir / f"resume_{variant}_a", self.workdir / f"resume_{variant}_b"
        for out in (a, b):
            shutil.rmtree(out, ignore_errors=True)

        def run(name: str, out: Path, env: dict | None = None) -> Proc:
            args = self.train_args(out, steps=s.resume_steps, amp=s.train_amp, workers=workers,
                                   checkpoint_every=s.resume_every, threads=s.threads, extra=extra)
            return self.runner.module(f"resume_{variant}_{name}", "stage_dist.train", args, cap=240, env=env)

        uninterrupted = run("uninterrupted", a).check()
        killed = run("killed", b, {"GPU_CHECK_KILL_AT_CHECKPOINT": "2"})
        kill_landed = killed.returncode == -signal.SIGKILL
        if not kill_landed:
            killed.check()  # a failure other than the kill: report it
        restarted = run("restarted", b).check()
        import torch

        path_a, path_b = newest_checkpoint(a / "checkpoints"), newest_checkpoint(b / "checkpoints")
        state_a = torch.load(path_a, map_location="cpu", weights_only=True)
        state_b = torch.load(path_b, map_location="cpu", weights_only=True)
        for state in (state_a, state_b):  # the runs differ in their output directory only
            state["train_config"].pop("output_dir")
        by_key = {key: compare_states(state_a.get(key), state_b.get(key), key)
                  for key in sorted(set(state_a) | set(state_b))}
        model, optimizer = by_key["model_state"], by_key["optimizer_state"]
        bitwise = model["equal"] and optimizer["equal"]
        result = {
            "steps": s.resume_steps, "checkpoint_every": s.resume_every, "amp": s.train_amp, "workers": workers,
            "flags": list(extra),
            "kill_landed": kill_landed, "killed_returncode": killed.returncode,
            "resumed_logged": "resumed from" in restarted.output,
            "final_checkpoints": [path_a.name, path_b.name],
            "model_optimizer_bitwise": bitwise,
            "max_abs_diff": max(model["max_abs_diff"], optimizer["max_abs_diff"]),
            "differing_keys": sorted(k for k, v in by_key.items() if not v["equal"]),
            "rng_equal": by_key["rng_per_rank"]["equal"],
            "details": {k: v for k, v in by_key.items() if not v["equal"]},
            "seconds_per_run": [round(p.seconds, 1) for p in (uninterrupted, killed, restarted)],
        }
        # Everything the checkpoint holds (model, optimizer, schedule, scaler, position, every RNG) equal.
        result["passed"] = (kill_landed and result["resumed_logged"] and path_a.name == path_b.name
                            and not result["differing_keys"])
        result["summary"] = (f"kill {'landed' if kill_landed else 'did NOT land'}, model+optimizer "
                             + ("bitwise equal" if bitwise else f"differ (max |diff| {result['max_abs_diff']:.3g})")
                             + f", RNG states {'equal' if result['rng_equal'] else 'differ'}"
                             + (f", also differ: {', '.join(result['differing_keys'])}"
                                if set(result["differing_keys"]) - {"model_state", "optimizer_state", "rng_per_rank"}
                                else ""))
        return result

    def _short_run(self, name: str, amp: str, extra: list[str], device: str | None = None,
                   out: Path | None = None) -> dict:
        import torch

        out = out or self.workdir / name
        shutil.rmtree(out, ignore_errors=True)
        steps = self.sizes.short_steps
        proc = self.runner.module(name, "stage_dist.train", self.train_args(
            out, steps=steps, amp=amp, workers=1, device=device, log_every=5, threads=self.sizes.threads,
            extra=extra), cap=240).check()
        losses = [v for _, v, _ in read_scalars(out / "tensorboard").get("train/loss", [])]
        state = torch.load(newest_checkpoint(out / "checkpoints"), map_location="cpu", weights_only=True)
        weights = state["model_state"]
        finite_weights = all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())
        scaler = state["scaler_state"]
        result = {"amp": amp, "device": device or self.sizes.device, "flags": extra, "steps": steps,
                  "global_step": state["global_step"], "losses": losses,
                  "finite_loss": bool(losses) and all(math.isfinite(v) for v in losses),
                  "finite_weights": finite_weights, "scaler_scale": scaler.get("scale"),
                  "process_seconds": round(proc.seconds, 1)}
        result["passed"] = result["finite_loss"] and finite_weights and state["global_step"] == steps
        result["summary"] = (f"{steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no loss logged")
        return result

    # -- correctness: inference -----------------------------------------------------------

    def inference_checks(self) -> None:
        s = self.sizes
        runs: dict[str, tuple[Path, Callable[[], Proc]]] = {}

        def add(name: str, checkpoint: Path | None, nproc: int = 0, **kwargs) -> None:
            if checkpoint is None:
                return
            out = self.workdir / "infer" / f"{name}.csv"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.unlink(missing_ok=True)
            # On the CPU the ranks use gloo anyway: the smoke run exercises the emulation hook too.
            env = {"GPU_CHECK_EMULATE_RANKS": "1"} if nproc > 1 else {}
            runs[name] = (out, lambda: self.runner.module(
                name, "stage_dist.infer", self.infer_args(checkpoint, out, **kwargs), cap=240, env=env,
                nproc=nproc).check())

        gpu, cpu = self.gpu_checkpoint, self.cpu_checkpoint
        # Cross-device, float32 on both sides. In --cpu-smoke both sides are the CPU (2 threads vs 1).
        same_device = s.device == s.other_device
        for tag, checkpoint in (("gpu_ckpt", gpu), ("cpu_ckpt", cpu)):
            add(f"{tag}_on_device", checkpoint, device=s.device, amp="off", threads=2 if same_device else s.threads)
            add(f"{tag}_on_cpu", checkpoint, device=s.other_device, amp="off", threads=1 if same_device else 4)
        # Consistency across window settings and (emulated) ranks, default precision.
        add("r1_w24_b32", gpu, device=s.device, window=24, windows_per_batch=32, threads=1)
        add("r1_w6_b4", gpu, device=s.device, window=6, windows_per_batch=4, threads=1)
        add("r2_w24_b32", gpu, nproc=2, device=s.device, window=24, windows_per_batch=32, threads=1)
        add("r3_w24_b32", gpu, nproc=3, device=s.device, window=24, windows_per_batch=32, threads=1)
        try:
            self.budget.timeout(60)
            results = run_parallel({name: job for name, (_, job) in runs.items()}, s.parallel)
        except Skip as skip:
            results = {name: (skip, 0.0) for name in runs}

        def csv(name: str) -> Path:
            if name not in results:
                missing = "the CPU checkpoint: " + self.cpu_checkpoint_error if name.startswith("cpu") else \
                    "the GPU checkpoint (see throughput_recipe_eager)"
                raise RuntimeError(f"{name}: not run: no {missing}")
            _value(results[name][0])
            return runs[name][0]

        with self.report.section("cross_device") as entry:
            entry["devices"] = [s.device, s.other_device]
            if s.device == s.other_device:
                entry["note"] = "no CUDA: both sides on the CPU (2 threads vs 1)"
            passed = True
            for tag in ("gpu_ckpt", "cpu_ckpt"):
                comparison = compare_results_csv(csv(f"{tag}_on_device"), csv(f"{tag}_on_cpu"))
                comparison["within_tolerance"] = comparison["same_rows"] and \
                    comparison["max_abs_score_diff"] <= CSV_TOLERANCE
                entry[tag] = comparison
                passed = passed and comparison["within_tolerance"]
            entry["tolerance"] = CSV_TOLERANCE
            with contextlib.suppress(Exception):  # how far the default precision moves the scores
                entry["default_amp_vs_fp32_on_device"] = compare_results_csv(
                    csv("gpu_ckpt_on_device"), csv("r1_w24_b32"))["max_abs_score_diff"]
            entry["passed"] = passed
            entry["_seconds"] = max((results[n][1] for n in results if "ckpt_on" in n), default=0.0)
            entry["summary"] = "; ".join(
                f"{tag}: " + ("sha256 equal" if entry[tag]["identical"] else
                              f"max |score diff| {entry[tag]['max_abs_score_diff']:.2g}")
                for tag in ("gpu_ckpt", "cpu_ckpt"))

        with self.report.section("inference_consistency") as entry:
            names = ("r1_w24_b32", "r1_w6_b4", "r2_w24_b32", "r3_w24_b32")
            shas: dict[str, str | None] = {}
            errors: dict[str, str] = {}
            for name in names:
                try:
                    shas[name] = sha256(csv(name))
                except Exception as error:  # noqa: BLE001 - recorded per setting
                    shas[name], errors[name] = None, f"{type(error).__name__}: {error}"[-1500:]
            entry["sha256"] = shas
            if errors:
                entry["errors"] = errors
            entry["ranks"] = ("emulated on one GPU: every rank on cuda:0 with a gloo process group"
                              if s.device == "cuda" else "torchrun gloo ranks on the CPU")
            groups: dict[str, list[str]] = {}
            for name, digest in shas.items():
                if digest:
                    groups.setdefault(digest, []).append(name)
            entry["groups"] = list(groups.values())
            reference = csv("r1_w24_b32") if shas.get("r1_w24_b32") else None
            entry["max_abs_score_diff_vs_r1_w24_b32"] = {
                name: compare_results_csv(reference, runs[name][0])["max_abs_score_diff"]
                for name in names if reference is not None and shas.get(name) and name != "r1_w24_b32"}
            entry["passed"] = not errors and len(groups) == 1
            entry["_seconds"] = max((results[n][1] for n in names if n in results), default=0.0)
            entry["summary"] = ("all 4 results.csv byte-identical" if entry["passed"] else
                                f"{len(groups)} distinct results.csv, {len(errors)} failed runs")


# ----------------------------------------------------------------------------- library workers


def worker_environment(spec: dict) -> dict:
    import importlib.metadata

    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(device_name=properties.name, device_count=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(properties.total_memory / 2**30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported())
        with contextlib.suppress(Exception):
            version = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        with contextlib.suppress(Exception):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
    packages: dict[str, str | None] = {}
    for name in ("numpy", "zarr", "numcodecs", "webdataset", "h5py", "tensorboard", "tqdm", "triton"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    info["packages"] = packages
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    return info


def _force_compile_backend(backend: str) -> None:
    """What the wrapper's GPU_CHECK_COMPILE_BACKEND does, for a worker that builds the Trainer itself."""
    import torch

    compile_ = torch.compile

    def compile_with_backend(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(backend=backend, mode=None)
        return compile_(*args, **kwargs)

    torch.compile = compile_with_backend


def describe_loader_batch(batch: Any) -> dict:
    """What the training loop hands ``Trainer.train_step``: a Batch whose Graph was built in
    collate (on the host, one node per feature row) and uint8 labels on the host."""
    from stage_dist.data.batch import Batch
    from stage_dist.data.graph import Graph

    graph: Any = getattr(batch, "graph", None)
    is_graph = isinstance(graph, Graph)
    graph_devices = sorted({getattr(graph, f.name).device.type for f in fields(graph)}) if is_graph else []
    rows = batch.actor_features.shape[0] + batch.object_features.shape[0] if isinstance(batch, Batch) else None
    info = {"batch_type": f"{type(batch).__module__}.{type(batch).__qualname__}",
            "graph_type": f"{type(graph).__module__}.{type(graph).__qualname__}",
            "graph_devices": graph_devices, "graph_nodes": graph.num_nodes if is_graph else None, "feature_rows": rows,
            "labels": f"{batch.labels.dtype} on {batch.labels.device.type}" if isinstance(batch, Batch) else None}
    info["graph_built_in_collate"] = (isinstance(batch, Batch) and is_graph and graph_devices == ["cpu"]
                                      and graph.num_nodes == rows)
    info["labels_uint8_on_host"] = isinstance(batch, Batch) and info["labels"] == "torch.uint8 on cpu"
    return info


def classify_host_reads(stacks: Sequence[Sequence[str]], steps: int) -> dict:
    """Host reads of tensor values (one Python stack per ``aten::_local_scalar_dense``), per step:
    all of them, by source (innermost frame <- innermost stage_dist frame), and those inside
    ``Trainer.train_step`` that are not torch's fused optimizer kernels (on the CPU those read
    their step counters, host tensors there, on the host; on the GPU they stay on the device)."""
    sources: dict[str, int] = {}
    in_step = 0
    for stack in stacks:
        frames = [f for f in stack if not f.startswith("<built-in")]
        ours = [f for f in frames if "stage_dist" in f]
        key = " <- ".join(dict.fromkeys(frames[:1] + ours[:1])) or "(no stack)"
        sources[key] = sources.get(key, 0) + 1
        inside = any("stage_dist/train.py" in f and f.endswith(": train_step") for f in frames)
        if inside and not (frames and "torch/optim/" in frames[0]):
            in_step += 1
    return {"host_reads_per_step": len(stacks) / steps,
            "stage_dist_reads_in_train_step_per_step": in_step / steps,
            "host_read_sources_per_step": {k: n / steps for k, n in sorted(sources.items(), key=lambda kv: -kv[1])}}


def worker_profile(spec: dict) -> dict:
    """Kernel launches, host syncs and host reads per step of the real training loop
    (``Trainer.fit``; ``train_step`` wrapped so that each step is marked for ``torch.profiler``'s
    schedule), and what the loader handed the step; no step of the profiled window is a log step."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from stage_dist.core.config import parse_config
    from stage_dist.engine.distributed import init_distributed
    from stage_dist.engine.train_config import TrainConfig
    from stage_dist.engine.trainer import Trainer
    from stage_dist.train import build_parser

    if spec["compile_backend"]:
        _force_compile_backend(spec["compile_backend"])
    config = parse_config(TrainConfig, spec["argv"], build_parser())
    env = init_distributed(config.runtime.device, config.runtime.dist_timeout)
    trainer = Trainer(config, env)
    cuda = env.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    wait, warmup, active = spec["wait"], spec["warmup"], spec["active"]
    steps_done = [0]
    loader_batch: dict = {}
    options: dict[str, Any] = {"with_stack": True}
    with contextlib.suppress(AttributeError):  # Python stacks on the events need the verbose config
        options["experimental_config"] = torch._C._profiler._ExperimentalConfig(verbose=True)
    with profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                 **options) as prof:
        step = trainer.train_step

        def marked_step(batch: Any) -> torch.Tensor:
            if not loader_batch:
                loader_batch.update(describe_loader_batch(batch))
            result = step(batch)
            steps_done[0] += 1
            prof.step()
            return result

        trainer.train_step = marked_step  # type: ignore[method-assign]  # the profiler marks every step
        trainer.fit()
    if steps_done[0] < wait + warmup + active:
        raise RuntimeError(f"only {steps_done[0]} steps ran; the profiler needs {wait + warmup + active}")
    counts: dict[str, int] = {}
    for event in prof.key_averages():
        counts[event.key] = counts.get(event.key, 0) + event.count

    def per_step(names: Sequence[str] = (), prefix: str | None = None) -> float:
        total = sum(n for key, n in counts.items() if key in names or (prefix and key.startswith(prefix)))
        return total / active

    launches = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
    syncs = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
    result = {
        "device": str(env.device), "profiled_steps": active, "schedule": [wait, warmup, active],
        "log_every": config.run.log_every, "compiled": config.runtime.compile,
        "compile_backend": spec["compile_backend"] or None, **loader_batch,
        "nonzero_calls_per_step": per_step(("aten::nonzero",)),
    }
    if cuda:
        result.update(
            kernel_launches_per_step=per_step(launches), graph_launches_per_step=per_step(("cudaGraphLaunch",)),
            host_syncs_per_step=per_step(syncs), d2h_copies_per_step=per_step(prefix="Memcpy DtoH"),
            sync_calls={k: v for k, v in counts.items() if k in syncs},
            peak_gpu_memory_mb=_mb(torch.cuda.max_memory_allocated()),
        )
    else:
        result["note"] = ("CPU: no CUDA events, so no launch or sync counts; host reads of tensor values are "
                          "counted (on the GPU, a read of a device tensor is a sync)")
    result.update(classify_host_reads(
        [event.stack or [] for event in prof.events() if event.name == "aten::_local_scalar_dense"], active))
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:25]
    result["top_events_per_step"] = {key: n / active for key, n in top}
    return result


def worker_inference(spec: dict) -> dict:
    """Steady-state ``predict`` keyframes/s: a warm-up pass, then timed passes over the store."""
    import torch
    import torch.utils.data.dataloader as dataloader

    from stage_dist.data.splits import open_window_source
    from stage_dist.engine.checkpoint import load_model
    from stage_dist.engine.distributed import init_distributed
    from stage_dist.engine.inference import predict
    from stage_dist.engine.precision import resolve_precision
    from stage_dist.model.stage import ModelConfig, build_model

    env = init_distributed(spec["device"])
    source = open_window_source(store=spec["store"], memmap_dir=spec["memmap_dir"])
    if spec["checkpoint"]:
        model, origin = load_model(spec["checkpoint"], source.actor_dim, source.object_dim, env.device), \
            spec["checkpoint"]
    else:  # the eager training run failed (its own error is in its section); the speed does not need its weights
        model = build_model("stage", ModelConfig(actor_dim=source.actor_dim, object_dim=source.object_dim))
        model, origin = model.to(env.device), "random weights (no checkpoint: see throughput_recipe_eager)"
    precision = resolve_precision(spec["amp"], env.device)
    waited = [0.0]
    next_batch = dataloader._BaseDataLoaderIter.__next__

    def timed_next(self: Any) -> Any:  # time the loop spends waiting for the loader
        started = time.perf_counter()
        try:
            return next_batch(self)
        finally:
            waited[0] += time.perf_counter() - started

    dataloader._BaseDataLoaderIter.__next__ = timed_next  # type: ignore[method-assign]  # times every fetch
    passes = []
    for index in range(spec["passes"] + 1):
        waited[0] = 0.0
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = predict(model, source, env, window=spec["window"], windows_per_batch=spec["windows_per_batch"],
                         precision=precision, num_workers=spec["workers"], progress=False)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if index:  # pass 0 is the warm-up
            passes.append({"seconds": seconds, "data_wait": waited[0]})
    seconds = sum(p["seconds"] for p in passes)
    assert result is not None  # one process: it is rank 0, which gets the predictions
    return {
        "keyframes": source.num_keyframes, "actors_predicted": len(result.predictions.actor_index),
        "model": origin, "amp": precision.mode, "window": spec["window"],
        "windows_per_batch": spec["windows_per_batch"], "workers": spec["workers"], "passes": len(passes),
        "keyframes_per_s": source.num_keyframes * len(passes) / seconds,
        "keyframes_per_s_per_pass": [source.num_keyframes / p["seconds"] for p in passes],
        "data_wait_fraction": sum(p["data_wait"] for p in passes) / seconds,
        "peak_gpu_memory_mb": _mb(torch.cuda.max_memory_allocated()) if env.device.type == "cuda" else None,
    }


WORKERS = {"environment": worker_environment, "profile": worker_profile, "inference": worker_inference}


# ----------------------------------------------------------------------------- output


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return "n/a" if value is None else str(value)


def _pct(value: Any) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{100 * value:.1f} %"


def print_table(data: dict) -> None:
    sections = data["sections"]
    print("\n== gpu_check: sections")
    print(f"{'section':30s} {'status':8s} {'seconds':>8s}  summary")
    for name in SECTIONS:
        entry = sections.get(name, {"status": "not run"})
        passed = entry.get("passed")
        status = entry["status"] if passed is None or entry["status"] != "ok" else ("PASS" if passed else "FAIL")
        detail = entry.get("summary") or entry.get("reason") or entry.get("error", "")
        print(f"{name:30s} {status:8s} {entry.get('seconds', ''):>8}  {detail.splitlines()[0] if detail else ''}")
    print("\n== gpu_check: targets (one H200, bf16)")
    print(f"{'target':36s} {'value':>12s} {'goal':>10s}  result")
    for row in data["targets"]:
        print(f"{row['target']:36s} {_fmt(row['value']):>12s} {row['goal']:>10s}  {row['result']}")
    failed = [name for name, ok in data["checks"].items() if not ok]
    print(f"\ncorrectness checks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}"
          f"; total {data['meta'].get('seconds')} s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the report here (rewritten after every section)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, < 3 min: keeps this "
                        "script from rotting between GPU loans")
    parser.add_argument("--out", type=Path, help="work directory (data, runs, logs); default: a new temporary one")
    parser.add_argument("--budget", type=float, help="total seconds (default 450 on the GPU, 170 in --cpu-smoke)")
    parser.add_argument("--logs", type=Path, help="also write every child process's log into this .tar.gz")
    parser.add_argument("--reuse-data", action="store_true", help="keep the converted stores of an earlier run "
                        "in --out if they were made with the same sizes")
    parser.add_argument("--_worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--_spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        result = WORKERS[args._worker](json.loads(args._spec.read_text()))
        args._result.write_text(json.dumps(result, indent=2, default=str))
        return 0
    sizes = SMOKE_SIZES if args.cpu_smoke else CUDA_SIZES
    if args.budget:
        sizes = Sizes(**{**asdict(sizes), "budget_s": args.budget})
    workdir = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report = Report(args.json, {"mode": sizes.mode, "argv": sys.argv, "workdir": str(workdir),
                                "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "sizes": asdict(sizes), "finished": False})
    print(f"gpu_check ({sizes.mode}): work directory {workdir}, budget {sizes.budget_s:.0f} s", flush=True)
    check = GpuCheck(sizes, workdir, report, args.reuse_data)
    try:
        check.run()
    finally:
        shutil.rmtree(check.memmap_dir, ignore_errors=True)  # the decompressed store
        report.data["targets"] = evaluate_targets(report.data["sections"], smoke=args.cpu_smoke)
        report.data["meta"].update(finished=True, seconds=round(time.monotonic() - started, 1))
        report.write()
        if args.logs:
            with tarfile.open(args.logs, "w:gz") as archive:
                archive.add(check.runner.logs, arcname="gpu_check_logs")
    print_table(report.data)
    return 0 if all(report.data["checks"].get(name) for name in CHECKS) else 1


if __name__ == "__main__":
    sys.exit(main())
