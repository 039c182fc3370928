"""Checkpoints: the one place that writes, reads and validates them, in every accepted format.

The layout, defined once: a checkpoint of this project is the model's keys
(:class:`~stage_dist.model.saved_model.SavedModel`: ``model_state``, ``model_kind``, ``model_config``)
followed by the fields of :class:`TrainingState` when it holds a run's state
(:func:`checkpoint_state` writes it; :func:`read_checkpoint` reads it back). The published STAGE
code's ``{"model_state", "optimizer_state", "epoch", "iteration"}`` is read as weights only.

Reading: :func:`read_checkpoint` turns a file into a typed :class:`Checkpoint` -- its format
(``"stage_dist"``: written by :mod:`stage_dist.train`; ``"published"``), the model (kind,
:class:`~stage_dist.model.stage.ModelConfig`, weights; read by :mod:`stage_dist.model.saved_model`, next to
the model), and the training state when the file holds a run's. Files are loaded with
``torch.load(weights_only=True)``; anything wrong -- missing, not a torch file (a CSV, random
bytes, a zip that is not torch's), truncated, a pickle that would run code, entries missing, a
key the model does not have -- is a one-line :class:`CheckpointError` naming the file, the
project's only checkpoint error. :meth:`Checkpoint.build_model` loads the weights strictly;
:func:`load_models` is the models of one or more checkpoints (an ensemble) for given data.

Writing: a checkpoint is a ``dict`` of tensors, numbers, strings, ``None`` and lists/tuples/dicts
of them, so it loads with ``weights_only=True``; :func:`save_checkpoint` refuses anything else
(a ``TypeError`` naming the offending key: a programming error) rather than write a file that
cannot be loaded back. Files are written to a temporary file in the same directory, fsynced and
renamed over the target, so a crash leaves either the old file or the new one, never a partial one.

:class:`CheckpointManager` keeps ``ckpt_e<epoch>_s<step>.pt`` files in one directory (the last
``keep_last`` of them, plus ``best.pt`` by a metric), and finds the newest one that loads.
:func:`rng_state` / :func:`set_rng_state` capture and restore the Python, NumPy and torch
(CPU and the current CUDA device) generators in the same loadable form. Each rank has its own
generators: to resume exactly under DDP, gather every rank's :func:`rng_state` into the
checkpoint and restore each rank's own.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import stat
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from stage_dist.core.errors import CheckpointError
from stage_dist.core.fileio import TMP_PREFIX, atomic_write
from stage_dist.model.saved_model import SavedModel
from stage_dist.store.schema import describe_classes

if TYPE_CHECKING:  # the type only: the model's configuration is read by stage_dist.model.saved_model
    from stage_dist.model.stage import ModelConfig

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^ckpt_e(\d+)_s(\d+)\.pt$")
BEST_NAME = "best.pt"
BEST_INFO_NAME = "best.json"

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_PROTOCOL = b"\x80"  # the legacy format (the published checkpoints may use it) starts with a pickle

_SCALARS = (str, bytes, bytearray, int, float, bool, complex, type(None))
_OBJECTS = (torch.Tensor, torch.Size, torch.device, torch.dtype)
_CONTAINERS = (list, tuple, set)


def _check_loadable(value: Any, key: str) -> None:
    """Raise ``TypeError`` (a programming error) if ``value`` would not load with ``weights_only=True``."""
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
    raise TypeError(
        f"state{key} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
        "cannot load; convert it to tensors, numbers, strings, lists or dicts"
    )


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    if not isinstance(state, dict):
        raise TypeError(f"{path}: a checkpoint must be a dict, got {type(state).__name__}")
    _check_loadable(state, "")
    # Serialised in memory first (one checkpoint's size on the saving rank): torch.save's zip writer
    # turns a failed file write (a full disk) into an opaque RuntimeError; a plain write of the bytes
    # keeps the OSError, which atomic_write reports as NoSpaceError with the previous file kept.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot write checkpoint: {err}") from err


def _load_file(path: Path, map_location: Any = "cpu") -> dict:
    """The dict a checkpoint file holds, read with ``weights_only=True``; every failure is a
    one-line :class:`CheckpointError` naming the file (never torch's advice to load unsafely)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except OSError as err:  # ENAMETOOLONG, ENOTDIR, ELOOP, EACCES: the OS's verdict on the path
        raise CheckpointError(f"{path}: cannot read checkpoint: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read checkpoint: {err.strerror or err}") from None
    if head[:4] != ZIP_MAGIC and head[:1] != PICKLE_PROTOCOL:
        raise CheckpointError(f"{path}: not a torch checkpoint (neither a torch zip archive nor a legacy torch file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: not a plain weights file (its pickle holds objects other than tensors, numbers, "
            "strings, lists and dicts, and loading those could run code)"
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, IndexError, ... on foreign or damaged files
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else "unexpected end of file"
        raise CheckpointError(
            f"{path}: not a loadable torch checkpoint (truncated or corrupt?): {type(err).__name__}: {reason}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint: expected a dict, found {type(state).__name__}")
    return state


@dataclass(frozen=True)
class TrainingState:
    """What a run of :mod:`stage_dist.train` needs besides the weights to continue exactly; its
    fields are the checkpoint's keys, in the order written."""

    optimizer_state: dict
    scheduler_state: dict
    scaler_state: dict | None  # None (read from {}): saved without an active GradScaler (--amp off/bf16)
    epoch: int
    step: int  # steps of ``epoch`` already taken
    global_step: int
    best_map: float | None
    history: list
    world_size: int
    rng_per_rank: list  # one :func:`rng_state` per rank, in rank order
    train_config: dict

    def to_state(self) -> dict[str, Any]:
        """The checkpoint's training keys (the values as they are, not copied)."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], path: Path) -> "TrainingState | None":
        """The training state of a checkpoint's dict; ``None`` if it holds none (a model-only
        file), a :class:`CheckpointError` naming ``path`` if it holds only part of one."""
        keys = [field.name for field in fields(cls)]
        if not any(key in state for key in keys):
            return None
        missing = [key for key in keys if key not in state]
        if missing:
            raise CheckpointError(f"{path}: incomplete training state: missing {', '.join(missing)}")
        training = cls(**{key: state[key] for key in keys})
        if not training.scaler_state:  # a disabled GradScaler saves {}
            training = replace(training, scaler_state=None)
        if len(training.rng_per_rank) != training.world_size:
            raise CheckpointError(f"{path}: {len(training.rng_per_rank)} RNG states for world size "
                                  f"{training.world_size}")
        return training


def checkpoint_state(model: SavedModel, training: TrainingState | None = None) -> dict[str, Any]:
    """The dict a checkpoint of this project holds: the model's keys, then the training state's."""
    return {**model.to_state(), **(training.to_state() if training is not None else {})}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint of any format the project accepts, read from ``path``: its model and, when it
    holds a run's state (only this project's format can), ``training``."""

    path: Path
    model: SavedModel
    training: TrainingState | None

    @property
    def kind(self) -> Literal["stage_dist", "published"]:
        """``"stage_dist"`` (written by :mod:`stage_dist.train`) or ``"published"`` (the published
        STAGE code's: weights only, the model configuration read from the weights' shapes)."""
        return "published" if self.model.published else "stage_dist"

    @property
    def model_kind(self) -> str:
        return self.model.kind

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        return self.model.state

    def build_model(self) -> nn.Module:
        """The model with these weights, loaded strictly (a missing, unexpected or mis-shaped key
        is a :class:`CheckpointError` naming the file and the key)."""
        try:
            return self.model.build()
        except CheckpointError as err:
            raise CheckpointError(f"{self.path}: {err}") from None


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Checkpoint:
    """Read a checkpoint file of either format into a :class:`Checkpoint`.

    A missing, foreign (CSV, random bytes, a zip that is not torch's), truncated or unsafe file,
    or one without the entries of either format, raises :class:`CheckpointError` naming it.
    """
    path = Path(path)
    state = _load_file(path, map_location)
    model = SavedModel.from_state(state, path)
    return Checkpoint(path, model, None if model.published else TrainingState.from_state(state, path))


def read_latest_or_file(path: str | os.PathLike) -> Checkpoint:
    """``path`` itself if it is a file, else the newest checkpoint of the run directory ``path``
    (a run's ``checkpoints/`` directory) that loads."""
    path = Path(path)
    try:
        is_dir = stat.S_ISDIR(path.stat().st_mode)
    except OSError:  # missing, or a path the OS refuses (ENAMETOOLONG ...): read_checkpoint says which
        is_dir = False
    if is_dir:
        found = CheckpointManager(path).load_latest()
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint (ckpt_e*_s*.pt) in this directory")
        return found
    return read_checkpoint(path)


def load_models(checkpoints: Sequence[str | os.PathLike], actor_dim: int, object_dim: int, device: torch.device,
                class_ids: Sequence[int] | None = None, data: str = "the data",
                what: str = "--checkpoint") -> list[nn.Module]:
    """The models of ``checkpoints`` (files of this project or of the published STAGE code, or run
    checkpoint directories: their newest complete checkpoint), on ``device``, for data of
    ``actor_dim``/``object_dim`` features and, if given, the class set ``class_ids`` (a checkpoint
    trained on other classes is refused naming both; ``data`` names the data). Several (an
    ensemble) must have the same class set and feature sizes: a mismatch is a
    :class:`CheckpointError` naming both files. A file that does not load is named after ``what``,
    the flag that gave it."""
    found = [_read_named(checkpoint, what) for checkpoint in checkpoints]
    first = found[0]
    for other in found[1:]:
        mismatch = first.model.incompatible(other.model)
        if mismatch:
            raise CheckpointError(f"{other.path}: cannot be ensembled with {first.path}: {mismatch}")
    config = first.model_config
    if (config.actor_dim, config.object_dim) != (actor_dim, object_dim):
        raise CheckpointError(
            f"{first.path}: the model expects actor/object features of {config.actor_dim}/{config.object_dim} "
            f"dims, the data has {actor_dim}/{object_dim}"
        )
    if class_ids is not None and config.classes != tuple(class_ids):
        raise CheckpointError(
            f"{first.path}: the checkpoint predicts {describe_classes(config.classes)}, {data} holds "
            f"{describe_classes(tuple(class_ids))}; infer with a checkpoint trained on this class set"
        )
    return [checkpoint.build_model().to(device) for checkpoint in found]


def load_model(checkpoint: str | os.PathLike, actor_dim: int, object_dim: int, device: torch.device,
               class_ids: Sequence[int] | None = None, data: str = "the data") -> nn.Module:
    """The model of one checkpoint (:func:`load_models`)."""
    return load_models([checkpoint], actor_dim, object_dim, device, class_ids, data)[0]


def _read_named(path: str | os.PathLike, what: str) -> Checkpoint:
    """:func:`read_latest_or_file`, its one-line error naming the flag ``what``."""
    try:
        return read_latest_or_file(path)
    except CheckpointError as err:
        raise CheckpointError(f"{what} {err}") from None


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

    def load_latest(self, map_location: Any = "cpu") -> Checkpoint | None:
        """The newest checkpoint that loads; ``None`` if there is no checkpoint.

        A newest file that is truncated or corrupt is skipped with a warning and the previous
        one is tried. If checkpoints exist but none loads, raises :class:`CheckpointError`
        rather than silently restarting from scratch.
        """
        paths = self.checkpoints()
        for path in reversed(paths):
            try:
                return read_checkpoint(path, map_location=map_location)
            except CheckpointError as err:
                log.warning("skipping checkpoint: %s", err)
        if paths:
            raise CheckpointError(f"{self.directory}: none of {len(paths)} checkpoints loads")
        return None


def rng_state() -> dict:
    """The Python, NumPy (global) and torch CPU/CUDA generator states, loadable with
    ``weights_only=True`` (tensors, ints, floats, strings and lists only)."""
    version, mt_state, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # a dict only for a bit generator other than the global MT19937
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = numpy_state
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
