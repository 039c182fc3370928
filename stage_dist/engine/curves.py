"""Learning curves of runs from their metrics.jsonl: the loss and val mAP panels, drawn with
matplotlib (the command line is :mod:`stage_dist.curves`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from stage_dist.core.fileio import atomic_write
from stage_dist.engine.metrics_log import METRICS_NAME

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


def curves_figure(runs: Sequence[tuple[str, list[dict]]]) -> Figure:
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
            map_ax.plot([], [], color=colour, marker="o", markersize=3.5, linewidth=1.2,
                        label=f"{name} (no validation)")
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
