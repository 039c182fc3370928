"""Checkpoints: the one place that writes, reads and validates them, in every accepted format.

Reading: :func:`read_checkpoint` turns a file into a typed :class:`Checkpoint` -- its format
(``"stage_dist"``: written by :mod:`stage_dist.train`; ``"published"``: the published STAGE code's
``{"model_state", "optimizer_state", "epoch", "iteration"}``), the model kind and
:class:`~stage_dist.model.ModelConfig` (for published weights read from the tensors' shapes), the
weights, and the training state when the file holds a run's. Files are loaded with
``torch.load(weights_only=True)``; anything wrong -- missing, not a torch file (a CSV, random
bytes, a zip that is not torch's), truncated, a pickle that would run code, entries missing, a
key the model does not have -- is a one-line :class:`CheckpointError` naming the file, the
project's only checkpoint error. :meth:`Checkpoint.build_model` loads the weights strictly.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch
from torch import nn

from stage_dist.errors import UserInputError
from stage_dist.fileio import TMP_PREFIX, atomic_write
from stage_dist.model import GEOMETRY_DIM, MODEL_KINDS, ModelConfig, ModelConfigError, build_model

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^ckpt_e(\d+)_s(\d+)\.pt$")
BEST_NAME = "best.pt"
BEST_INFO_NAME = "best.json"

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_PROTOCOL = b"\x80"  # the legacy format (the published checkpoints may use it) starts with a pickle

_SCALARS = (str, bytes, bytearray, int, float, bool, complex, type(None))
_OBJECTS = (torch.Tensor, torch.Size, torch.device, torch.dtype)
_CONTAINERS = (list, tuple, set)


class CheckpointError(UserInputError):
    """A checkpoint that cannot be written, read or loaded into the model; the message names the
    file (and the key). The project's only checkpoint error."""


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
    """What a run of :mod:`stage_dist.train` needs besides the weights to continue exactly."""

    optimizer_state: dict
    scheduler_state: dict
    scaler_state: dict | None  # None: saved without an active GradScaler (--amp off/bf16)
    epoch: int
    step: int  # steps of ``epoch`` already taken
    global_step: int
    best_map: float | None
    history: list
    world_size: int
    rng_per_rank: list  # one :func:`rng_state` per rank, in rank order
    train_config: dict


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint of any format the project accepts, read from ``path``.

    ``kind`` is ``"stage_dist"`` (written by :mod:`stage_dist.train`; ``training`` set when it
    holds a run's state) or ``"published"`` (the published STAGE code's ``{"model_state",
    "optimizer_state", "epoch", "iteration"}``: weights only, ``training`` is ``None``, the
    model configuration read from the weights' shapes).
    """

    path: Path
    kind: Literal["stage_dist", "published"]
    model_kind: str  # "stage" | "baseline"
    model_config: ModelConfig
    model_state: dict[str, torch.Tensor]
    training: TrainingState | None

    def build_model(self) -> nn.Module:
        """The model with these weights, loaded strictly (a missing, unexpected or mis-shaped key
        is a :class:`CheckpointError` naming the file and the key)."""
        try:
            model = build_model(self.model_kind, self.model_config)
        except ModelConfigError as err:
            raise CheckpointError(f"{self.path}: unusable model configuration: {err}") from None
        try:
            load_model_state(model, self.model_state)
        except CheckpointError as err:
            raise CheckpointError(f"{self.path}: {err}") from None
        return model


TRAINING_KEYS = ("optimizer_state", "scheduler_state", "scaler_state", "epoch", "step", "global_step", "best_map",
                 "history", "world_size", "rng_per_rank", "train_config")


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Checkpoint:
    """Read a checkpoint file of either format into a :class:`Checkpoint`.

    A missing, foreign (CSV, random bytes, a zip that is not torch's), truncated or unsafe file,
    or one without the entries of either format, raises :class:`CheckpointError` naming it.
    """
    path = Path(path)
    return _parse(_load_file(path, map_location), path)


def _parse(state: dict, path: Path) -> Checkpoint:
    weights = state.get("model_state")
    if not isinstance(weights, dict):
        found = ", ".join(sorted(map(str, state))[:8]) or "nothing"
        raise CheckpointError(f"{path}: not a STAGE checkpoint: no 'model_state' dict of weights (found {found})")
    if "model_config" not in state:
        return Checkpoint(path, "published", "stage", published_model_config(weights, path), weights, None)
    model_kind = state.get("model_kind", "stage")
    if model_kind not in MODEL_KINDS:
        raise CheckpointError(f"{path}: unknown model_kind {model_kind!r} (expected one of {', '.join(MODEL_KINDS)})")
    try:
        config = ModelConfig(**state["model_config"])
    except TypeError as err:
        raise CheckpointError(f"{path}: malformed model_config: {err}") from None
    present = [key for key in TRAINING_KEYS if key in state]
    if not present:
        return Checkpoint(path, "stage_dist", model_kind, config, weights, None)
    missing = [key for key in TRAINING_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete training state: missing {', '.join(missing)}")
    training = TrainingState(**{key: state[key] for key in TRAINING_KEYS})
    if not training.scaler_state:  # a disabled GradScaler saves {}
        training = replace(training, scaler_state=None)
    if len(training.rng_per_rank) != training.world_size:
        raise CheckpointError(f"{path}: {len(training.rng_per_rank)} RNG states for world size {training.world_size}")
    return Checkpoint(path, "stage_dist", model_kind, config, weights, training)


def published_model_config(weights: dict, path: Path | str = "checkpoint") -> ModelConfig:
    """The :class:`ModelConfig` of published STAGE weights, read from the tensors: feature sizes
    from the first head's ``W`` and ``obj_reducer``, the head count from the heads present,
    the classes from ``logits``. Dropout and tau are the published 0.5 and 1."""
    first = weights.get("gat1.attention_0.W")
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        raise CheckpointError(f"{path}: not a STAGE model_state: no 2-D tensor gat1.attention_0.W")
    num_heads = 0
    while f"gat1.attention_{num_heads}.W" in weights:
        num_heads += 1
    actor_dim = int(first.shape[0]) - GEOMETRY_DIM
    reducer = weights.get("obj_reducer.weight")
    object_dim = int(reducer.shape[1]) if isinstance(reducer, torch.Tensor) and reducer.dim() == 2 else actor_dim
    logits = weights.get("logits.weight")
    num_outputs = int(logits.shape[0]) if isinstance(logits, torch.Tensor) and logits.dim() == 2 else 81
    # A missing or mis-shaped key is named by the strict load (Checkpoint.build_model).
    return ModelConfig(actor_dim=actor_dim, object_dim=object_dim, num_heads=num_heads, num_outputs=num_outputs)


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Load ``state_dict`` into ``model`` strictly: any missing, unexpected or mis-shaped key
    raises :class:`CheckpointError` naming it."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    for key in sorted(set(expected) & set(state_dict)):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != expected[key].shape:
            problems.append(f"{key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}")
    if problems:
        raise CheckpointError("state dict does not match the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


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
