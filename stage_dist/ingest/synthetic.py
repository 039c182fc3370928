"""A deterministic synthetic AVA-like dataset, written in both published feature layouts.

Owns the generative model and the writers of:

- the **I3D layout**: ``<split>/i3d/actors/<video_id>/<ts:04d>.h5`` (``features`` (n, C, t, h, w),
  ``boxes`` (n, 4), ``labels`` (n, 81) with background column 0) and ``<split>/i3d/objects.h5``
  (``<video_id>_<ts>_features|boxes|cls_prob``, timestamp without leading zeros);
- the **SlowFast layout**: ``<split>/slowfast/features.h5`` (groups ``<clip_number>_<ts>`` with
  ``boxes``, pooled ``features`` (n, C), ``labels`` (n, 80)) and ``<split>/slowfast/videos.txt``
  (clip number = line index; deliberately not sorted);
- the AVA ``<split>/groundtruth.csv`` and ``labelmap.pbtxt`` (real AVA names and ids).

With ``--class-ids`` (one id per class, any ids >= 1) the dataset has a non-AVA class set: the
same classes (AVA names, same generative model), but their ids are the given ones, both layouts'
``labels`` have one column per class in that order (no background column), and
``labelmap.pbtxt`` lists them in column order: the label map the converter's ``--labelmap`` needs.

Both layouts hold the same actors, boxes and labels, and the SlowFast features are exactly the
mean over t, h, w of the I3D features: every feature value lies on a 2**-8 grid and the voxel
deviations of an actor sum to zero exactly, so the float32 mean is exact in any summation order.

The generative model makes three kinds of classes, so that a graph over actors, objects and
adjacent keyframes has something to learn that a per-actor classifier cannot see:

- ``direct``: a class signature is added to the actor's own feature, under strong per-keyframe
  noise (averaging adjacent keyframes helps);
- ``object``: revealed only by an object placed at the actor's hands whose feature carries the
  class signature;
- ``interaction``: an actor has the class iff another actor of the same keyframe *emits* the
  class's cue signature in its own feature (the labelled actor's feature carries nothing of it).

Actions and emissions are two-state Markov chains per actor (they persist for several seconds);
actor identities persist over a clip and boxes move smoothly. Distractor objects with random
features sit away from the actors. Val actor boxes are jittered detections of the true boxes plus
unlabelled false positives; ``groundtruth.csv`` always holds the true boxes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import h5py
import numpy as np
from tqdm import tqdm

from stage_dist.core.config import ConfigError, option, section
from stage_dist.core.errors import UserInputError
from stage_dist.core.paths import check_target, ensure_free_space
from stage_dist.store.schema import NUM_ACTIONS

log = logging.getLogger(__name__)

FIRST_TIMESTAMP = 902
LAST_TIMESTAMP = 1798
NUM_DETECTOR_CLASSES = 81  # columns of an object's cls_prob (detector classes incl. background)
VIDEO_ID_LENGTH = 11
VIDEO_ID_ALPHABET = np.array(
    list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
)
SPLITS = ("train", "val")
OWN_ENTRIES = ("labelmap.pbtxt", "synth.json", *SPLITS)

# Generative constants. Signatures are unit vectors; amplitudes are in units of the per-keyframe
# noise std, i.e. the separation (d') of a class along its signature direction.
FEATURE_GRID = 256.0  # features are multiples of 1 / FEATURE_GRID
ACTOR_NOISE_STD = 1.0  # per dim, independent per keyframe
ACTOR_IDENTITY_STD = 0.3  # per dim, fixed per actor for the whole clip
VOXEL_STD = 0.5  # per dim deviation of each (t, h, w) cell from the pooled mean
DIRECT_SNR = 2.0
EMIT_SNR = 4.0
OBJECT_NOISE_STD = 1.0
OBJECT_SNR = 6.0
OBJECT_CATEGORY_LOGIT = 4.0
ACTION_PRIOR = {"direct": 0.3, "object": 0.25, "interaction": 0.2}  # interaction: emission prior
MEAN_ACTION_SECONDS = 6.0
EMPTY_DISTRACTOR_PROB = 0.35


class SynthError(UserInputError, ValueError):
    """Invalid synthesis request (bad config value or an output directory that is not ours)."""


class SynthAction(NamedTuple):
    """One action class of the synthetic dataset: AVA id, AVA name and how it is revealed."""

    id: int
    name: str
    kind: str  # "direct" | "object" | "interaction"


# AVA v2.1 evaluated classes (ids and names of ava_action_list_v2.1_for_activitynet_2018.pbtxt),
# grouped by the kind that fits their meaning, most frequent first.
_DIRECT = (
    (12, "stand"), (11, "sit"), (14, "walk"), (10, "run/jog"), (8, "lie/sleep"), (4, "dance"),
    (1, "bend/bow (at the waist)"), (3, "crouch/kneel"), (67, "hand clap"), (69, "hand wave"),
    (7, "jump/leap"), (9, "martial art"), (13, "swim"), (20, "climb (e.g., a mountain)"),
    (26, "dress/put on clothing"), (30, "enter"), (5, "fall down"), (6, "get up"),
    (77, "sing to (e.g., self, a person, a group)"),
)
_OBJECT = (
    (17, "carry/hold (an object)"), (27, "drink"), (48, "read"),
    (57, "text on/look at a cellphone"), (29, "eat"), (62, "work on a computer"),
    (61, "watch (e.g., TV)"), (54, "smoke"), (63, "write"), (15, "answer phone"),
    (41, "play musical instrument"), (56, "take a photo"), (28, "drive (e.g., a car, a truck)"),
    (49, "ride (e.g., a bike, a car, a horse)"), (22, "close (e.g., a door, a box)"),
    (38, "open (e.g., a window, a car door)"), (24, "cut"), (34, "hit (an object)"),
    (36, "lift/pick up"), (37, "listen (e.g., to music)"), (43, "point to (an object)"),
    (45, "pull (an object)"), (46, "push (an object)"), (47, "put down"), (51, "sail boat"),
    (52, "shoot"), (58, "throw"), (59, "touch (an object)"), (60, "turn (e.g., a screwdriver)"),
)
_INTERACTION = (
    (79, "talk to (e.g., self, a person, a group)"), (74, "listen to (a person)"),
    (80, "watch (a person)"), (68, "hand shake"), (70, "hug (a person)"),
    (64, "fight/hit (a person)"), (65, "give/serve (an object) to (a person)"),
    (66, "grab (a person)"), (72, "kiss (a person)"), (73, "lift (a person)"),
    (76, "push (another person)"), (78, "take (an object) from (a person)"),
)
MAX_CLASSES = len(_DIRECT) + len(_OBJECT) + len(_INTERACTION)  # 60


def choose_actions(num_classes: int) -> list[SynthAction]:
    """The first ``num_classes`` actions, taking direct, object, interaction classes in turn."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise SynthError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    pools = [
        [SynthAction(i, n, kind) for i, n in group]
        for kind, group in (("direct", _DIRECT), ("object", _OBJECT), ("interaction", _INTERACTION))
    ]
    chosen: list[SynthAction] = []
    while len(chosen) < num_classes:
        for pool in pools:
            if pool and len(chosen) < num_classes:
                chosen.append(pool.pop(0))
    return chosen


