"""Progress: a tqdm bar on a terminal, one plain log line every N seconds in a log file."""

from __future__ import annotations

import io
import logging

from tqdm import tqdm

from stage_dist.core.progress import LogProgress, is_terminal, progress_bar
from stage_dist.engine.distributed import init_distributed
from stage_dist.engine.trainer import Trainer
from tests.test_train import make_config


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_tqdm_only_on_a_terminal():
    bar = progress_bar(total=3, stream=Terminal(), file=io.StringIO())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress_bar(total=3, stream=io.StringIO()), LogProgress)
    assert not is_terminal(io.StringIO()) and is_terminal(Terminal())


def test_log_progress_writes_one_line_every_interval_and_one_at_the_end(caplog):
    now = [0.0]
    bar = LogProgress(total=100, initial=10, desc="train", unit="step", every_seconds=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="stage_dist.core.progress"):
        for step in range(1, 91):
            now[0] = step * 2.0  # 0.5 steps/s
            bar.update(1)
            if step == 20:
                bar.set_postfix(loss="0.1234", kf_s="512")
        bar.close()
    lines = [record.getMessage() for record in caplog.records]
    # lines at 60 s (30 steps), 120 s (60 steps) and 180 s (90 steps), then the final one
    assert lines[0] == "train: 40/100 steps (40.0%), 0.5 step/s, loss=0.1234, kf_s=512, ETA 02:00"
    assert lines[1].startswith("train: 70/100 steps (70.0%)") and lines[1].endswith("ETA 01:00")
    assert lines[2].startswith("train: 100/100 steps (100.0%)") and lines[2].endswith("ETA 00:00")
    assert len(lines) == 3, "close adds no line when nothing happened since the last one"


def test_log_progress_wraps_an_iterable_and_is_silent_when_disabled(caplog):
    with caplog.at_level(logging.INFO, logger="stage_dist.core.progress"):
        assert list(LogProgress(range(4), desc="infer", unit="batch", disable=True)) == [0, 1, 2, 3]
        assert not caplog.records
        assert list(LogProgress(range(4), desc="infer", unit="batch")) == [0, 1, 2, 3]
    (line,) = [record.getMessage() for record in caplog.records]
    assert line.startswith("infer: 4/4 batches (100.0%)") and "done in" in line


def test_training_in_a_log_file_writes_progress_lines_with_the_logged_loss(tiny_stores, tmp_path, caplog):
    """Under pytest stderr is not a terminal: the trainer logs plain progress lines, whose loss is the
    one read at the last log step (no read of its own)."""
    config = make_config(tiny_stores, tmp_path, val_store=None, max_steps=6, log_every=2,
                         progress_every_seconds=1e-9)
    with caplog.at_level(logging.INFO, logger="stage_dist.core.progress"):
        Trainer(config, init_distributed("cpu")).fit()
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("train: ")]
    assert lines[0].startswith("train: 1/6 steps (16.7%)") and "loss" not in lines[0], lines
    assert lines[1].startswith("train: 2/6 steps") and "loss=" in lines[1] and "kf_s=" in lines[1], lines
    assert len(lines) == 6 and "ETA" in lines[-2]
