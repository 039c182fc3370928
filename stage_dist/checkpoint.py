"""Checkpoint files: atomic writes, safe loads, rotation, and RNG state capture. Model-agnostic.

A checkpoint is a ``dict`` of tensors, numbers, strings, ``None`` and lists/tuples/dicts of
them, so it loads with ``torch.load(weights_only=True)``; :func:`save_checkpoint` refuses
anything else (naming the offending key) rather than write a file that cannot be loaded back.
Files are written to a temporary file in the same directory, fsynced and renamed over the
target, so a crash leaves either the old file or the new one, never a partial one.

:class:`CheckpointManager` keeps ``ckpt_e<epoch>_s<step>.pt`` files in one directory (the last
``keep_last`` of them, plus ``best.pt`` by a metric), and finds the newest one that loads.
:func:`rng_state` / :func:`set_rng_state` capture and restore the Python, NumPy and torch
(CPU and the current CUDA device) generators in the same loadable form. Each rank has its own
generators: to resume exactly under DDP, gather every rank's :func:`rng_state` into the
checkpoint and restore each rank's own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stage_dist.fileio import TMP_PREFIX, atomic_write

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^ckpt_e(\d+)_s(\d+)\.pt$")
BEST_NAME = "best.pt"
BEST_INFO_NAME = "best.json"

_SCALARS = (str, bytes, bytearray, int, float, bool, complex, type(None))
_OBJECTS = (torch.Tensor, torch.Size, torch.device, torch.dtype)
_CONTAINERS = (list, tuple, set)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


def _check_loadable(value: Any, key: str) -> None:
    """Raise :class:`CheckpointError` if ``value`` would not load with ``weights_only=True``."""
    kind = type(value)
    if kind in _SCALARS or isinstance(value, _OBJECTS):
        return
    if kind in _CONTAINERS:
        for i, item in enumerate(value):
            _check_loadable(item, f"{key}[{i}]")
        return
    if kind in (dict, OrderedDict):
        for k, item in value.items():
            _check_loadable(k, f"{key} (a key)")
            _check_loadable(item, f"{key}[{k!r}]")
        return
    raise CheckpointError(
        f"state{key} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
        "cannot load; convert it to tensors, numbers, strings, lists or dicts"
    )


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: a checkpoint must be a dict, got {type(state).__name__}")
    _check_loadable(state, "")
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot write checkpoint: {err}") from err


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a missing, truncated or corrupt file raises
    :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"{path}: not a loadable checkpoint (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(state).__name__}")
    return state


class CheckpointManager:
    """Rotating checkpoints ``ckpt_e<epoch:04d>_s<step:06d>.pt`` in one directory, plus ``best.pt``.

    Only rank 0 should call :meth:`save`; every rank may call :meth:`load_latest`. The newest
    checkpoint is the one with the largest ``(epoch, step)``. ``best.pt`` is a hard link to (or,
    where links are not supported, a copy of) the checkpoint with the highest metric so far;
    ``best.json`` records that metric so it survives restarts.
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    @staticmethod
    def filename(epoch: int, step: int) -> str:
        return f"ckpt_e{epoch:04d}_s{step:06d}.pt"

    def checkpoints(self) -> list[Path]:
        """Checkpoint files in the directory, oldest first (temporary files never match)."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and path.is_file():
                found.append(((int(match[1]), int(match[2])), path))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The newest checkpoint file, whether or not it loads."""
        paths = self.checkpoints()
        return paths[-1] if paths else None

    @property
    def best_path(self) -> Path:
        return self.directory / BEST_NAME

    def best_metric(self) -> float | None:
        """The metric of ``best.pt``, or ``None`` if there is none yet."""
        info = self.directory / BEST_INFO_NAME
        if not info.is_file() or not self.best_path.is_file():
            return None
        try:
            return float(json.loads(info.read_text())["metric"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable %s: %s", info, err)
            return None

    def save(self, state: dict, *, epoch: int, step: int, metric: float | None = None) -> Path:
        """Write ``state`` as the checkpoint of (``epoch``, ``step``), drop all but the last
        ``keep_last``, and make it ``best.pt`` if ``metric`` beats the best so far.

        Checkpoints newer than (``epoch``, ``step``) belong to a timeline the run has abandoned
        (it resumed from an earlier one, e.g. because the newest was corrupt): they are deleted
        with a warning, so that "newest" always means this run's latest state.
        """
        self._remove_stale_temporaries()
        path = self.directory / self.filename(epoch, step)
        save_checkpoint(path, state)
        paths = self.checkpoints()
        for newer in paths[paths.index(path) + 1 :]:
            log.warning("deleting %s: newer than %s, which this run just saved", newer, path.name)
            newer.unlink(missing_ok=True)
        if metric is not None and math.isnan(metric):
            log.warning("metric is NaN; %s is not considered for best.pt", path.name)
        elif metric is not None:
            best = self.best_metric()
            if best is None or metric > best:
                self._set_best(path, metric, epoch, step)
        for old in self.checkpoints()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def _set_best(self, path: Path, metric: float, epoch: int, step: int) -> None:
        tmp = self.directory / f"{TMP_PREFIX}{BEST_NAME}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, self.best_path)
        info = {"metric": float(metric), "epoch": int(epoch), "step": int(step), "source": path.name}
        atomic_write(self.directory / BEST_INFO_NAME, lambda f: f.write(json.dumps(info).encode()))
        log.info("new best checkpoint (metric %.6g): %s", metric, path.name)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files left by a writer that crashed (only the saving rank writes here)."""
        if self.directory.is_dir():
            for path in self.directory.glob(f"{TMP_PREFIX}*"):
                path.unlink(missing_ok=True)

    def load_latest(self, map_location: Any = "cpu") -> tuple[dict, Path] | None:
        """The newest checkpoint that loads, and its path; ``None`` if there is no checkpoint.

        A newest file that is truncated or corrupt is skipped with a warning and the previous
        one is tried. If checkpoints exist but none loads, raises :class:`CheckpointError`
        rather than silently restarting from scratch.
        """
        paths = self.checkpoints()
        for path in reversed(paths):
            try:
                return load_checkpoint(path, map_location=map_location), path
            except CheckpointError as err:
                log.warning("skipping checkpoint: %s", err)
        if paths:
            raise CheckpointError(f"{self.directory}: none of {len(paths)} checkpoints loads")
        return None


def rng_state() -> dict:
    """The Python, NumPy (global) and torch CPU/CUDA generator states, loadable with
    ``weights_only=True`` (tensors, ints, floats, strings and lists only)."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "python": {
            "version": int(version),
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's (one device per rank)
    return state


def set_rng_state(state: dict) -> None:
    """Restore generators captured by :func:`rng_state`."""
    try:
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
        np.random.set_state(
            (
                npy["name"],
                npy["keys"].numpy().astype(np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"].cpu())
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"malformed RNG state: {type(err).__name__}: {err}") from err
    cuda_state = state.get("cuda")
    if cuda_state is None:
        return
    if not torch.cuda.is_available():
        log.warning("RNG state includes a CUDA generator but CUDA is not available; not restored")
        return
    torch.cuda.set_rng_state(cuda_state.cpu())