@dataclass(frozen=True)
class SynthConfig:
    """What to synthesise. Every field is a CLI flag of ``python -m stage_dist.synth``."""

    seed: int = option(0, help="random seed; the same seed gives identical output")
    train_clips: int = option(16, help="number of train clips (videos)")
    val_clips: int = option(6, help="number of val clips (videos)")
    keyframes_per_clip: int = option(30, help="keyframes per clip, timestamps 902, 903, ... (at most 897)")
    max_actors: int = option(3, help="maximum actors per clip/keyframe (0 gives no actors at all)")
    max_objects: int = option(8, help="maximum objects per keyframe (some keyframes have none)")
    actor_dim: int = option(256, help="channels C of actor features")
    actor_thw: tuple[int, ...] = option((2, 2, 2), help="t h w of the I3D actor tensor (n, C, t, h, w)",
                                        metavar="N")
    object_dim: int = option(512, help="dimension of object features")
    num_classes: int = option(12, help=f"number of action classes used, 1..{MAX_CLASSES} (AVA ids and names)")
    class_ids: tuple[int, ...] | None = option(None, metavar="ID",
                                               help="a non-AVA class set: the id of each of the --num-classes "
                                                    "classes, in label-column order (distinct, >= 1); labels get "
                                                    "one column per class and no background column")
    val_false_positives: float = option(0.15, help="expected extra unlabelled val detection boxes per true box")
    val_jitter: float = option(0.02, help="std of the normalised jitter of val detection boxes")

    def __post_init__(self) -> None:
        checks = {
            "train_clips": self.train_clips >= 1,
            "val_clips": self.val_clips >= 1,
            "keyframes_per_clip": 1 <= self.keyframes_per_clip <= LAST_TIMESTAMP - FIRST_TIMESTAMP + 1,
            "max_actors": self.max_actors >= 0,
            "max_objects": self.max_objects >= 0,
            "actor_dim": self.actor_dim >= 1,
            "actor_thw": len(self.actor_thw) == 3 and all(int(v) >= 1 for v in self.actor_thw),
            "object_dim": self.object_dim >= 1,
            "num_classes": 1 <= self.num_classes <= MAX_CLASSES,
            "val_false_positives": self.val_false_positives >= 0,
            "val_jitter": self.val_jitter >= 0,
            "class_ids": self.class_ids is None or (len(self.class_ids) == self.num_classes
                                                    and len(set(self.class_ids)) == len(self.class_ids)
                                                    and min(self.class_ids) >= 1),
        }
        for name, ok in checks.items():
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} ({name}): invalid value {getattr(self, name)!r}")


