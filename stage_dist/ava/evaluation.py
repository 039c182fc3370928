"""Frame-mAP@0.5 on AVA, reproducing the official ActivityNet evaluator (2020 protocol).

``get_ava_performance.py`` with the TensorFlow object-detection ``PascalDetectionEvaluator``
behind it, re-implemented with vectorised numpy (a full-validation-sized results file of ~7M
rows evaluates in ~10 s on 2 cores; see bench/eval_bench.py). The rules, in the order they apply:

1. A keyframe is ``video id + timestamp`` read as a decimal number (``0902`` == ``902.0``).
   Keyframes listed in the exclusions file (``-e``, pre-2020 protocol) are dropped from
   groundtruth and detections.
2. Every keyframe named in the groundtruth is evaluated, including 2-column ``video,ts`` rows
   (a keyframe with no boxes: detections there are false positives). Detections on keyframes
   absent from the groundtruth are ignored.
3. Rows whose action is not in the label map are dropped, then each keyframe keeps at most 50
   detections: rows stream into a min-heap of ``(score, action, y1, x1, y2, x2)`` tuples and
   a row displaces the heap minimum only if its score is strictly greater. The kept rows are
   ordered by descending score (ties: heap order). Detections whose box is not
   ``x1 < x2 and y1 < y2`` are then dropped.
4. Per keyframe and class, detections in that order take the groundtruth box of highest IoU
   (first one on ties; groundtruth ordered by descending 8th column as the official reader
   does, then file order where the official keeps heap order): a true positive if IoU >= 0.5
   and that box is not yet taken, else a false positive.
5. Per class, precision/recall over all keyframes by descending score and VOC all-point AP;
   a class with groundtruth but no detection has AP 0, a class without groundtruth has AP NaN
   and is left out of the mean.

Only the exact official heap replay (needed for ties) runs in Python, on the few keyframes with
a score tie at the 50-detection threshold or with equal scores of one class on different boxes.

Around the official number: AVA's action groups (:class:`ActionGroups`, from the label map's
``label_type`` or AVA's id ranges) and their mAP on every :class:`EvalResult`, and the
:class:`MatchTable` behind the numbers (:func:`evaluate_with_table`), from which
:mod:`stage_dist.ava.statistics` computes bootstrap intervals and paired comparisons.

CLI: ``python -m stage_dist.evaluate -g GT.csv -d results.csv -l LABELMAP.pbtxt [-e EXCL.csv]
[--json OUT.json] [--plot OUT.png] [--bootstrap N [--seed S]]``; ``-d A.csv B.csv ...`` (runs of
one model: mean +- sample std), ``--compare A.csv B.csv`` (paired comparison) or ``--check``
(:mod:`stage_dist.ava.results_check`) instead.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from stage_dist.ava.formats import (
    AvaCsv,
    AvaFormatError,
    PathLike,
    excluded_keys,
    read_detections,
    read_groundtruth,
    read_label_types,
    read_labelmap,
    results_as_read,
    results_rows,
)
from stage_dist.core.fileio import atomic_write

logger = logging.getLogger(__name__)

DETECTIONS_PER_KEYFRAME = 50
IOU_THRESHOLD = 0.5
MAP_KEY = "PascalBoxes_Precision/mAP@0.5IOU"
CLASS_KEY_PREFIX = "PascalBoxes_PerformanceByCategory/AP@0.5IOU/"
MAX_RESAMPLES = 100_000  # --bootstrap: the (resamples x videos) draw table stays small


# AVA's three action groups (the AVA paper's pose / person movement, object manipulation and
# person interaction), named as the v2.2 label map's ``label_type`` names them, and the id
# ranges of the AVA action list that define them when a label map has no types.
AVA_GROUP_RANGES = {"PERSON_MOVEMENT": (1, 14), "OBJECT_MANIPULATION": (15, 63), "PERSON_INTERACTION": (64, 80)}


@dataclass(frozen=True)
class ActionGroups:
    """Action groups of a label map: group name -> class ids, and where the grouping came from.

    ``members`` is empty when the label map has no grouping (``source`` says why).
    """

    members: dict[str, tuple[int, ...]]
    source: str


def action_groups(labelmap: Mapping[int, str], label_types: Mapping[int, str] | None = None,
                  path: PathLike | None = None) -> ActionGroups:
    """The groups of ``labelmap``: from ``label_types`` (the pbtxt's ``label_type``) if every
    class has one, else from AVA's id ranges if every id is in 1..80, else none."""
    where = f" of {os.fspath(path)}" if path is not None else ""
    label_types = label_types or {}
    typed = [class_id for class_id in labelmap if class_id in label_types]
    if typed and len(typed) == len(labelmap):
        members: dict[str, list[int]] = {}
        for class_id in labelmap:
            members.setdefault(label_types[class_id], []).append(class_id)
        return ActionGroups({name: tuple(ids) for name, ids in members.items()}, f"label_type{where}")
    partial = f" (label_type on only {len(typed)} of {len(labelmap)} classes{where})" if typed else ""
    if all(1 <= class_id <= 80 for class_id in labelmap):
        members = {name: [c for c in labelmap if lo <= c <= hi] for name, (lo, hi) in AVA_GROUP_RANGES.items()}
        return ActionGroups({name: tuple(ids) for name, ids in members.items() if ids},
                            "AVA id ranges 1-14, 15-63, 64-80" + partial)
    return ActionGroups({}, f"none: class ids outside AVA's 1..80 and no label_type{where}{partial}")


def read_action_groups(labelmap_path: PathLike) -> ActionGroups:
    """:func:`action_groups` of a label map file (its ``label_type`` fields if it has them)."""
    return action_groups(read_labelmap(labelmap_path), read_label_types(labelmap_path), labelmap_path)


def groups_map(ap_by_id: Mapping[int, float], groups: ActionGroups) -> dict[str, float]:
    """mAP of each group: the mean AP of its classes with groundtruth (NaN if none has any)."""
    return {name: _nanmean(np.array([ap_by_id.get(c, math.nan) for c in ids], dtype=np.float64))
            for name, ids in groups.members.items()}


def _nanmean(values: np.ndarray) -> float:
    """``np.nanmean`` without the all-NaN warning (NaN then)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


@dataclass(frozen=True)
class EvalResult:
    """Frame-mAP@0.5 and per-class AP, with the official metric names in ``metrics``."""

    mean_ap: float
    per_class: dict[str, float]  # class name -> AP (NaN: no groundtruth), label-map order
    ap_by_id: dict[int, float]  # class id -> AP
    metrics: dict[str, float]  # official keys (MAP_KEY, CLASS_KEY_PREFIX + name)
    num_groundtruth_keyframes: int
    num_groundtruth_boxes: int  # (box, action) groundtruth rows evaluated
    num_groundtruth_per_class: dict[int, int] = field(repr=False)
    num_detection_rows: int  # rows read from the detections
    num_evaluated_detections: int  # after the label map, keyframe, 50-cap and box filters
    seconds: float = 0.0
    group_map: dict[str, float] = field(default_factory=dict)  # group name -> mAP (see ActionGroups)
    grouping: str = ""  # where the groups came from (ActionGroups.source)


@dataclass(frozen=True)
class _Detections:
    """Kept detections in the official processing order."""

    keyframe: np.ndarray
    actions: np.ndarray
    boxes: np.ndarray  # x1, y1, x2, y2
    scores: np.ndarray

    def select(self, index: np.ndarray) -> "_Detections":
        return _Detections(self.keyframe[index], self.actions[index], self.boxes[index], self.scores[index])


@dataclass(frozen=True)
class MatchTable:
    """What scoring fixed, per kept detection and per video: enough to re-score any resample of
    the groundtruth's videos without matching again (see :mod:`stage_dist.ava.statistics`).

    Detections are in the official processing order (the order :func:`_per_class_ap` ranks);
    ``gt_counts[v, c]`` is the number of evaluated groundtruth boxes of class id ``c`` in video
    ``videos[v]``. ``videos`` are the groundtruth's videos with an evaluated keyframe.
    """

    videos: list[str]
    class_ids: tuple[int, ...]  # the label map's ids, sorted
    num_classes: int  # the largest class id (AP arrays hold ids 1..num_classes)
    gt_counts: np.ndarray  # (V, num_classes + 1) int64
    video: np.ndarray  # (N,) int64 index into videos
    actions: np.ndarray  # (N,) int64 class id
    scores: np.ndarray  # (N,) float64
    true_positive: np.ndarray  # (N,) bool


def evaluate(
    groundtruth: PathLike | AvaCsv,
    detections: PathLike | AvaCsv,
    labelmap: PathLike | Mapping[int, str],
    exclusions: PathLike | Iterable[str] | None = None,
    *,
    groups: ActionGroups | None = None,
) -> EvalResult:
    """Evaluate AVA detections against groundtruth like the official evaluator.

    Files are paths (or already-read :class:`AvaCsv`, groundtruth with its 8th column as
    scores, see :func:`stage_dist.ava.formats.read_groundtruth` / :func:`~stage_dist.ava.formats.read_detections`);
    ``labelmap`` a pbtxt path or ``{id: name}`` (required: AVA groundtruth files hold all 80
    classes, the protocol evaluates the label map's 60); ``exclusions`` a path or image keys
    (:func:`stage_dist.ava.formats.image_key`). ``groups`` (default: :func:`read_action_groups` of a
    label map path, :func:`action_groups` of a mapping) gives ``EvalResult.group_map``.

    Raises :class:`AvaFormatError` on malformed files and on a groundtruth without rows. Logs a
    warning when nothing can score: no detections, none on a groundtruth keyframe, none of a
    label-map class, or no groundtruth of a label-map class; and when detection timestamps are
    written differently from the groundtruth's (``902`` for ``0902``: they still match).
    """
    return evaluate_with_table(groundtruth, detections, labelmap, exclusions, groups=groups)[0]


def evaluate_with_table(
    groundtruth: PathLike | AvaCsv,
    detections: PathLike | AvaCsv,
    labelmap: PathLike | Mapping[int, str],
    exclusions: PathLike | Iterable[str] | None = None,
    *,
    groups: ActionGroups | None = None,
) -> tuple[EvalResult, MatchTable]:
    """:func:`evaluate`, and the :class:`MatchTable` behind its numbers."""
    start = time.perf_counter()
    if groups is None:
        groups = action_groups(labelmap) if isinstance(labelmap, Mapping) else read_action_groups(labelmap)
    if not isinstance(labelmap, Mapping):
        labelmap = read_labelmap(labelmap)
    excluded = excluded_keys(exclusions)
    gt = groundtruth if isinstance(groundtruth, AvaCsv) else read_groundtruth(groundtruth)
    det = detections if isinstance(detections, AvaCsv) else read_detections(detections)
    logger.info("read %d groundtruth and %d detection rows in %.2f s",
                gt.num_rows, det.num_rows, time.perf_counter() - start)
    if not gt.keys:
        raise AvaFormatError(gt.path, None, "the groundtruth has no rows: nothing to evaluate")
    if not labelmap or min(labelmap) < 1:
        raise ValueError(f"label map needs class ids >= 1, got {sorted(labelmap)}")

    num_classes = max(labelmap)
    in_labelmap = np.zeros(num_classes + 1, dtype=bool)
    in_labelmap[list(labelmap)] = True
    included = np.array([key not in excluded for key in gt.keys], dtype=bool)

    gt_rows = np.flatnonzero(_known_class(gt.actions, in_labelmap) & included[gt.keyframe])
    num_gt = np.bincount(gt.actions[gt_rows], minlength=num_classes + 1)
    kept = _capped_detections(det, gt, included, in_labelmap)
    _warn_if_nothing_scores(gt, det, gt_rows, kept, in_labelmap)
    warn_if_spelled_differently(gt, det)
    kept = kept.select((kept.boxes[:, 0] < kept.boxes[:, 2]) & (kept.boxes[:, 1] < kept.boxes[:, 3]))
    true_positive = _match(kept, gt, gt_rows, num_classes)

    ap_by_index = _per_class_ap(kept, true_positive, num_gt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all classes NaN -> NaN mean
        mean_ap = float(np.nanmean(ap_by_index))

    ap_by_id = {class_id: float(ap_by_index[class_id - 1]) for class_id in sorted(labelmap)}
    per_class = {labelmap[class_id]: ap for class_id, ap in ap_by_id.items()}
    metrics = {MAP_KEY: mean_ap, **{CLASS_KEY_PREFIX + name: ap for name, ap in per_class.items()}}
    seconds = time.perf_counter() - start
    logger.info("frame-mAP@0.5 %.6f in %.2f s", mean_ap, seconds)
    result = EvalResult(
        mean_ap=mean_ap,
        per_class=per_class,
        ap_by_id=ap_by_id,
        metrics=metrics,
        num_groundtruth_keyframes=int(included.sum()),
        num_groundtruth_boxes=len(gt_rows),
        num_groundtruth_per_class={c: int(num_gt[c]) for c in sorted(labelmap)},
        num_detection_rows=det.num_rows,
        num_evaluated_detections=len(kept.scores),
        seconds=seconds,
        group_map=groups_map(ap_by_id, groups),
        grouping=groups.source,
    )
    return result, _match_table(gt, gt_rows, included, kept, true_positive, labelmap, num_classes)


def _match_table(gt: AvaCsv, gt_rows: np.ndarray, included: np.ndarray, kept: _Detections, true_positive: np.ndarray,
                 labelmap: Mapping[int, str], num_classes: int) -> MatchTable:
    key_video = [key.rsplit(",", 1)[0] for key in gt.keys]
    videos = sorted({key_video[i] for i in np.flatnonzero(included).tolist()})
    video_index = {video: v for v, video in enumerate(videos)}
    keyframe_video = np.array([video_index.get(video, -1) for video in key_video], dtype=np.int64)
    gt_counts = np.zeros((len(videos), num_classes + 1), dtype=np.int64)
    np.add.at(gt_counts, (keyframe_video[gt.keyframe[gt_rows]], gt.actions[gt_rows]), 1)
    return MatchTable(videos=videos, class_ids=tuple(sorted(labelmap)), num_classes=num_classes,
                      gt_counts=gt_counts, video=keyframe_video[kept.keyframe], actions=kept.actions,
                      scores=kept.scores, true_positive=true_positive)


def evaluate_predictions(
    groundtruth: PathLike | AvaCsv,
    labelmap: PathLike | Mapping[int, str],
    video_ids: Sequence[str] | np.ndarray,
    timestamps: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    exclusions: PathLike | Iterable[str] | None = None,
    class_ids: Iterable[int] | None = None,
    topk: int | None = None,
    min_score: float = 0.0,
    column_ids: Sequence[int] | None = None,
    groups: ActionGroups | None = None,
) -> EvalResult:
    """Evaluate predictions held in memory, without writing and reading a results.csv.

    The predictions are what :func:`stage_dist.ava.formats.write_results_csv` takes: per box its video
    id, whole-second timestamp, ``x1, y1, x2, y2`` and a row of scores (column ``j`` = class id
    ``column_ids[j]``, default ``j + 1``), with the same ``class_ids`` / ``topk`` / ``min_score``
    selection. The result is
    the one :func:`evaluate` gives for the file ``write_results_csv`` writes from the same
    arguments, bit for bit (rows in the file's order, boxes and scores rounded as written to
    3 and 6 decimals) except ``seconds``. Per-row data stays in numpy arrays (a full AVA val
    set is ~9.5M rows); only the keyframe keys are Python strings. A ``min_score`` above every
    score is logged as a warning (by the row selection, as when writing the file).
    """
    rows = results_rows(video_ids, timestamps, boxes, scores, class_ids=class_ids, topk=topk, min_score=min_score,
                        column_ids=column_ids)
    detections = results_as_read(rows)
    del rows  # its per-row arrays are not needed any more (~40 bytes a row)
    return evaluate(groundtruth, detections, labelmap, exclusions, groups=groups)


def _warn_if_nothing_scores(gt: AvaCsv, det: AvaCsv, gt_rows: np.ndarray, kept: _Detections,
                            in_labelmap: np.ndarray) -> None:
    """A warning for each way the detections cannot score at all (the numbers stay correct)."""
    if not len(gt_rows):
        logger.warning("%s: no groundtruth box has an action of the label map (every AP is NaN)", gt.path)
    if det.num_rows == 0:
        logger.warning("%s: no detections: every class with groundtruth has AP 0", det.path)
    elif not len(kept.scores):
        gt_keys = set(gt.keys)
        on_gt = sum(1 for key in det.keys if key in gt_keys)
        if on_gt == 0:
            logger.warning("%s: none of the %d detection keyframes is a groundtruth keyframe (other videos or "
                           "timestamps?): every class with groundtruth has AP 0", det.path, len(det.keys))
        elif not _known_class(det.actions, in_labelmap).any():
            logger.warning("%s: no detection has an action id of the label map: every class with groundtruth "
                           "has AP 0", det.path)


def timestamp_spellings(gt: AvaCsv, det: AvaCsv) -> list[tuple[str, str, str]]:
    """(key, detection spelling, groundtruth spelling) of every detection keyframe whose
    timestamp matches a groundtruth keyframe only as a number (``902`` vs ``0902``) on some of
    its rows (the first such spelling)."""
    if gt.stamp_text is None or det.stamp_text is None:
        return []
    gt_index = {key: i for i, key in enumerate(gt.keys)}
    others = det.other_stamp_text or {}
    out = []
    for k, (key, text) in enumerate(zip(det.keys, det.stamp_text)):
        i = gt_index.get(key)
        if i is None:
            continue
        if gt.stamp_text[i] != text:
            out.append((key, text, gt.stamp_text[i]))
        elif k in others:  # the first rows are written as the groundtruth is, later ones not
            out.append((key, others[k], gt.stamp_text[i]))
    return out


def warn_if_spelled_differently(gt: AvaCsv, det: AvaCsv) -> None:
    """A warning when timestamps match the groundtruth only after reading them as numbers."""
    spelled = timestamp_spellings(gt, det)
    if spelled:
        key, text, gt_text = spelled[0]
        logger.warning("%s: %d keyframes have timestamps written differently from %s (first: %s written %r, "
                       "groundtruth %r); they are matched as numbers here, tools that compare the text "
                       "would score nothing", det.path, len(spelled), gt.path, key.rsplit(",", 1)[0], text, gt_text)


def _known_class(actions: np.ndarray, in_labelmap: np.ndarray) -> np.ndarray:
    inside = (actions >= 0) & (actions < len(in_labelmap))
    return inside & in_labelmap[np.where(inside, actions, 0)]


# ---------------------------------------------------------------------------------------------
# 50 detections per keyframe
# ---------------------------------------------------------------------------------------------


def _capped_detections(det: AvaCsv, gt: AvaCsv, included: np.ndarray, in_labelmap: np.ndarray) -> _Detections:
    """Detections kept by the label map, the keyframe rules and the 50 cap, in official order.

    The official order is: keyframes by their first (label-map) row in the file, then within a
    keyframe by descending score, ties in heap order. Ties only matter at the cap threshold and
    between equal scores of one class on different boxes; those keyframes are replayed exactly.
    """
    gt_index = {key: i for i, key in enumerate(gt.keys)}
    to_gt = np.array([gt_index.get(key, -1) for key in det.keys], dtype=np.int64)
    keyframe = to_gt[det.keyframe] if det.num_rows else np.empty(0, dtype=np.int64)
    rows = np.flatnonzero(
        _known_class(det.actions, in_labelmap) & (keyframe >= 0) & included[np.maximum(keyframe, 0)]
    )
    keyframe, scores = keyframe[rows], det.scores[rows]

    by_score = np.argsort(-scores)  # tie order is irrelevant here (see above)
    order = by_score[_stable_argsort_small(keyframe[by_score])]
    sorted_key, sorted_score = keyframe[order], scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]]) if len(order) else order
    counts = np.diff(np.append(starts, len(order)))
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    keep = rank < DETECTIONS_PER_KEYFRAME
    replay = _keyframes_with_ties(sorted_key[keep], sorted_score[keep], det, rows[order[keep]])
    # the 51st row scores as much as the 50th: more tied rows than places, the heap decides
    over = starts[counts > DETECTIONS_PER_KEYFRAME] + DETECTIONS_PER_KEYFRAME
    replay = np.union1d(replay, sorted_key[over[sorted_score[over] == sorted_score[over - 1]]])

    fast = keep & ~np.isin(sorted_key, replay)
    picked = rows[order[fast]]
    parts = [(sorted_key[fast], rank[fast], det.actions[picked], det.boxes[picked], det.scores[picked])]
    if len(replay):
        parts.append(_replay_heaps(replay, keyframe, rows, det))
    key_all, position, actions, boxes, kept_scores = (np.concatenate(p) for p in zip(*parts))

    first_row = np.full(len(gt.keys), len(rows), dtype=np.int64)
    np.minimum.at(first_row, keyframe, np.arange(len(rows)))
    official = np.argsort(first_row[key_all] * DETECTIONS_PER_KEYFRAME + position)  # unique keys
    return _Detections(key_all, actions, boxes, kept_scores).select(official)


def _stable_argsort_small(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative integers < 2**32 by 16-bit radix passes."""
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    if len(keys) and keys.max() >= 1 << 16:
        order = order[np.argsort((keys[order] >> 16).astype(np.uint16), kind="stable")]
    return order


def _keyframes_with_ties(keyframe: np.ndarray, scores: np.ndarray, det: AvaCsv, rows: np.ndarray) -> np.ndarray:
    """Keyframes where one class has equal scores on different boxes (their order matters).

    ``keyframe``/``scores`` are sorted by keyframe then score, so equal scores are adjacent.
    """
    equal = (keyframe[1:] == keyframe[:-1]) & (scores[1:] == scores[:-1])
    tied = np.flatnonzero(np.r_[equal, False] | np.r_[False, equal])
    if not len(tied):
        return np.empty(0, dtype=np.int64)
    key, score, action, box = keyframe[tied], scores[tied], det.actions[rows[tied]], det.boxes[rows[tied]]
    order = np.lexsort((action, score, key))
    key, score, action, box = key[order], score[order], action[order], box[order]
    same = (key[1:] == key[:-1]) & (score[1:] == score[:-1]) & (action[1:] == action[:-1])
    return np.unique(key[1:][same & (box[1:] != box[:-1]).any(axis=1)])


def _replay_heaps(replayed: np.ndarray, keyframe: np.ndarray, rows: np.ndarray,
                  det: AvaCsv) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The official reader's heap, replayed row by row for the ``replayed`` keyframes.

    ``keyframe[i]`` is the keyframe of detection row ``rows[i]`` (file order). Returns
    keyframe, position in the keyframe, action, box and score of every kept row.
    """
    selected = np.isin(keyframe, replayed)
    out_key: list[int] = []
    out_position: list[int] = []
    out_tuples: list[tuple] = []
    heaps: dict[int, list[tuple]] = {}
    boxes = det.boxes[rows[selected]]
    for key, score, action, (x1, y1, x2, y2) in zip(
        keyframe[selected].tolist(), det.scores[rows[selected]].tolist(),
        det.actions[rows[selected]].tolist(), boxes.tolist(),
    ):
        heap = heaps.setdefault(key, [])
        item = (score, action, y1, x1, y2, x2)
        if len(heap) < DETECTIONS_PER_KEYFRAME:
            heapq.heappush(heap, item)
        elif score > heap[0][0]:
            heapq.heapreplace(heap, item)
    for key, heap in heaps.items():
        ranked = sorted(heap, key=lambda item: -item[0])
        out_key += [key] * len(ranked)
        out_position += range(len(ranked))
        out_tuples += ranked
    items = np.array(out_tuples, dtype=np.float64).reshape(-1, 6)
    return (
        np.array(out_key, dtype=np.int64),
        np.array(out_position, dtype=np.int64),
        items[:, 1].astype(np.int64),
        items[:, [3, 2, 5, 4]],
        items[:, 0],
    )


# ---------------------------------------------------------------------------------------------
# Matching and AP
# ---------------------------------------------------------------------------------------------


def _iou(det_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """Row-wise IoU of paired boxes, with the official arithmetic (no +1)."""
    height = np.maximum(
        0.0, np.minimum(det_boxes[:, 3], gt_boxes[:, 3]) - np.maximum(det_boxes[:, 1], gt_boxes[:, 1])
    )
    width = np.maximum(
        0.0, np.minimum(det_boxes[:, 2], gt_boxes[:, 2]) - np.maximum(det_boxes[:, 0], gt_boxes[:, 0])
    )
    intersection = height * width

    def area(b: np.ndarray) -> np.ndarray:
        return (b[:, 3] - b[:, 1]) * (b[:, 2] - b[:, 0])

    with np.errstate(divide="ignore", invalid="ignore"):
        return intersection / (area(det_boxes) + area(gt_boxes) - intersection)


def _match(kept: _Detections, gt: AvaCsv, gt_rows: np.ndarray, num_classes: int) -> np.ndarray:
    """True-positive flag of every kept detection (greedy, no second choice)."""
    width = num_classes + 1
    gt_code = gt.keyframe[gt_rows] * width + gt.actions[gt_rows]
    gt_order = gt_rows[np.lexsort((gt_rows, -gt.scores[gt_rows], gt_code))]
    gt_code = gt.keyframe[gt_order] * width + gt.actions[gt_order]
    det_code = kept.keyframe * width + kept.actions
    det_order = np.argsort(det_code, kind="stable")  # processing order within each group
    det_code = det_code[det_order]

    first = np.searchsorted(gt_code, det_code, side="left")
    counts = np.searchsorted(gt_code, det_code, side="right") - first
    pair_start = np.cumsum(counts) - counts
    pair_det = np.repeat(np.arange(len(det_code)), counts)
    local = np.arange(counts.sum()) - pair_start[pair_det]
    pair_gt = first[pair_det] + local
    iou = _iou(kept.boxes[det_order[pair_det]], gt.boxes[gt_order[pair_gt]])

    true_positive = np.zeros(len(det_code), dtype=bool)
    has_gt = np.flatnonzero(counts > 0)
    if len(has_gt):
        best = np.maximum.reduceat(iou, pair_start[has_gt])
        is_best = iou == np.repeat(best, counts[has_gt])
        best_local = np.minimum.reduceat(np.where(is_best, local, len(iou)), pair_start[has_gt])
        candidate = best >= IOU_THRESHOLD
        chosen = first[has_gt] + best_local
        _, first_claim = np.unique(chosen[candidate], return_index=True)
        true_positive[has_gt[np.flatnonzero(candidate)[first_claim]]] = True
    flags = np.zeros(len(det_code), dtype=bool)
    flags[det_order] = true_positive
    return flags


def _per_class_ap(kept: _Detections, true_positive: np.ndarray, num_gt: np.ndarray) -> np.ndarray:
    """AP of class ids 1..len(num_gt) - 1 (NaN without groundtruth), official array order."""
    ap = np.full(len(num_gt) - 1, np.nan)
    by_class = _stable_argsort_small(kept.actions)  # keeps the official order within a class
    bounds = np.searchsorted(kept.actions[by_class], np.arange(len(num_gt) + 1))
    for class_id in np.flatnonzero(num_gt).tolist():
        rows = by_class[bounds[class_id]:bounds[class_id + 1]]
        ap[class_id - 1] = _average_precision(kept.scores[rows], true_positive[rows], int(num_gt[class_id]))
    return ap


def _average_precision(scores: np.ndarray, true_positive: np.ndarray, num_gt: int) -> float:
    """VOC all-point AP, computed step by step as the official metrics module does."""
    if not len(scores):
        return 0.0
    ranked = true_positive[np.argsort(scores)[::-1]].astype(int)
    cum_tp = np.cumsum(ranked)
    cum_fp = np.cumsum(1 - ranked)
    precision = cum_tp.astype(float) / (cum_tp + cum_fp)
    recall = cum_tp.astype(float) / num_gt
    recall = np.concatenate([[0], recall, [1]])
    precision = np.concatenate([[0], precision, [0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


GROUP_MAP_KEY = "group_mAP@0.5IOU"  # added to the metrics JSON next to the official keys
GROUP_SOURCE_KEY = "group_source"


def group_label(name: str) -> str:
    """A group name as printed: ``PERSON_MOVEMENT`` -> ``person movement``."""
    return name.lower().replace("_", " ")


def group_line(group_map: Mapping[str, float], grouping: str) -> str:
    """One line with every group's mAP and where the grouping came from."""
    if not group_map:
        return f"group mAP: no groups ({grouping})"
    shown = ", ".join(f"{group_label(name)} {'n/a' if math.isnan(value) else f'{value:.4f}'}"
                      for name, value in group_map.items())
    return f"group mAP ({grouping}): {shown}"


def format_table(result: EvalResult, labelmap: Mapping[int, str], *, extra: Sequence[str] = ()) -> str:
    """mAP line, the group-mAP line, ``extra`` lines (e.g. intervals) and a per-class AP table
    (id, AP or n/a, #groundtruth, name)."""
    with_gt = sum(1 for ap in result.ap_by_id.values() if not math.isnan(ap))
    lines = [
        f"frame-mAP@{IOU_THRESHOLD}: {result.mean_ap:.4f}  ({with_gt} of {len(labelmap)} classes "
        f"with groundtruth, {result.num_groundtruth_keyframes} keyframes, "
        f"{result.num_evaluated_detections} of {result.num_detection_rows} detections evaluated)",
        group_line(result.group_map, result.grouping),
        *extra,
        f"{'id':>4}  {'AP':>6}  {'#gt':>6}  class",
    ]
    for class_id, ap in result.ap_by_id.items():
        shown = "   n/a" if math.isnan(ap) else f"{ap:6.4f}"
        gt_count = result.num_groundtruth_per_class[class_id]
        lines.append(f"{class_id:>4}  {shown}  {gt_count:>6}  {labelmap[class_id]}")
    return "\n".join(lines)


def _json_value(value):
    """NaN as null, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_value(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def metrics_json(result: EvalResult, extra: Mapping[str, object] | None = None) -> dict:
    """The official metrics dict, plus the group mAP (``GROUP_MAP_KEY``, ``GROUP_SOURCE_KEY``)
    and ``extra`` keys (e.g. ``bootstrap``); NaN as None."""
    return _json_value({**result.metrics, GROUP_MAP_KEY: dict(result.group_map),
                        GROUP_SOURCE_KEY: result.grouping, **(extra or {})})


def write_json(data: Mapping[str, object], path: PathLike) -> None:
    """``data`` as JSON (sorted keys), written atomically."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))


def write_metrics_json(result: EvalResult, path: PathLike, extra: Mapping[str, object] | None = None) -> None:
    """The official metrics (sorted keys, NaN written as null, values as computed) plus the group
    mAP and ``extra`` keys (:func:`metrics_json`), written atomically."""
    write_json(metrics_json(result, extra), path)


_GROUP_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:olive")


def plot_per_class_ap(result: EvalResult, path: PathLike, groups: ActionGroups | None = None) -> None:
    """Horizontal bar chart of per-class AP (classes with groundtruth) with the mAP line; bars
    coloured by action group, each group's mAP in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    members = groups.members if groups is not None else {}
    names = list(members)
    group_of = {class_id: g for g, name in enumerate(names) for class_id in members[name]}
    ids = [c for c, ap in result.ap_by_id.items() if not math.isnan(ap)]
    id_names = {c: name for c, name in zip(result.ap_by_id, result.per_class)}
    colours = [_GROUP_COLOURS[group_of[c] % len(_GROUP_COLOURS)] if c in group_of else "tab:gray" for c in ids]
    height = max(3.0, 0.22 * len(ids) + 1.2)
    fig, ax = plt.subplots(figsize=(10.5 if names else 8, height))
    ax.barh(range(len(ids)), [result.ap_by_id[c] for c in ids], color=colours)
    ax.set_yticks(range(len(ids)), [id_names[c] for c in ids], fontsize=7)
    ax.set_ylim(len(ids) - 0.5, -0.5)
    ax.axvline(result.mean_ap, color="tab:red", linestyle="--")
    if names:
        handles = [Patch(color=_GROUP_COLOURS[g % len(_GROUP_COLOURS)],
                         label=f"{group_label(name)}: mAP " + ("n/a" if math.isnan(result.group_map.get(name, math.nan))
                                                                else f"{result.group_map[name]:.4f}"))
                   for g, name in enumerate(names)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
                  title=f"action groups\n({result.grouping})", title_fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"AP@{IOU_THRESHOLD} IoU (dashed: mean)")
    ax.set_title(f"AVA frame-AP per class, mAP {result.mean_ap:.4f}")
    fig.tight_layout()
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(fig)


@dataclass(frozen=True)
class CliOutput:
    """What one CLI mode prints and writes."""

    text: str
    json: Mapping[str, object]
    plot: tuple[EvalResult, ActionGroups] | None = None  # what --plot draws (one -d only)

    def write_json(self, path: PathLike) -> None:
        write_json(self.json, path)

    def write_plot(self, path: PathLike) -> None:
        assert self.plot is not None, "--plot is refused for this mode by EvaluateConfig"
        plot_per_class_ap(self.plot[0], path, self.plot[1])
