"""Benchmark of the AVA evaluator (and the results.csv writer): wall time and peak memory.

1. The real subset fixture (11,874 groundtruth rows, 32,410 detections); target <= 0.4 s.
2. A generated full-validation-sized pair: 57,000 keyframes with 1-3 actors each (~2), a
   results.csv with the 60 label-map classes per box (~6.8M rows, ~3.4M after the 50 cap);
   target <= 60 s and < 4 GB on 2 CPU cores. The file is written with
   ``stage_dist.ava.formats.write_results_csv``, whose time is reported too.
3. The same predictions evaluated in memory (``stage_dist.ava.evaluation.evaluate_predictions``, what
   validation can use instead of writing and reading results.csv); its mAP must equal 2.'s.
4. With ``--bootstrap N``: the video bootstrap of 2. (``stage_dist.ava.statistics.bootstrap``, N
   resamples, after one evaluation); target <= 60 s for N = 1000 (what ``--bootstrap 1000`` of
   the evaluator adds to the plain evaluation).

Each evaluation runs in a fresh subprocess that reports its own wall time and peak resident
memory (VmHWM, which includes the interpreter and numpy: the import-only baseline is printed
next to it).

    python -m bench.eval_bench [--keyframes 57000] [--repeat 5] [--skip-full] [--work-dir DIR] [--bootstrap N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "ava"  # copied from the project's shared AVA fixtures; see its README
LABELMAP = FIXTURES / "ava_action_list_v2.1_for_activitynet_2018.pbtxt"
KEYFRAMES_PER_VIDEO = 897  # timestamps 902..1798
FIXTURE_TARGET_S, FULL_TARGET_S, FULL_TARGET_BYTES = 0.4, 60.0, 4 << 30


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process image (VmHWM; ru_maxrss would include the parent's
    peak on Linux, where it survives fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(groundtruth: str, detections: str, labelmap: str, repeat: int) -> None:
    """Run in a fresh process: evaluate ``repeat`` times, print timings and peak RSS as JSON.

    ``detections`` ``"memory:<keyframes>:<seed>"`` regenerates the full-size predictions and
    evaluates them in memory (the generation is not timed).
    """
    from stage_dist.ava.evaluation import evaluate, evaluate_predictions

    baseline = _peak_rss_bytes()
    if detections.startswith("bootstrap:"):
        from stage_dist.ava.evaluation import evaluate_with_table, read_action_groups
        from stage_dist.ava.statistics import bootstrap

        _, resamples, detections = detections.split(":", 2)
        evaluated, table = evaluate_with_table(groundtruth, detections, labelmap)
        groups = read_action_groups(labelmap)

        def run():
            found = bootstrap(table, groups, int(resamples), seed=0)
            print(f"bootstrap: {len(table.videos)} videos, {int(table.true_positive.sum())} true positives, "
                  f"{len(table.scores)} detections; mAP {evaluated.mean_ap:.4f}, 95 % interval "
                  f"[{found.mean_ap[0]:.4f}, {found.mean_ap[1]:.4f}]")
            return evaluated
    elif detections.startswith("memory:"):
        _, num_keyframes, seed = detections.split(":")
        data = generated_predictions(int(num_keyframes), int(seed))
        predictions = (data["video_ids"], data["timestamps"], data["jitter"], data["scores"])

        def run():
            return evaluate_predictions(groundtruth, labelmap, *predictions, class_ids=data["class_ids"])
    else:
        def run():
            return evaluate(groundtruth, detections, labelmap)
    seconds, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - start)
    assert result is not None, "--repeat must be at least 1"
    print(json.dumps({"seconds": seconds, "peak_rss": _peak_rss_bytes(), "import_rss": baseline,
                      "mean_ap": result.mean_ap, "rows": result.num_detection_rows,
                      "evaluated": result.num_evaluated_detections}))


def run_child(groundtruth: Path, detections: Path | str, repeat: int) -> dict:
    command = [sys.executable, __file__, "--child", str(groundtruth), str(detections), str(LABELMAP),
               "--repeat", str(repeat)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        sys.exit(f"benchmark child failed:\n{done.stderr}")
    for line in done.stdout.strip().splitlines()[:-1]:
        print(f"  {line}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def generated_predictions(num_keyframes: int, seed: int) -> dict:
    """Boxes, labels and scores of a full-validation-sized set (deterministic in ``seed``)."""
    from stage_dist.ava.formats import read_labelmap

    rng = np.random.default_rng(seed)
    class_ids = np.array(sorted(read_labelmap(LABELMAP)))
    keyframe = np.arange(num_keyframes)
    videos = np.array([f"bench{v:03d}_{'x' * 3}" for v in range(num_keyframes // KEYFRAMES_PER_VIDEO + 1)])
    actors = rng.integers(1, 4, num_keyframes)
    box_keyframe = np.repeat(keyframe, actors)
    num_boxes = len(box_keyframe)
    video_ids = videos[box_keyframe // KEYFRAMES_PER_VIDEO].tolist()
    timestamps = 902 + box_keyframe % KEYFRAMES_PER_VIDEO
    corner = rng.random((num_boxes, 2)) * 0.6
    boxes = np.round(np.hstack([corner, corner + 0.1 + rng.random((num_boxes, 2)) * 0.3]), 3)

    frequency = 1.0 / np.arange(1, len(class_ids) + 1)  # long-tailed, like AVA
    labels = np.zeros((num_boxes, 80), dtype=bool)
    for n in range(1, 3):
        chosen = rng.choice(class_ids, size=num_boxes, p=frequency / frequency.sum())
        labels[np.arange(num_boxes), chosen - 1] |= rng.random(num_boxes) < (1.0 if n == 1 else 0.5)
    person = np.arange(num_boxes) - np.repeat(np.cumsum(actors) - actors, actors)
    jitter = np.clip(boxes + rng.normal(0, 0.02, boxes.shape), 0, 1)
    scores = np.clip(rng.random((num_boxes, 80)) * 0.6 + 0.35 * labels, 0, 1).astype(np.float32)
    return dict(class_ids=class_ids, video_ids=video_ids, timestamps=timestamps, boxes=boxes, labels=labels,
                person=person, jitter=jitter, scores=scores)


def generate_full(work_dir: Path, num_keyframes: int, seed: int) -> tuple[Path, Path, float]:
    """Groundtruth and a results.csv of full-validation size; returns paths and writer seconds."""
    from stage_dist.ava.formats import write_results_csv

    data = generated_predictions(num_keyframes, seed)
    video_ids, timestamps, boxes, labels = data["video_ids"], data["timestamps"], data["boxes"], data["labels"]
    num_boxes, person, class_ids = len(boxes), data["person"], data["class_ids"]
    jitter, scores = data["jitter"], data["scores"]
    box_text = [",".join(f"{v:.3f}" for v in b) for b in boxes.tolist()]
    with open(work_dir / "groundtruth.csv", "w") as out:
        for i, row in zip(*np.nonzero(labels)):
            out.write(f"{video_ids[i]},{timestamps[i]:04d},{box_text[i]},{row + 1},{person[i]}\n")
    start = time.perf_counter()
    rows = write_results_csv(work_dir / "results.csv", video_ids, timestamps, jitter, scores, class_ids=class_ids)
    written = time.perf_counter() - start
    print(f"generated {num_keyframes} keyframes, {num_boxes} boxes, {int(labels.sum())} groundtruth rows, "
          f"{rows} result rows ({(work_dir / 'results.csv').stat().st_size / 1e6:.0f} MB); "
          f"write_results_csv: {written:.2f} s ({rows / written / 1e6:.2f} M rows/s)")
    return work_dir / "groundtruth.csv", work_dir / "results.csv", written


def report(name: str, figures: dict, target_s: float, target_bytes: int | None = None) -> None:
    best, first = min(figures["seconds"]), figures["seconds"][0]
    peak, base = figures["peak_rss"] / 2**20, figures["import_rss"] / 2**20
    verdict = "meets" if best <= target_s and (target_bytes is None or figures["peak_rss"] < target_bytes) else "MISSES"
    print(f"{name}: {figures['rows']} detection rows ({figures['evaluated']} evaluated), mAP {figures['mean_ap']:.6f}")
    print(f"  time: first {first:.3f} s, best of {len(figures['seconds'])} {best:.3f} s (target <= {target_s} s)")
    print(f"  peak RSS: {peak:.0f} MiB (interpreter + imports alone: {base:.0f} MiB)"
          + (f" (target < {target_bytes / 2**30:.0f} GiB)" if target_bytes else ""))
    print(f"  -> {verdict} the target")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keyframes", type=int, default=57000, help="keyframes of the generated full-size file")
    parser.add_argument("--repeat", type=int, default=5, help="evaluations of the fixture (best time reported)")
    parser.add_argument("--full-repeat", type=int, default=1, help="evaluations of the full-size file")
    parser.add_argument("--skip-full", action="store_true", help="only benchmark the subset fixture")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the generated files here (default: a temporary directory, removed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated files")
    parser.add_argument("--bootstrap", type=int, default=0,
                        help="also time a video bootstrap of this many resamples of the full-size file")
    parser.add_argument("--child", nargs=3, metavar=("GT", "DET", "LABELMAP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        groundtruth, detections, labelmap = args.child
        child(groundtruth, detections, labelmap, repeat=args.repeat)
        return 0

    report("subset fixture", run_child(FIXTURES / "ava_val_v2.1_subset4.csv", FIXTURES / "detections_subset4.csv",
                                       args.repeat), FIXTURE_TARGET_S)
    if args.skip_full:
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = args.work_dir or Path(scratch)
        work_dir.mkdir(parents=True, exist_ok=True)
        groundtruth, detections, _ = generate_full(work_dir, args.keyframes, args.seed)
        from_file = run_child(groundtruth, detections, args.full_repeat)
        report(f"full-size ({args.keyframes} keyframes)", from_file, FULL_TARGET_S, FULL_TARGET_BYTES)
        in_memory = run_child(groundtruth, f"memory:{args.keyframes}:{args.seed}", args.full_repeat)
        report("the same predictions in memory (evaluate_predictions, no results.csv)", in_memory,
               FULL_TARGET_S, FULL_TARGET_BYTES)
        same = in_memory["mean_ap"] == from_file["mean_ap"] and in_memory["rows"] == from_file["rows"]
        print(f"  in-memory mAP and rows {'equal' if same else 'DIFFER FROM'} the file's")
        if args.bootstrap:
            resampled = run_child(groundtruth, f"bootstrap:{args.bootstrap}:{detections}", 1)
            report(f"video bootstrap, {args.bootstrap} resamples of the full-size file (after one evaluation)",
                   resampled, FULL_TARGET_S, FULL_TARGET_BYTES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