@dataclass(frozen=True)
class SynthJob:
    """The command line of ``python -m stage_dist.synth``."""

    out: Path = option(help="output directory (absent, empty, or a previous synth output)")
    log_level: str = option("INFO", help="logging level")
    data: SynthConfig = section(SynthConfig, help="dataset")


@dataclass
class SplitPaths:
    actors_dir: Path  # <root>/<split>/i3d/actors/<video_id>/<ts:04d>.h5
    objects_file: Path  # <root>/<split>/i3d/objects.h5
    slowfast_file: Path  # <root>/<split>/slowfast/features.h5
    video_list: Path  # <root>/<split>/slowfast/videos.txt
    groundtruth_csv: Path  # <root>/<split>/groundtruth.csv

    @classmethod
    def under(cls, split_dir: Path) -> "SplitPaths":
        return cls(
            actors_dir=split_dir / "i3d" / "actors",
            objects_file=split_dir / "i3d" / "objects.h5",
            slowfast_file=split_dir / "slowfast" / "features.h5",
            video_list=split_dir / "slowfast" / "videos.txt",
            groundtruth_csv=split_dir / "groundtruth.csv",
        )


@dataclass
class SplitCounts:
    clips: int = 0
    keyframes: int = 0
    actors: int = 0  # rows in the h5 files (val: detections incl. false positives)
    false_positives: int = 0
    objects: int = 0
    groundtruth_rows: int = 0
    bytes: int = 0


@dataclass
class SynthDataset:
    root: Path
    labelmap: Path  # <root>/labelmap.pbtxt
    splits: dict[str, SplitPaths]  # "train", "val"
    actions: list[SynthAction] = field(default_factory=list)
    counts: dict[str, SplitCounts] = field(default_factory=dict)


# ----------------------------------------------------------------------------- generation


@dataclass
class Signatures:
    """Unit vectors that carry the classes, shared by every split of one seed."""

    actions: list[SynthAction]
    direct: np.ndarray  # (n_direct, C)
    emit: np.ndarray  # (n_interaction, C)
    object: np.ndarray  # (n_object, D)
    object_category: np.ndarray  # (n_object,) detector class of each object class's object
    # Label column of each action id in the generator's labels (column 0 background): AVA's
    # id itself (81 columns), or 1 + its place in --class-ids.
    column: dict[int, int] = field(default_factory=dict)
    label_width: int = NUM_ACTIONS + 1
    custom: bool = False  # --class-ids: labels are written without the background column

    def ids(self, kind: str) -> np.ndarray:
        return np.array([a.id for a in self.actions if a.kind == kind], dtype=np.int64)

    def columns(self, kind: str) -> np.ndarray:
        """The label columns of the ``kind`` actions (AVA: their ids)."""
        return np.array([self.column.get(a.id, a.id) for a in self.actions if a.kind == kind], dtype=np.int64)


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n, dim))
    return signs / np.sqrt(dim)


def make_signatures(config: SynthConfig) -> Signatures:
    rng = np.random.default_rng([config.seed, 0])
    actions = choose_actions(config.num_classes)
    count = {k: sum(a.kind == k for a in actions) for k in ACTION_PRIOR}
    custom: dict = {}
    if config.class_ids is not None:
        actions = [SynthAction(int(i), a.name, a.kind) for a, i in zip(actions, config.class_ids)]
        custom = dict(column={a.id: 1 + j for j, a in enumerate(actions)}, label_width=len(actions) + 1,
                      custom=True)
    return Signatures(
        actions=actions,
        direct=_unit_rows(rng, count["direct"], config.actor_dim),
        emit=_unit_rows(rng, count["interaction"], config.actor_dim),
        object=_unit_rows(rng, count["object"], config.object_dim),
        object_category=rng.integers(1, NUM_DETECTOR_CLASSES, size=count["object"]),
        **custom,
    )


