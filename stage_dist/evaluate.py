"""The evaluation command: ``python -m stage_dist.evaluate`` (``stage-evaluate``), its parser and main.

    python -m stage_dist.evaluate -g ava_val_v2.2.csv -l ava_action_list_v2.2.pbtxt -d results.csv

The official frame-mAP@0.5 is :mod:`stage_dist.ava.evaluation`'s (its rules are listed there);
``--bootstrap``, ``--compare`` and several ``-d`` are :mod:`stage_dist.ava.statistics`', ``--check``
is :mod:`stage_dist.ava.results_check`'s.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from stage_dist.ava import results_check, statistics
from stage_dist.ava.evaluation import (
    MAX_RESAMPLES,
    ActionGroups,
    CliOutput,
    evaluate_with_table,
    format_table,
    metrics_json,
    read_action_groups,
)
from stage_dist.ava.formats import (
    AvaFormatError,
    PathLike,
    read_labelmap,
)
from stage_dist.core.cli import Command
from stage_dist.core.config import ConfigError, build_parser as build_config_parser, option, parse_config
from stage_dist.core.errors import EXIT_BAD_INPUT, EXIT_OK
from stage_dist.core.paths import check_target, user_path_errors


@dataclass(frozen=True)
class EvaluateConfig:
    """The flags of ``python -m stage_dist.evaluate`` (the official evaluator's short forms kept)."""

    groundtruth: str = option(flag=("-g", "--groundtruth"),
                              help="groundtruth CSV: video,ts,x1,y1,x2,y2,action,person (or video,ts)")
    labelmap: str = option(flag=("-l", "--labelmap"),
                           help="label map pbtxt (item {name id} or label {name label_id [label_type]} form; "
                                "label_type, where every class has one, defines the action groups, else AVA's "
                                "id ranges 1-14 / 15-63 / 64-80)")
    detections: tuple[str, ...] | None = option(
        None, flag=("-d", "--detections"), metavar="CSV",
        help="detections CSV (results.csv): video,ts,x1,y1,x2,y2,action,score; several files = runs of one "
             "model (e.g. seeds): each is scored, then mean +- sample std of mAP and group mAP")
    exclusions: str | None = option(None, flag=("-e", "--exclusions"),
                                    help="CSV of video,ts keyframes to drop (pre-2020 protocol)")
    json: str | None = option(None, help="write the metrics with the official key names (plus group mAP, and "
                                         "the interval with --bootstrap) to this JSON file")
    plot: str | None = option(None, help="write a per-class AP bar chart, coloured by action group (PNG)")
    quiet: bool = option(False, flag=("-q", "--quiet"), help="print only the mAP line, not the per-class table")
    bootstrap: int = option(0, metavar="N", help="resample the groundtruth's videos N times (with replacement) "
                                                 "for 95 %% percentile intervals of mAP and group mAP; "
                                                 f"0: off (--compare: 0 means 1000); at most {MAX_RESAMPLES}")
    seed: int = option(0, help="seed of the bootstrap resamples (>= 0)")
    compare: tuple[str, ...] | None = option(
        None, metavar="CSV",
        help="two detections files A B on the same groundtruth (instead of -d): mAP of each, A - B with a "
             "paired video-bootstrap 95 %% interval and two-sided p-value, per-class differences; exit 0 "
             "whatever the difference")
    check: bool = option(False, help="validate -d against -g and -l without scoring: every problem class "
                                     "with its count and first example; exit 2 if any problem, 0 if clean")

    def __post_init__(self) -> None:
        if (self.detections is None) == (self.compare is None):
            raise ConfigError("give -d/--detections or --compare A.csv B.csv (one of them)")
        if self.compare is not None and len(self.compare) != 2:
            raise ConfigError(f"--compare takes two detections files, got {len(self.compare)}")
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if self.bootstrap > MAX_RESAMPLES:
            raise ConfigError(f"--bootstrap must be at most {MAX_RESAMPLES}, got {self.bootstrap}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.check:
            given = [flag for flag, value in (("--json", self.json), ("--plot", self.plot),
                                              ("--bootstrap", self.bootstrap)) if value]
            if given:
                raise ConfigError(f"--check scores nothing and writes nothing: drop {', '.join(given)}")
        several = self.detections is not None and len(self.detections) > 1
        if self.check and (self.compare is not None or several):
            raise ConfigError("--check validates one -d file")
        if self.plot is not None and (self.compare is not None or several):
            raise ConfigError("--plot draws one detections file (give one -d)")
        if several and self.bootstrap:
            raise ConfigError("--bootstrap with several -d files: give one -d, or --compare A B")

    @property
    def comparison_resamples(self) -> int:
        return self.bootstrap or 1000


def _check_outputs(args: EvaluateConfig) -> None:
    """Refuse, before any work, an output that is a directory or would replace an input."""
    inputs = [("-g", args.groundtruth), ("-l", args.labelmap), ("-e", args.exclusions),
              *(("-d", path) for path in args.detections or ()), *(("--compare", path) for path in args.compare or ())]
    outputs = {flag: getattr(args, name) for flag, name in (("--json", "json"), ("--plot", "plot"))}
    seen: list[tuple[str, str]] = []
    for flag, path in outputs.items():
        if path is None:
            continue
        if os.path.isdir(path):
            raise AvaFormatError(path, None, f"{flag} is a directory, not a file to write")
        for other_flag, other in [*inputs, *seen]:
            if other is not None and _same_file(path, other):
                raise AvaFormatError(path, None, f"{flag} would overwrite the file given as {other_flag}; refusing")
        seen.append((flag, path))
        check_target(path, flag, kind="file")


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


EVALUATE_COMMAND = Command()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for malformed or unreadable input, and for
    ``--check`` finding a problem)."""
    args = parse_config(EvaluateConfig, argv, build_config_parser(
        EvaluateConfig, prog="python -m stage_dist.evaluate",
        description="AVA frame-mAP@0.5, reproducing the official ActivityNet evaluator (2020), with action-group "
                    "mAP, video-bootstrap intervals, paired comparisons, runs of one model and a results.csv check. "
                    "Learning curves of training runs (metrics.jsonl): python -m stage_dist.curves RUN_DIR ... "
                    "--out curves.png."))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return EVALUATE_COMMAND.run(lambda: _evaluate(args))


def _evaluate(args: EvaluateConfig) -> int:
    _check_outputs(args)
    labelmap = read_labelmap(args.labelmap)
    groups = read_action_groups(args.labelmap)
    detections = args.detections or ()
    if args.check:
        report = results_check.check(args.groundtruth, detections[0], labelmap, args.exclusions)
        print(report.format())
        return EXIT_OK if report.clean else EXIT_BAD_INPUT  # the results file is the input at fault
    if args.compare is not None:
        path_a, path_b = args.compare
        output = statistics.compare_files(args.groundtruth, path_a, path_b, labelmap, args.exclusions, groups,
                                          args.comparison_resamples, args.seed)
    elif len(detections) > 1:
        output = statistics.runs_files(args.groundtruth, detections, labelmap, args.exclusions, groups)
    else:
        output = _evaluate_one(args, labelmap, groups)
    for flag, path, write in (("--json", args.json, output.write_json), ("--plot", args.plot, output.write_plot)):
        if path is not None:
            with user_path_errors({flag: path}, writing=flag):
                write(path)
    text = output.text
    print(text.splitlines()[0] if args.quiet else text)
    return EXIT_OK


def _evaluate_one(args: EvaluateConfig, labelmap: Mapping[int, str], groups: ActionGroups) -> CliOutput:
    assert args.detections is not None
    result, table = evaluate_with_table(args.groundtruth, args.detections[0], labelmap, args.exclusions,
                                        groups=groups)
    extra_lines: list[str] = []
    extra_json: dict[str, object] = {}
    if args.bootstrap:
        found = statistics.bootstrap(table, groups, args.bootstrap, args.seed)
        extra_lines.append(found.format())
        extra_json["bootstrap"] = found.as_json()
    return CliOutput(format_table(result, labelmap, extra=extra_lines), metrics_json(result, extra_json),
                     (result, groups))


if __name__ == "__main__":
    sys.exit(main())
