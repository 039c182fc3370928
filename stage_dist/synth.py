"""A deterministic synthetic AVA-like dataset, written in both published feature layouts.

Owns the generative model and the writers of:

- the **I3D layout**: ``<split>/i3d/actors/<video_id>/<ts:04d>.h5`` (``features`` (n, C, t, h, w),
  ``boxes`` (n, 4), ``labels`` (n, 81) with background column 0) and ``<split>/i3d/objects.h5``
  (``<video_id>_<ts>_features|boxes|cls_prob``, timestamp without leading zeros);
- the **SlowFast layout**: ``<split>/slowfast/features.h5`` (groups ``<clip_number>_<ts>`` with
  ``boxes``, pooled ``features`` (n, C), ``labels`` (n, 80)) and ``<split>/slowfast/videos.txt``
  (clip number = line index; deliberately not sorted);
- the AVA ``<split>/groundtruth.csv`` and ``labelmap.pbtxt`` (real AVA names and ids).

With ``--class-ids`` (one id per class, any ids >= 1) the dataset has a non-AVA class set: the
same classes (AVA names, same generative model), but their ids are the given ones, both layouts'
``labels`` have one column per class in that order (no background column), and
``labelmap.pbtxt`` lists them in column order: the label map the converter's ``--labelmap`` needs.

Both layouts hold the same actors, boxes and labels, and the SlowFast features are exactly the
mean over t, h, w of the I3D features: every feature value lies on a 2**-8 grid and the voxel
deviations of an actor sum to zero exactly, so the float32 mean is exact in any summation order.

The generative model makes three kinds of classes, so that a graph over actors, objects and
adjacent keyframes has something to learn that a per-actor classifier cannot see:

- ``direct``: a class signature is added to the actor's own feature, under strong per-keyframe
  noise (averaging adjacent keyframes helps);
- ``object``: revealed only by an object placed at the actor's hands whose feature carries the
  class signature;
- ``interaction``: an actor has the class iff another actor of the same keyframe *emits* the
  class's cue signature in its own feature (the labelled actor's feature carries nothing of it).

Actions and emissions are two-state Markov chains per actor (they persist for several seconds);
actor identities persist over a clip and boxes move smoothly. Distractor objects with random
features sit away from the actors. Val actor boxes are jittered detections of the true boxes plus
unlabelled false positives; ``groundtruth.csv`` always holds the true boxes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from stage_dist.core.cli import Command
from stage_dist.core.config import build_parser as build_parser_for, parse_config
from stage_dist.core.errors import EXIT_OK
from stage_dist.core.paths import user_path_errors
from stage_dist.ingest.synthetic import SynthJob, synthesize

# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    return build_parser_for(
        SynthJob, prog="python -m stage_dist.synth",
        description="Write a deterministic synthetic AVA-like dataset in the I3D and SlowFast "
        "feature layouts, with AVA groundtruth CSVs and a pbtxt label map.")


SYNTH_COMMAND = Command()


def main(argv: list[str] | None = None) -> int:
    job = parse_config(SynthJob, argv, build_parser())
    logging.basicConfig(level=job.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return SYNTH_COMMAND.run(lambda: _synthesize(job))


def _synthesize(job: SynthJob) -> int:
    with user_path_errors({"--out": job.out}, writing="--out"):  # it writes nothing else
        dataset = synthesize(job.out, job.data, progress=True)
    print(f"synthetic AVA dataset at {dataset.root}")
    print(f"  labelmap: {dataset.labelmap} ({len(dataset.actions)} classes: "
          + ", ".join(f"{a.id}:{a.kind}" for a in sorted(dataset.actions)) + ")")
    for split, counts in dataset.counts.items():
        paths = dataset.splits[split]
        print(f"  {split}: {counts.clips} clips, {counts.keyframes} keyframes, "
              f"{counts.actors} actors ({counts.false_positives} false positives), "
              f"{counts.objects} objects, {counts.groundtruth_rows} groundtruth rows, "
              f"{counts.bytes / 1e6:.1f} MB")
        for name, path in dataclasses.asdict(paths).items():
            print(f"    {name}: {path}")
    total = sum(c.bytes for c in dataset.counts.values())
    print(f"  total: {total / 1e6:.1f} MB written")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
