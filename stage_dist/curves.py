"""Learning curves without TensorBoard: training loss and val mAP against steps, from metrics.jsonl.

    python -m stage_dist.curves runs/seed0 runs/seed1 --out curves.png

Each argument is a run's ``--output-dir`` (or its ``metrics.jsonl``, written by
:mod:`stage_dist.train`, read by :func:`stage_dist.runlog.read_metrics`); the runs are drawn
side by side, one colour each: the loss of every log step in the left panel, the val frame-mAP
of every validation in the right one. A missing or empty file, or a malformed line other than a
torn last line, is one line naming the file (and the line), exit code 2; the PNG is written
atomically and never over an input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stage_dist.cli import Command
from stage_dist.config import ConfigError, build_parser as build_config_parser, option, parse_config
from stage_dist.errors import EXIT_OK
from stage_dist.fileio import atomic_write
from stage_dist.outputs import check_output_file
from stage_dist.paths import user_path_errors
from stage_dist.runlog import METRICS_NAME, read_metrics


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


def metrics_path(run: str | os.PathLike) -> Path:
    path = Path(run)
    return path / METRICS_NAME if path.is_dir() else path


def run_names(runs: Sequence[str | os.PathLike]) -> list[str]:
    """Short legend names: each run's directory name, with parents added until they differ."""
    paths = [metrics_path(run).resolve().parent for run in runs]
    depth = 1
    while True:
        names = [str(Path(*p.parts[-depth:])) for p in paths]
        if len(set(names)) == len(names) or depth >= max(len(p.parts) for p in paths):
            return names
        depth += 1


@dataclass(frozen=True)
class Curves:
    """One run's points: the loss at every log step, the val mAP at every validation."""

    loss_steps: list[int]
    loss: list[float]
    val_steps: list[int]
    val_map: list[float]

    @classmethod
    def of(cls, records: Sequence[dict]) -> "Curves":
        train = [r for r in records if r["kind"] == "train" and isinstance(r.get("loss"), (int, float))]
        val = [r for r in records if r["kind"] == "val" and isinstance(r.get("val_map"), (int, float))]
        return cls([r["step"] for r in train], [r["loss"] for r in train],
                   [r["step"] for r in val], [r["val_map"] for r in val])


def plot_curves(runs: Sequence[tuple[str, list[dict]]], path: str | os.PathLike) -> None:
    """Loss (left) and val mAP (right) against the optimizer step, one line per run (PNG)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(runs)
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(fig)


def curves_figure(runs: Sequence[tuple[str, list[dict]]]):
    """The matplotlib figure of :func:`plot_curves`: both panels on one step axis (a run validated
    only at its end shows that point at its last step, not on an axis of its own); a run without
    validation is named in the mAP legend as such."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (loss_ax, map_ax) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    any_val = False
    for index, (name, records) in enumerate(runs):
        colour = f"C{index % 10}"
        curves = Curves.of(records)
        loss_ax.plot(curves.loss_steps, curves.loss, color=colour, linewidth=1.2, label=name)
        if curves.val_steps:
            any_val = True
            map_ax.plot(curves.val_steps, curves.val_map, color=colour, marker="o", markersize=3.5, linewidth=1.2,
                        label=f"{name} (last {curves.val_map[-1]:.4f}, best {max(curves.val_map):.4f})")
        else:
            map_ax.plot([], [], color=colour, marker="o", markersize=3.5, linewidth=1.2, label=f"{name} (no validation)")
    loss_ax.set_title("training loss (mean over each log interval)")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("binary cross-entropy (log scale)")
    loss_ax.set_yscale("log")
    plain = matplotlib.ticker.FormatStrFormatter("%.3g")  # 0.05, not 5 x 10^-2
    loss_ax.yaxis.set_major_formatter(plain)
    loss_ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2.0, 5.0)))
    loss_ax.yaxis.set_minor_formatter(plain)
    map_ax.set_title("validation frame-mAP@0.5 IoU")
    map_ax.set_xlabel("optimizer step")
    map_ax.set_ylabel("mAP (0-1)")
    if not any_val:
        map_ax.text(0.5, 0.5, "no validation in these runs", ha="center", va="center", transform=map_ax.transAxes)
    map_ax.tick_params(labelbottom=True)  # sharex keeps both panels' step labels
    for ax in (loss_ax, map_ax):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    loss_ax.title.set_fontsize(10)
    map_ax.title.set_fontsize(10)
    fig.tight_layout()
    return fig


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
