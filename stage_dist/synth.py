"""The synthetic-data command: ``python -m stage_dist.synth`` (``stage-synth``), its parser and main.

    python -m stage_dist.synth --out synth_data

The dataset (both published layouts, groundtruth, label map) and its generative model are
:mod:`stage_dist.ingest.synthetic`'s.
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