def make_video_ids(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct 11-character AVA-like ids; many start with ``-`` or ``_`` and hold both,
    and some end like ``_9NN`` so that only splitting keys from the right parses them."""
    ids: list[str] = []
    while len(ids) < n:
        chars = list(rng.choice(VIDEO_ID_ALPHABET, VIDEO_ID_LENGTH))
        pattern = len(ids) % 4
        if pattern == 0:
            chars[0], chars[int(rng.integers(2, VIDEO_ID_LENGTH))] = "-", "_"
        elif pattern == 1:
            chars[0], chars[int(rng.integers(2, VIDEO_ID_LENGTH))] = "_", "-"
        elif pattern == 2:
            chars[0] = str(rng.choice(VIDEO_ID_ALPHABET[:52]))
            chars[-4:] = list(f"_{rng.integers(902, 1000)}")
        video_id = "".join(chars)
        if video_id not in ids:
            ids.append(video_id)
    return ids


def markov_chains(
    rng: np.random.Generator, prior: float, shape: tuple[int, ...], steps: int
) -> np.ndarray:
    """Two-state chains with stationary probability ``prior`` of being on: (steps, *shape) bool."""
    p_off = 1.0 / MEAN_ACTION_SECONDS
    p_on = p_off * prior / (1.0 - prior)
    states = np.empty((steps, *shape), dtype=bool)
    state = rng.random(shape) < prior
    draws = rng.random((steps, *shape))
    for k in range(steps):
        if k:
            state = np.where(state, draws[k] >= p_off, draws[k] < p_on)
        states[k] = state
    return states


def presence(rng: np.random.Generator, tracks: int, steps: int, force_gap: bool) -> np.ndarray:
    """(steps, tracks) bool: most actors stay the whole clip, some enter late or leave early;
    some clips (always the first of a split) have a short stretch with no actor at all."""
    present = np.zeros((steps, tracks), dtype=bool)
    for a in range(tracks):
        start, end = 0, steps
        if rng.random() < 0.3:
            cut = int(rng.integers(0, max(1, steps // 2)))
            start, end = (cut, steps) if rng.random() < 0.5 else (0, steps - cut)
        present[start:end, a] = True
    if force_gap or rng.random() < 0.3:
        length = int(rng.integers(1, 4))
        start = int(rng.integers(0, max(1, steps - length + 1)))
        present[start : start + length] = False
    return present


def box_tracks(rng: np.random.Generator, tracks: int, steps: int) -> np.ndarray:
    """(steps, tracks, 4) person boxes moving smoothly, normalised, rounded to 3 decimals."""
    size = np.stack([rng.uniform(0.12, 0.3, tracks), rng.uniform(0.35, 0.8, tracks)], axis=-1)
    centre = rng.uniform(0.2, 0.8, (tracks, 2))
    velocity = np.zeros((tracks, 2))
    scale = np.ones((tracks, 1))
    boxes = np.empty((steps, tracks, 4))
    for k in range(steps):
        velocity = 0.8 * velocity + rng.normal(0.0, 0.01, (tracks, 2))
        scale = np.clip(scale * np.exp(rng.normal(0.0, 0.02, (tracks, 1))), 0.8, 1.2)
        half = size * scale / 2
        centre = np.clip(centre + velocity, half + 0.005, 1 - half - 0.005)
        boxes[k] = np.concatenate([centre - half, centre + half], axis=-1)
    return np.round(boxes, 3)


def quantise(x: np.ndarray) -> np.ndarray:
    return (np.round(x * FEATURE_GRID) / FEATURE_GRID).astype(np.float32)


def valid_box(box: np.ndarray, min_size: float = 0.01) -> np.ndarray:
    """Clip to [0, 1] and make x1 < x2, y1 < y2 with at least ``min_size`` of extent."""
    x1, y1, x2, y2 = np.clip(box, 0.0, 1.0)
    x1, y1 = min(x1, 1 - min_size), min(y1, 1 - min_size)
    return np.array([x1, y1, max(x2, x1 + min_size), max(y2, y1 + min_size)])


def _centres(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


@dataclass
class Keyframe:
    """One keyframe of a clip: the h5 rows (actors, objects) and the true persons (GT CSV)."""

    timestamp: int
    actor_features: np.ndarray  # (n, C) float32 pooled, on the feature grid
    actor_boxes: np.ndarray  # (n, 4) float32
    actor_labels: np.ndarray  # (n, 81) float32, column 0 background (--class-ids: K + 1 columns)
    person_boxes: np.ndarray  # (p, 4) float32 true boxes
    person_labels: np.ndarray  # (p, 81)
    person_ids: np.ndarray  # (p,) int
    object_features: np.ndarray  # (m, D) float32
    object_boxes: np.ndarray  # (m, 4) float32
    object_cls_prob: np.ndarray  # (m, 81) float32
    false_positives: int = 0


@dataclass
class Clip:
    video_id: str
    keyframes: list[Keyframe]


class ClipGenerator:
    """Generates clips of one split; each clip has its own RNG stream, so clips are independent."""

    def __init__(self, config: SynthConfig, signatures: Signatures, split: str):
        self.config = config
        self.sig = signatures
        self.split = split
        self.split_index = SPLITS.index(split)
        # A false positive's feature has the mean of a true actor's (signatures at their
        # priors), so "is this a person" is not linearly visible and cannot stand in for a class.
        self.mean_actor_offset = ACTOR_NOISE_STD * (
            DIRECT_SNR * ACTION_PRIOR["direct"] * signatures.direct.sum(axis=0)
            + EMIT_SNR * ACTION_PRIOR["interaction"] * signatures.emit.sum(axis=0)
        )

    def clip(self, index: int, video_id: str) -> Clip:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 1 + self.split_index, index])
        steps = cfg.keyframes_per_clip
        tracks = cfg.max_actors
        if tracks > 1 and rng.random() < 0.5:
            tracks = int(rng.integers(1, cfg.max_actors + 1))
        present = presence(rng, tracks, steps, force_gap=index == 0)
        boxes = box_tracks(rng, tracks, steps)
        direct, holds, emit, labels = self._actions(rng, present)
        features = self._actor_features(rng, direct, emit)
        grip = rng.uniform([0.1, 0.25, 0.04], [0.9, 0.7, 0.12], (tracks, holds.shape[-1], 3))
        keyframes = []
        for k in range(steps):
            on = np.flatnonzero(present[k])
            keyframes.append(
                self._keyframe(rng, FIRST_TIMESTAMP + k, on, boxes[k], labels[k], features[k],
                               holds[k], grip)
            )
        return Clip(video_id, keyframes)

    def _actions(
        self, rng: np.random.Generator, present: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per (keyframe, actor): direct-class states, held object classes, interaction cues
        emitted (each (steps, tracks, n_kind) bool) and the (steps, tracks, 81) labels."""
        steps, tracks = present.shape
        direct_ids, object_ids, inter_ids = (self.sig.columns(k) for k in ACTION_PRIOR)
        chains = [
            markov_chains(rng, ACTION_PRIOR[kind], (tracks, len(ids)), steps) & present[..., None]
            for kind, ids in zip(ACTION_PRIOR, (direct_ids, object_ids, inter_ids))
        ]
        direct, holds, emit = chains
        self._cap_objects(rng, holds)
        # Interaction: on iff another actor of the same keyframe emits the class's cue.
        others = emit.sum(axis=1, keepdims=True) - emit
        labels = np.zeros((steps, tracks, self.sig.label_width), dtype=np.float32)
        labels[..., direct_ids] = direct
        labels[..., object_ids] = holds
        labels[..., inter_ids] = (others > 0) & present[..., None]
        labels[..., 0] = present & (labels[..., 1:].sum(-1) == 0)
        return direct, holds, emit, labels

    def _actor_features(
        self, rng: np.random.Generator, direct: np.ndarray, emit: np.ndarray
    ) -> np.ndarray:
        """(steps, tracks, C) pooled features: identity + per-keyframe noise + the signatures
        of the actor's direct classes and of the interaction cues it emits."""
        steps, tracks, _ = direct.shape
        dim = self.config.actor_dim
        identity = rng.normal(0.0, ACTOR_IDENTITY_STD, (tracks, dim))
        noise = rng.normal(0.0, ACTOR_NOISE_STD, (steps, tracks, dim))
        return quantise(
            identity
            + noise
            + DIRECT_SNR * ACTOR_NOISE_STD * (direct.astype(float) @ self.sig.direct)
            + EMIT_SNR * ACTOR_NOISE_STD * (emit.astype(float) @ self.sig.emit)
        )

    def _cap_objects(self, rng: np.random.Generator, holds: np.ndarray) -> None:
        """Drop held objects (and their labels) beyond ``max_objects`` in a keyframe."""
        for k in range(holds.shape[0]):
            active = np.argwhere(holds[k])
            excess = len(active) - self.config.max_objects
            if excess > 0:
                for a, c in active[rng.choice(len(active), excess, replace=False)]:
                    holds[k, a, c] = False

    def _keyframe(
        self,
        rng: np.random.Generator,
        timestamp: int,
        on: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        features: np.ndarray,
        holds: np.ndarray,
        grip: np.ndarray,
    ) -> Keyframe:
        cfg = self.config
        person_boxes = boxes[on].astype(np.float32)
        obj_feats, obj_boxes, obj_probs = self._objects(rng, boxes[on], holds[on], grip[on])
        actor_boxes, actor_labels, actor_features = person_boxes, labels[on], features[on]
        false_positives = 0
        if self.split == "val":
            actor_boxes = np.array(
                [valid_box(b + rng.normal(0.0, cfg.val_jitter, 4)) for b in person_boxes],
                dtype=np.float32,
            ).reshape(-1, 4)
            false_positives = int(rng.poisson(cfg.val_false_positives * max(len(on), 1)))
            fp_labels = np.zeros((false_positives, self.sig.label_width), dtype=np.float32)
            fp_labels[:, 0] = 1.0
            fp_boxes = np.array(
                [self._random_person_box(rng) for _ in range(false_positives)], dtype=np.float32
            ).reshape(-1, 4)
            fp_features = quantise(
                rng.normal(0.0, ACTOR_NOISE_STD, (false_positives, cfg.actor_dim))
                + self.mean_actor_offset
            )
            order = rng.permutation(len(on) + false_positives)
            actor_boxes = np.concatenate([actor_boxes, fp_boxes])[order]
            actor_labels = np.concatenate([actor_labels, fp_labels])[order]
            actor_features = np.concatenate([actor_features, fp_features])[order]
        return Keyframe(
            timestamp=timestamp,
            actor_features=actor_features.reshape(-1, cfg.actor_dim),
            actor_boxes=actor_boxes.reshape(-1, 4).astype(np.float32),
            actor_labels=actor_labels.reshape(-1, self.sig.label_width),
            person_boxes=person_boxes.reshape(-1, 4),
            person_labels=labels[on],
            person_ids=on,
            object_features=obj_feats,
            object_boxes=obj_boxes,
            object_cls_prob=obj_probs,
            false_positives=false_positives,
        )

    @staticmethod
    def _random_person_box(rng: np.random.Generator) -> np.ndarray:
        w, h = rng.uniform(0.08, 0.3), rng.uniform(0.2, 0.7)
        x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        return np.array([x, y, x + w, y + h])

    def _objects(
        self, rng: np.random.Generator, boxes: np.ndarray, holds: np.ndarray, grip: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Held objects at the actors' hands (carrying their class's signature) plus distractors
        with random features, placed as far from the actors as a few random draws allow."""
        cfg, sig = self.config, self.sig
        held = np.argwhere(holds)  # (a, object-class index)
        room = cfg.max_objects - len(held)
        distractors = 0
        if room > 0 and rng.random() >= EMPTY_DISTRACTOR_PROB:
            distractors = int(rng.integers(1, room + 1))
        count = len(held) + distractors
        obj_boxes = np.empty((count, 4))
        logits = rng.normal(0.0, 1.0, (count, NUM_DETECTOR_CLASSES))
        obj_feats = rng.normal(0.0, OBJECT_NOISE_STD, (count, cfg.object_dim))
        for i, (a, c) in enumerate(held):
            x1, y1, x2, y2 = boxes[a]
            fx, fy, size = grip[a, c]
            cx, cy = x1 + fx * (x2 - x1), y1 + fy * (y2 - y1)
            half = size / 2
            obj_boxes[i] = valid_box(np.array([cx - half, cy - half, cx + half, cy + half]))
            obj_feats[i] += OBJECT_SNR * OBJECT_NOISE_STD * sig.object[c]
            logits[i, sig.object_category[c]] += OBJECT_CATEGORY_LOGIT
        actor_centres = _centres(boxes)
        for i in range(len(held), count):
            candidates = np.array([self._random_object_box(rng) for _ in range(8)])
            if len(actor_centres):
                gaps = np.linalg.norm(
                    _centres(candidates)[:, None] - actor_centres[None], axis=-1
                ).min(axis=1)
                obj_boxes[i] = candidates[np.argmax(gaps)]
            else:
                obj_boxes[i] = candidates[0]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        order = rng.permutation(count)
        return (
            obj_feats[order].astype(np.float32),
            obj_boxes[order].astype(np.float32),
            probs[order].astype(np.float32),
        )

    @staticmethod
    def _random_object_box(rng: np.random.Generator) -> np.ndarray:
        w, h = rng.uniform(0.04, 0.25, 2)
        x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        return np.array([x, y, x + w, y + h])


def i3d_tensor(rng: np.random.Generator, pooled: np.ndarray, thw: Sequence[int]) -> np.ndarray:
    """(n, C, t, h, w) float32 whose mean over t, h, w is exactly ``pooled`` (on the grid).

    Voxel deviations are ``d - roll(d)`` of integers on the feature grid, so they sum to zero
    exactly and every partial sum is exact in float32."""
    cells = int(np.prod(thw))
    steps = np.round(rng.normal(0.0, VOXEL_STD * FEATURE_GRID, (*pooled.shape, cells)))
    deviation = (steps - np.roll(steps, 1, axis=-1)) / FEATURE_GRID
    tensor = (pooled[..., None].astype(np.float64) + deviation).astype(np.float32)
    return tensor.reshape(*pooled.shape, *thw)


# ----------------------------------------------------------------------------- writing


def _dataset(group: h5py.Group, name: str, data: np.ndarray) -> None:
    group.create_dataset(name, data=data, track_times=False)


def write_labelmap(path: Path, actions: Sequence[SynthAction], in_order: bool = False) -> None:
    """The pbtxt of ``actions``, sorted by id (AVA), or in their order (``in_order``: column order)."""
    items = [f'item {{\n  name: "{a.name}"\n  id: {a.id}\n}}\n' for a in (actions if in_order else sorted(actions))]
    path.write_text("".join(items))


def groundtruth_rows(clip: Clip, action_ids: Sequence[int], columns: dict[int, int] | None = None) -> list[str]:
    """AVA groundtruth rows of a clip; a keyframe with no (person, action) gets ``video,ts``.
    ``columns``: the label column of each action id (default: the id itself, AVA's)."""
    columns = columns or {}
    rows: list[str] = []
    for kf in clip.keyframes:
        before = len(rows)
        for box, labels, person in zip(kf.person_boxes, kf.person_labels, kf.person_ids):
            x1, y1, x2, y2 = box
            for action in action_ids:
                if labels[columns.get(action, action)]:
                    rows.append(
                        f"{clip.video_id},{kf.timestamp:04d},{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f},"
                        f"{action},{person}"
                    )
        if len(rows) == before:
            rows.append(f"{clip.video_id},{kf.timestamp:04d}")
    return rows


def video_list_order(rng: np.random.Generator, n: int) -> np.ndarray:
    """A permutation of clip indices that is not the identity and not sorted by video id."""
    order = rng.permutation(n)
    if n > 1 and (order == np.arange(n)).all():
        order = order[::-1].copy()
    return order


def _directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_split(
    root: Path,
    split: str,
    clips: list[Clip],
    config: SynthConfig,
    action_ids: Sequence[int],
    signatures: Signatures | None = None,
) -> tuple[SplitPaths, SplitCounts]:
    custom = signatures is not None and signatures.custom
    paths = SplitPaths.under(root / split)
    paths.actors_dir.mkdir(parents=True)
    paths.slowfast_file.parent.mkdir(parents=True)
    rng = np.random.default_rng([config.seed, 10 + SPLITS.index(split)])
    order = video_list_order(rng, len(clips))
    # order[i] = clip index of line i; clip_number[c] = line index of clip c
    clip_number = np.argsort(order)
    paths.video_list.write_text("".join(f"{clips[c].video_id}\n" for c in order))
    counts = SplitCounts(clips=len(clips))
    gt_rows: list[str] = []
    with h5py.File(paths.objects_file, "w") as objects, h5py.File(paths.slowfast_file, "w") as sf:
        for index, clip in enumerate(clips):
            clip_dir = paths.actors_dir / clip.video_id
            clip_dir.mkdir()
            voxel_rng = np.random.default_rng([config.seed, 20 + SPLITS.index(split), index])
            for kf in clip.keyframes:
                with h5py.File(clip_dir / f"{kf.timestamp:04d}.h5", "w") as f:
                    tensor = i3d_tensor(voxel_rng, kf.actor_features, config.actor_thw)
                    _dataset(f, "features", tensor)
                    _dataset(f, "boxes", kf.actor_boxes)
                    _dataset(f, "labels", kf.actor_labels[:, 1:] if custom else kf.actor_labels)
                key = f"{clip.video_id}_{kf.timestamp}"
                _dataset(objects, f"{key}_features", kf.object_features)
                _dataset(objects, f"{key}_boxes", kf.object_boxes)
                _dataset(objects, f"{key}_cls_prob", kf.object_cls_prob)
                group = sf.create_group(f"{clip_number[index]}_{kf.timestamp}")
                _dataset(group, "boxes", kf.actor_boxes)
                _dataset(group, "features", kf.actor_features)
                _dataset(group, "labels", kf.actor_labels[:, 1:])
                counts.keyframes += 1
                counts.actors += len(kf.actor_boxes)
                counts.false_positives += kf.false_positives
                counts.objects += len(kf.object_boxes)
            gt_rows.extend(groundtruth_rows(clip, action_ids, signatures.column if signatures else None))
    paths.groundtruth_csv.write_text("".join(f"{row}\n" for row in gt_rows))
    counts.groundtruth_rows = len(gt_rows)
    counts.bytes = _directory_bytes(root / split)
    return paths, counts


def _array_bytes(split_clips: dict[str, list[Clip]], config: SynthConfig) -> int:
    """The bytes of the arrays the splits hold (the files hold them uncompressed, and more)."""
    cells = int(np.prod(config.actor_thw))
    return sum(kf.actor_features.size * 4 * cells + kf.actor_features.nbytes + kf.object_features.nbytes
               + kf.object_cls_prob.nbytes for clips in split_clips.values() for clip in clips for kf in clip.keyframes)


def _prepare_root(root: Path) -> None:
    """Create ``root``, or clear our own previous output there; refuse a directory with
    anything else in it."""
    if root.exists():
        if not root.is_dir():
            raise SynthError(f"{root}: exists and is not a directory")
        foreign = sorted(p.name for p in root.iterdir() if p.name not in OWN_ENTRIES)
        if foreign:
            raise SynthError(
                f"{root}: not empty and not a synth output (found {', '.join(foreign[:5])})"
            )
        for name in OWN_ENTRIES:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    root.mkdir(parents=True, exist_ok=True)


def synthesize(
    out_dir: str | Path, config: SynthConfig = SynthConfig(), *, progress: bool = False
) -> SynthDataset:
    """Write the synthetic dataset under ``out_dir`` and return its paths.

    Deterministic: the same config gives identical arrays and byte-identical text files.
    ``out_dir`` must be absent, empty, or a previous output of this function (replaced)."""
    root = Path(out_dir)
    check_target(root, "--out", kind="dir", inside=OWN_ENTRIES)
    signatures = make_signatures(config)
    action_ids = sorted(a.id for a in signatures.actions)
    video_ids = make_video_ids(
        np.random.default_rng([config.seed, 100]), config.train_clips + config.val_clips
    )
    split_ids = {"train": video_ids[: config.train_clips], "val": video_ids[config.train_clips :]}
    dataset = SynthDataset(root=root, labelmap=root / "labelmap.pbtxt", splits={},
                           actions=signatures.actions)
    split_clips = {}
    for split in SPLITS:  # in memory first: what it will take on disk is known before anything is written
        generator = ClipGenerator(config, signatures, split)
        ids = split_ids[split]
        split_clips[split] = [
            generator.clip(i, vid)
            for i, vid in enumerate(
                tqdm(ids, desc=f"synth {split}", unit="clip", disable=not progress)
            )
        ]
    replaced = sum(_directory_bytes(root / name) if (root / name).is_dir() else 0 for name in SPLITS)
    ensure_free_space(root, _array_bytes(split_clips, config) - replaced, "the arrays")
    _prepare_root(root)
    write_labelmap(dataset.labelmap, signatures.actions, in_order=signatures.custom)
    for split in SPLITS:
        paths, counts = write_split(root, split, split_clips[split], config, action_ids, signatures)
        dataset.splits[split] = paths
        dataset.counts[split] = counts
        log.info("%s: %d clips, %d keyframes, %d actors, %d objects", split, counts.clips,
                 counts.keyframes, counts.actors, counts.objects)
    (root / "synth.json").write_text(
        json.dumps(
            {
                "config": dataclasses.asdict(config),
                "actions": [a._asdict() for a in signatures.actions],
                "counts": {s: dataclasses.asdict(c) for s, c in dataset.counts.items()},
            },
            indent=2,
        )
        + "\n"
    )
    return dataset
