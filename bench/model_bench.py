"""Training-step cost of the STAGE model vs the dense published-style reference.

Two tables:

1. Project model vs ``tests/reference_stage.py`` (the published N x N x 2F computation) with
   the same parameters, one 6-keyframe window of 64/128/256/512 nodes (2 actors per keyframe,
   the rest objects): forward + backward + Adam step time and peak memory, with ratios.
2. Project model throughput, keyframes/s, for 6-keyframe windows of 2 actors + 8 objects and
   2 actors + 36 objects per keyframe, at 1, 8 and 32 windows per step.

Time: median over ``--steps`` timed steps after ``--warmup`` steps (both models get their graph
from outside the step: the project's ``collate`` builds it, as the published loader does).
Peak memory: on CUDA, ``max_memory_allocated`` during the timed steps minus the memory
allocated before them. On CPU a second fresh subprocess per configuration runs with
``MALLOC_MMAP_THRESHOLD_`` fixed (freed buffers go back to the OS), resets the kernel's
peak-RSS mark (``/proc/self/clear_refs``) after warm-up, and reports peak RSS during one step
minus RSS before it. Either way the figure is what a step adds (activations, gradients,
temporaries) on top of the weights, previous gradients and Adam state both models hold alike.
On CUDA both models run under bf16 autocast (``--amp``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stage_dist.data.batch import Batch, collate
from stage_dist.model.saved_model import load_model_state
from stage_dist.model.stage import STAGE, ModelConfig
from tests.reference_stage import ReferenceStage, random_window, reference_adjacency, reference_logits

REPO = Path(__file__).resolve().parents[1]

KEYFRAMES = 6
ACTORS_PER_KEYFRAME = 2


@dataclass
class Case:
    """One measurement: ``kind`` is "project" or "reference"."""

    kind: str
    windows: int
    objects_per_keyframe: list[int]
    device: str
    amp: str
    steps: int
    warmup: int
    seed: int = 0

    @property
    def nodes(self) -> int:
        return self.windows * (KEYFRAMES * ACTORS_PER_KEYFRAME + sum(self.objects_per_keyframe))


def _rss_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    found = re.search(rf"{field}:\s+(\d+)", status)
    assert found, f"no {field} in /proc/self/status"
    return int(found.group(1))


def _make_batch(case: Case, config: ModelConfig) -> Batch:
    rng = np.random.default_rng(case.seed)
    windows = [
        random_window(rng, KEYFRAMES, config.actor_dim, config.object_dim, clip=i,
                      actors_per_keyframe=ACTORS_PER_KEYFRAME,
                      objects_per_keyframe=np.array(case.objects_per_keyframe))
        for i in range(case.windows)
    ]
    return collate(windows)


def _make_model(kind: str, config: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    reference = ReferenceStage(config.num_outputs, config.actor_dim, config.object_dim,
                               config.num_heads)
    if kind == "reference":
        return reference
    model = STAGE(config)
    load_model_state(model, reference.state_dict())
    return model


def measure(case: Case) -> dict:
    """Median step seconds and peak extra bytes of one case, in this process."""
    config = ModelConfig()
    device = torch.device(case.device)
    model = _make_model(case.kind, config).to(device).train()
    batch = _make_batch(case, config).to(device)
    labels = torch.rand(batch.actor_features.shape[0], config.num_outputs, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=6.25e-5)
    cuda = device.type == "cuda"
    # The published code builds its adjacency in the data loader, outside the step: so does
    # the reference here, and so does the project's collate (the batch carries its graph).
    reference = model if isinstance(model, ReferenceStage) else None
    adj = reference_adjacency(batch) if reference is not None else None

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.amp == "bf16"):
            if reference is not None:
                logits = reference_logits(reference, batch, adj=adj)
            else:
                logits = model(batch)
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    for _ in range(case.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
        before = _rss_kib("VmRSS") * 1024
    times = []
    for _ in range(case.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    return {"step_s": statistics.median(times), "peak_bytes": peak - before, "nodes": case.nodes}


def _measure_in_subprocess(case: Case, env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "bench.model_bench", "--worker", json.dumps(asdict(case))],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{case.kind} at {case.nodes} nodes failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_case(case: Case) -> dict:
    """Measure ``case`` in-process on CUDA. On CPU, in two fresh subprocesses: one times the
    steps with the default allocator, one measures the peak of one step with large buffers
    mmapped (so that freed memory leaves the RSS; the page faults would distort the time)."""
    if case.device != "cpu":
        return measure(case)
    timing = _measure_in_subprocess(case, dict(os.environ))
    memory = _measure_in_subprocess(
        replace(case, steps=1), dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    )
    return dict(timing, peak_bytes=memory["peak_bytes"])


def _split(total: int, parts: int) -> list[int]:
    return [len(chunk) for chunk in np.array_split(np.arange(total), parts)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[64, 128, 256, 512],
                        help="node counts of the one-window project-vs-reference table")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 8, 32],
                        help="windows per step of the throughput table")
    parser.add_argument("--objects", type=int, nargs="+", default=[8, 36],
                        help="objects per keyframe of the throughput table")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when available")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                        help="autocast; auto: bf16 on cuda, off on cpu")
    parser.add_argument("--worker", metavar="JSON", help="internal: measure one case, print JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(Case(**json.loads(args.worker)))))
        return 0
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    amp = args.amp if args.amp != "auto" else ("bf16" if device == "cuda" else "off")
    threads = f"{torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {threads}"
    print(f"device: {where}; amp: {amp}; torch {torch.__version__}; "
          f"dims 1024/2048, 4 heads, 81 outputs; median of {args.steps} steps after {args.warmup}; "
          f"load average {os.getloadavg()[0]:.2f}")

    print("\nfwd+bwd+Adam step, one 6-keyframe window (2 actors/keyframe), project vs reference")
    print(f"{'nodes':>6} {'project ms':>11} {'reference ms':>13} {'speedup':>8} "
          f"{'project MiB':>12} {'reference MiB':>14} {'mem ratio':>10}")
    for nodes in args.nodes:
        objects = _split(nodes - KEYFRAMES * ACTORS_PER_KEYFRAME, KEYFRAMES)
        ours, theirs = (run_case(Case(kind, 1, objects, device, amp, args.steps, args.warmup))
                        for kind in ("project", "reference"))
        mib = 2**20
        print(f"{nodes:>6} {ours['step_s'] * 1e3:>11.1f} {theirs['step_s'] * 1e3:>13.1f} "
              f"{theirs['step_s'] / ours['step_s']:>7.1f}x {ours['peak_bytes'] / mib:>12.1f} "
              f"{theirs['peak_bytes'] / mib:>14.1f} "
              f"{theirs['peak_bytes'] / max(ours['peak_bytes'], 1):>9.1f}x", flush=True)

    print("\nproject model throughput, 6-keyframe windows, 2 actors/keyframe")
    print(f"{'objects/kf':>10} {'windows':>8} {'nodes':>6} {'step ms':>9} {'keyframes/s':>12} "
          f"{'vs 1 window':>12} {'peak MiB':>9}")
    for objects in args.objects:
        single = None
        for windows in args.windows:
            result = run_case(Case("project", windows, [objects] * KEYFRAMES, device, amp,
                                   args.steps, args.warmup))
            rate = windows * KEYFRAMES / result["step_s"]
            single = single or rate
            print(f"{objects:>10} {windows:>8} {result['nodes']:>6} {result['step_s'] * 1e3:>9.1f} "
                  f"{rate:>12.1f} {rate / single:>11.2f}x {result['peak_bytes'] / 2**20:>9.1f}",
                  flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
