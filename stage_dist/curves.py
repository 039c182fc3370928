"""Learning curves without TensorBoard: training loss and val mAP against steps, from metrics.jsonl.

    python -m stage_dist.curves runs/seed0 runs/seed1 --out curves.png

Each argument is a run's ``--output-dir`` (or its ``metrics.jsonl``, written by
:mod:`stage_dist.train`, read by :func:`stage_dist.engine.metrics_log.read_metrics`); the runs are drawn
side by side, one colour each: the loss of every log step in the left panel, the val frame-mAP
of every validation in the right one. A missing or empty file, or a malformed line other than a
torn last line, is one line naming the file (and the line), exit code 2; the PNG is written
atomically and never over an input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from stage_dist.core.cli import Command
from stage_dist.core.config import ConfigError, build_parser as build_config_parser, option, parse_config
from stage_dist.core.errors import EXIT_OK
from stage_dist.core.outputs import check_output_file
from stage_dist.core.paths import user_path_errors
from stage_dist.engine.curves import metrics_path, plot_curves, run_names
from stage_dist.engine.metrics_log import read_metrics


@dataclass(frozen=True)
class CurvesConfig:
    """The flags of ``python -m stage_dist.curves``."""

    runs: tuple[str, ...] = option(positional=True, metavar="RUN",
                                   help="run output directories (or their metrics.jsonl), drawn side by side")
    out: str = option(flag=("-o", "--out"), help="PNG to write")
    names: tuple[str, ...] | None = option(None, help="legend names of the runs, in order (default: their "
                                                      "directory names)")

    def __post_init__(self) -> None:
        if self.names is not None and len(self.names) != len(self.runs):
            raise ConfigError(f"--names gives {len(self.names)} names for {len(self.runs)} runs")


def build_parser():
    return build_config_parser(CurvesConfig, prog="python -m stage_dist.curves",
                               description="Draw training loss and val mAP against steps for one or several runs, "
                                           "from their metrics.jsonl.\nExit codes: 0 ok, 2 bad input (one line "
                                           "naming the file and line).")


CURVES_COMMAND = Command()


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(CurvesConfig, argv, build_parser())
    return CURVES_COMMAND.run(lambda: _draw(config))


def _draw(config: CurvesConfig) -> int:
    paths = [metrics_path(run) for run in config.runs]
    check_output_file(config.out, inputs=[("metrics", path) for path in paths])
    names = list(config.names) if config.names else run_names(config.runs)
    runs = [(name, read_metrics(path)) for name, path in zip(names, paths)]
    with user_path_errors({"--out": config.out}, writing="--out"):
        plot_curves(runs, config.out)
    print(f"curves of {len(paths)} run(s) -> {config.out}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
