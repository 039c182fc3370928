"""Rank 0's record of a training run, in its output directory and on the console.

:class:`RunLog` owns what a run reports, and the trainer tells it what happened:

- :meth:`RunLog.open`: the run's ``config.json`` (which ``--config`` reads back), its TensorBoard
  writer (``--tensorboard-dir``, default OUTPUT_DIR/tensorboard) and its ``metrics.jsonl``
  (:class:`~stage_dist.engine.metrics_log.MetricsLog`, cut back to the step the run resumes from); then
  :meth:`RunLog.start_progress`, once the trainer has logged what it runs: the progress bar
  (:func:`~stage_dist.core.progress.progress_bar`: a tqdm bar on a terminal, log lines in a log file);
- :meth:`RunLog.train` at a log step: TensorBoard ``train/loss``, ``train/lr``,
  ``train/keyframes_per_s``, ``train/data_wait_fraction``, a metrics.jsonl record and the bar's
  postfix (so a progress line shows the loss of the last log step: no progress line reads the
  device); :meth:`RunLog.step_done` after every step;
- :meth:`RunLog.validation`: a metrics.jsonl record, the validation log line, TensorBoard
  ``val/mAP``, ``val_per_class_AP/<class>`` and ``val_group_mAP/<group>``;
- :meth:`RunLog.sync` before a checkpoint is written (every metrics line up to its step is on
  disk first) and :meth:`RunLog.checkpoint` after.

On every other rank, and before :meth:`RunLog.open` (a trainer driven step by step), every call
does nothing. The log lines go to the logger given (the trainer's), so the console reads as the
trainer's.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from stage_dist.ava.evaluation import EvalResult, group_line
from stage_dist.core.config import save_json
from stage_dist.core.paths import user_path_errors
from stage_dist.core.progress import LogProgress, progress_bar
from stage_dist.engine.metrics_log import METRICS_NAME, MetricsLog

log = logging.getLogger(__name__)


class RunLog:
    """The reports of one run (see the module docstring); a no-op unless ``enabled`` (rank 0).

    ``config_file`` is where the run's config is saved; ``paths`` the paths the run writes, by
    flag, so an OS error names the flag (:func:`~stage_dist.core.paths.user_path_errors`)."""

    def __init__(self, output_dir: Path, *, config_file: Path, tensorboard_dir: str | None,
                 progress_every_seconds: float, paths: Mapping[str, str | None], enabled: bool,
                 logger: logging.Logger = log) -> None:
        self.output_dir, self.config_file, self.tensorboard_dir = output_dir, config_file, tensorboard_dir
        self.progress_every_seconds, self.paths, self.enabled, self.log = progress_every_seconds, paths, enabled, logger
        self._writer: SummaryWriter | None = None
        self._metrics: MetricsLog | None = None
        self._bar: tqdm | LogProgress | None = None

    def open(self, config: object, *, resumed_step: int) -> None:
        """Start the record of a run at ``resumed_step`` (0: a fresh run): save ``config`` (a
        dataclass), open TensorBoard and metrics.jsonl."""
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with user_path_errors(self.paths, writing="--output-dir"):
            save_json(config, self.config_file)
        # the writer creates its event file at once (its thread's ENOSPC names no file)
        writing = "--tensorboard-dir" if self.tensorboard_dir else "--output-dir"
        with user_path_errors(self.paths, writing=writing):
            self._writer = SummaryWriter(self.tensorboard_dir or str(self.output_dir / "tensorboard"))
        # drops the lines a killed run wrote after the checkpoint this run resumes
        self._metrics = MetricsLog.open(self.output_dir / METRICS_NAME, resumed_step=resumed_step)

    def start_progress(self, *, initial: int, total: int) -> None:
        """The progress bar, from step ``initial`` of ``total``."""
        if self.enabled:
            self._bar = progress_bar(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                                     every_seconds=self.progress_every_seconds)

    def train(self, *, step: int, epoch: int, loss: float, lr: float, keyframes_per_s: float,
              data_wait: float) -> None:
        """A log step: the loss (mean over the ranks), LR, speed and data-wait fraction since the last one."""
        if self._writer is None or self._metrics is None or self._bar is None:
            return
        for tag, value in (("loss", loss), ("lr", lr), ("keyframes_per_s", keyframes_per_s),
                           ("data_wait_fraction", data_wait)):
            self._writer.add_scalar(f"train/{tag}", value, step)
        self._metrics.train(step=step, epoch=epoch, loss=loss, lr=lr, keyframes_per_s=keyframes_per_s,
                            data_wait=data_wait)
        self._bar.set_postfix(loss=f"{loss:.4f}", kf_s=f"{keyframes_per_s:.0f}", wait=f"{data_wait:.0%}")
        self.log.debug("step %d epoch %d loss %.4f lr %.3g %.0f keyframes/s data wait %.1f%%",
                       step, epoch, loss, lr, keyframes_per_s, 100 * data_wait)

    def step_done(self) -> None:
        """One more optimizer step (after a log step's :meth:`train`: its progress line shows that step's loss)."""
        if self._bar is not None:
            self._bar.update(1)

    def validation(self, *, step: int, epoch: int, result: EvalResult, best_map: float) -> None:
        """An evaluated validation (``epoch``: the epochs completed) and the best mAP so far."""
        if self._writer is None or self._metrics is None:
            return
        self._metrics.validation(step=step, epoch=epoch, result=result)
        self.log.info("validation at epoch %d (step %d): mAP@0.5 %.4f (best %.4f); %s",
                      epoch, step, result.mean_ap, best_map, group_line(result.group_map, result.grouping))
        self._writer.add_scalar("val/mAP", result.mean_ap, step)
        for name, ap in result.per_class.items():  # at every validation, not only at the end
            if not math.isnan(ap):
                self._writer.add_scalar(f"val_per_class_AP/{name}", ap, step)
        for group, value in result.group_map.items():  # AVA's action groups (EvalResult.grouping)
            if not math.isnan(value):
                self._writer.add_scalar(f"val_group_mAP/{group}", value, step)

    def sync(self) -> None:
        """Make every metrics line so far durable (before a checkpoint is written)."""
        if self._metrics is not None:
            self._metrics.sync()

    def checkpoint(self, path: Path) -> None:
        """A checkpoint was written to ``path``."""
        if self.enabled:
            self.log.info("checkpoint %s", path)

    def close(self) -> None:
        """End the progress line first (before any error message), then close the files."""
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._metrics is not None:
            self._metrics.close()
        self._bar = self._writer = self._metrics = None
