"""Progress reports fit for terminals and for log files: the one place that decides which.

:func:`progress_bar` takes tqdm's arguments and returns a tqdm bar when stderr is a terminal,
else a :class:`LogProgress`: the same interface (iteration, ``update``, ``set_postfix``,
``set_postfix_str``, ``close``, a context manager), but one plain ``logging`` line every
``every_seconds`` (``--progress-every-seconds``, default 60) and one at the end, instead of a bar
redrawn every 0.1 s into a SLURM output file::

    train: 3/6 steps (50.0%), 22.5 step/s, loss=0.7232, kf_s=137, wait=37%, ETA 00:00

The line says what the caller last put in the postfix: the trainer sets it at log steps only
(the loss is read back from the device only there), so a progress line never reads the device.
Train, infer (and validation), the converter and the shard writer use it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_EVERY_SECONDS = 60.0  # one progress line a minute in log files


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where tqdm draws) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, every_seconds: float = DEFAULT_EVERY_SECONDS,
                 stream: TextIO | None = None, **tqdm_kwargs: Any) -> tqdm | LogProgress:
    """A tqdm bar on a terminal, else a :class:`LogProgress` with the same arguments."""
    if is_terminal(stream):
        return tqdm(iterable, **tqdm_kwargs)
    return LogProgress(iterable, every_seconds=every_seconds, **tqdm_kwargs)


class LogProgress:
    """tqdm's interface, reported as a log line every ``every_seconds`` (and one at :meth:`close`)."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, initial: float = 0,
                 desc: str | None = None, unit: str = "it", unit_scale: bool = False, disable: bool = False,
                 every_seconds: float = DEFAULT_EVERY_SECONDS, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log, **_tqdm_only: Any) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.total, self.n = iterable, total, initial
        self.desc, self.unit, self.unit_scale, self.disable = desc or "progress", unit, unit_scale, disable
        self.every_seconds, self._clock, self._log = every_seconds, clock, logger
        self._initial, self._started = initial, clock()
        self._last_line, self._n_at_last_line = self._started, initial
        self._postfix = ""
        self._closed = False

    def __iter__(self) -> Iterator:
        assert self.iterable is not None, "LogProgress without an iterable"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:  # as tqdm: the end of the iteration closes it
            self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.disable:
            now = self._clock()
            if now - self._last_line >= self.every_seconds:
                self._emit(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{key}={value}" for key, value in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def close(self) -> None:
        if not self._closed and not self.disable and self.n != self._n_at_last_line:
            self._emit(self._clock(), final=True)
        self._closed = True

    def line(self, now: float, final: bool = False) -> str:
        """The progress line at time ``now``."""
        elapsed = max(now - self._started, 1e-9)
        rate = (self.n - self._initial) / elapsed
        parts = [f"{self._amount(self.n)}"
                 + (f"/{self._amount(self.total)}" if self.total else "") + f" {self._plural()}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.1f}%)"
        parts.append(f"{self._amount(rate, rate=True)} {self.unit}/s")
        if self._postfix:
            parts.append(self._postfix)
        if final:
            parts.append(f"done in {tqdm.format_interval(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {tqdm.format_interval(max(0.0, self.total - self.n) / rate)}")
        return f"{self.desc}: " + ", ".join(parts)

    def _emit(self, now: float, final: bool = False) -> None:
        self._log.info("%s", self.line(now, final))
        self._last_line, self._n_at_last_line = now, self.n

    def _plural(self) -> str:
        if self.unit_scale or len(self.unit) < 2:  # "B", "it/s"-style units stay as they are
            return self.unit
        return f"{self.unit}es" if self.unit.endswith(("s", "x", "ch", "sh")) else f"{self.unit}s"

    def _amount(self, value: float, rate: bool = False) -> str:
        if self.unit_scale:
            return tqdm.format_sizeof(value)
        if rate:
            return f"{value:.3g}"
        return f"{value:g}" if isinstance(value, float) else str(value)
