"""A run's learning curves as text: ``OUTPUT_DIR/metrics.jsonl``, written by rank 0, read by anyone.

One JSON object per line, appended: a ``"train"`` record at every log step and a ``"val"``
record at every validation::

    {"kind": "train", "step": 20, "epoch": 0, "loss": 0.1873, "lr": 0.001, "keyframes_per_s": 812.4,
     "data_wait": 0.031, "time": 1700000000.0}
    {"kind": "val", "step": 48, "epoch": 1, "val_map": 0.4012, "per_class": {"stand": 0.81, ...},
     "time": 1700000012.5}

``step`` is the global optimizer step the record belongs to; ``epoch`` is the epoch in progress
(0-based) in a train record and the epochs completed in a val record (as in the validation log
line); ``data_wait`` is the fraction of the steps' time spent waiting for data; ``per_class`` is
the val AP of every label-map class (``null``: no groundtruth); ``time`` is the Unix time written.

Resume-safe (:meth:`MetricsLog.open`): every line is flushed when written, and :meth:`MetricsLog.sync`
fsyncs the file before every checkpoint is saved, so every line of a step <= a checkpoint's step
is on disk when that checkpoint exists. A run that resumes from the checkpoint of step S first
drops every line whose step is > S (they were written after the checkpoint it resumes, by the
run that died, and will be written again) and a torn last line (killed mid-write), then appends:
the file holds each step's records exactly once, as an uninterrupted run's would. A fresh run
(step 0) starts the file empty. :func:`read_metrics` reads it back, tolerating a torn last line.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import IO, Any, Mapping

from stage_dist.core.errors import UserInputError

METRICS_NAME = "metrics.jsonl"  # in OUTPUT_DIR
KINDS = ("train", "val")


class MetricsFileError(UserInputError):
    """A metrics.jsonl that cannot be read: missing, empty, or a malformed line (named by number)."""


def _finite_or_none(value: float) -> float | None:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _parse_lines(data: bytes, path: Path) -> list[tuple[int, int, dict]]:
    """``(start, end, record)`` of every complete line (``end`` is past its newline). An
    unterminated last line (a torn write: every write ends with a newline) is left out; any other
    line that is not a record is a :class:`MetricsFileError` naming ``path`` and the line."""
    records: list[tuple[int, int, dict]] = []
    offset = 0
    *complete, _torn = data.split(b"\n")  # the last piece: b"" or an unterminated line
    for number, line in enumerate(complete, start=1):
        try:
            record = json.loads(line)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise MetricsFileError(f"{path}: line {number}: not JSON ({err})") from None
        if not isinstance(record, dict) or record.get("kind") not in KINDS or type(record.get("step")) is not int:
            raise MetricsFileError(f"{path}: line {number}: not a metrics record (an object with \"kind\" "
                                   f"{' or '.join(KINDS)} and an integer \"step\")")
        records.append((offset, offset + len(line) + 1, record))
        offset += len(line) + 1
    return records


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl (or of ``OUTPUT_DIR/metrics.jsonl`` given the run directory),
    in file order; a torn last line is skipped. Missing, empty or malformed: :class:`MetricsFileError`."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MetricsFileError(f"{path}: no such file (a run writes it in its --output-dir)") from None
    except OSError as err:
        raise MetricsFileError(f"{path}: cannot read: {err.strerror or err}") from None
    records = [record for _, _, record in _parse_lines(data, path)]
    if not records:
        raise MetricsFileError(f"{path}: holds no metrics records")
    return records


class MetricsLog:
    """Rank 0's appender of ``metrics.jsonl`` (see the module docstring for the format and the
    resume rule). Build it with :meth:`open`."""

    def __init__(self, path: Path, handle: IO[bytes]) -> None:
        self.path, self._handle = path, handle

    @classmethod
    def open(cls, path: str | os.PathLike, resumed_step: int) -> "MetricsLog":
        """Open ``path`` for appending after dropping every line of a step > ``resumed_step`` and a
        torn last line (the run resumes from the checkpoint of ``resumed_step``; 0: a fresh run)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+b")
        try:
            handle.seek(0)
            records = _parse_lines(handle.read(), path)
            kept = [end for _, end, record in records if record["step"] <= resumed_step]
            # Records are in step order, so the kept ones are a prefix; the torn tail goes too.
            handle.truncate(kept[-1] if kept else 0)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            handle.close()
            raise
        return cls(path, handle)

    def train(self, *, step: int, epoch: int, loss: float, lr: float, keyframes_per_s: float,
              data_wait: float) -> None:
        """The record of a log step."""
        self.write({"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr,
                    "keyframes_per_s": keyframes_per_s, "data_wait": data_wait})

    def validation(self, *, step: int, epoch: int, result: Any) -> None:
        """The record of a validation; ``result`` is an :class:`~stage_dist.ava.evaluation.EvalResult`."""
        self.write({"kind": "val", "step": step, "epoch": epoch, "val_map": result.mean_ap,
                    "group_map": _no_nan(result.group_map), "grouping": result.grouping,
                    "per_class": _no_nan(result.per_class)})

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (``step`` and ``kind`` required) as one line, flushed to the OS."""
        line = json.dumps({**{k: _finite_or_none(v) for k, v in record.items()}, "time": round(time.time(), 3)},
                          allow_nan=False)
        self._handle.write(line.encode() + b"\n")
        self._handle.flush()

    def sync(self) -> None:
        """Make every line written so far durable (called before a checkpoint is saved)."""
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if not self._handle.closed:
            self.sync()
            self._handle.close()


def _no_nan(values: Mapping[str, float]) -> dict[str, float | None]:
    return {name: _finite_or_none(float(value)) for name, value in values.items()}
