"""``python -m stage_dist.evaluate --check``: what is wrong with a detections file, all at once.

The evaluator scores whatever it can and stops at the first malformed row; this module reads a
detections file against its groundtruth and label map without scoring and reports every
problem class with its count and first example (rows are counted in file order, 1 = the first
row): keyframes absent from the groundtruth, groundtruth keyframes without detections, action
ids outside the label map, boxes outside [0, 1], duplicate (box, class) rows of one keyframe,
and keyframes whose timestamp (or video id) matches the groundtruth only after reformatting:
written differently but equal as numbers (``902`` / ``902.0`` for ``0902``: this evaluator
matches them, tools comparing text do not), or equal only after rounding the timestamp or
stripping spaces around the video id (nothing matches them). A malformed file is still an
:class:`~stage_dist.ava.formats.AvaFormatError` (one line naming file and line).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable, Mapping

import numpy as np

from stage_dist.ava.evaluation import timestamp_spellings
from stage_dist.ava.formats import (
    PathLike,
    excluded_keys,
    image_key,
    read_detections,
    read_groundtruth,
)


@dataclass(frozen=True)
class Problem:
    """One problem class: how many, of what, and the first example."""

    what: str
    count: int
    unit: str
    example: str


@dataclass(frozen=True)
class CheckReport:
    detections: str
    groundtruth: str
    num_rows: int
    num_keyframes: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def format(self) -> str:
        head = (f"check of {self.detections} ({self.num_rows} rows, {self.num_keyframes} keyframes) against "
                f"{self.groundtruth}: ")
        if self.clean:
            return head + "no problems"
        lines = [head + (f"{len(self.problems)} kinds of problem" if len(self.problems) > 1 else "1 kind of problem")]
        lines += [f"  {p.what}: {p.count} {p.unit}; first: {p.example}" for p in self.problems]
        return "\n".join(lines)


def _video(key: str) -> str:
    return key.rsplit(",", 1)[0]


def check(groundtruth: PathLike, detections: PathLike, labelmap: Mapping[int, str],
          exclusions: PathLike | Iterable[str] | None = None) -> CheckReport:
    """Every problem of ``detections`` against ``groundtruth`` and ``labelmap`` (nothing scored)."""
    gt, det = read_groundtruth(groundtruth), read_detections(detections)
    excluded = excluded_keys(exclusions)
    gt_keys = {key for key in gt.keys if key not in excluded}
    problems: list[Problem] = []

    def row_text(i: int) -> str:
        key = det.keys[det.keyframe[i]]
        stamp = det.stamp_text[det.keyframe[i]] if det.stamp_text else key.rsplit(",", 1)[1]
        box = ",".join(f"{v:g}" for v in det.boxes[i])
        return f"row {i + 1}: {_video(key)},{stamp},{box},{det.actions[i]},{det.scores[i]:g}"

    first_row = np.full(len(det.keys), -1, dtype=np.int64)
    if det.num_rows:
        rows_rev = np.arange(det.num_rows)[::-1]
        first_row[det.keyframe[rows_rev]] = rows_rev
    rows_per_key = np.bincount(det.keyframe, minlength=len(det.keys))

    # keyframes that are not in the groundtruth (and which of them only formatting separates)
    outside = [k for k, key in enumerate(det.keys) if key not in gt_keys and key not in excluded]
    if outside:
        k = outside[0]
        problems.append(Problem("keyframes not in the groundtruth", len(outside),
                                f"keyframes ({int(rows_per_key[outside].sum())} rows)", row_text(int(first_row[k]))))
    gt_spelling = {key: f"{_video(key)},{text}" for key, text in zip(gt.keys, gt.stamp_text or ())}
    reformatted = []
    for k in outside:
        video, stamp = _video(det.keys[k]), det.keys[k].rsplit(",", 1)[1]
        try:
            rounded = image_key(video.strip(), str(Decimal(stamp).to_integral_value()))
        except (ValueError, ArithmeticError):  # e.g. 1e400: no whole second to round to
            continue
        if rounded in gt_keys:
            reformatted.append((k, gt_spelling.get(rounded, rounded)))
    spelled = timestamp_spellings(gt, det)
    if spelled:
        key, text, gt_text = spelled[0]
        det_index = {key: k for k, key in enumerate(det.keys)}
        k = det_index[key]
        where = (f"({row_text(int(first_row[k]))})" if det.stamp_text and det.stamp_text[k] == text
                 else "(on some of its rows; its first rows are written as the groundtruth)")
        problems.append(Problem(
            "timestamps written differently from the groundtruth (matched here as numbers; tools comparing "
            "text score nothing)", len(spelled), "keyframes",
            f"{_video(key)} written {text!r}, groundtruth {gt_text!r} {where}"))
    if reformatted:
        k, target = reformatted[0]
        problems.append(Problem(
            "keyframes that match the groundtruth only after rounding the timestamp or stripping spaces from "
            "the video id (not scored)", len(reformatted), "keyframes",
            f"{row_text(int(first_row[k]))} would be groundtruth keyframe {target!r}"))

    # groundtruth keyframes without any detection
    with_detections = set(det.keys)
    missing = [k for k, key in enumerate(gt.keys) if key in gt_keys and key not in with_detections]
    if missing:
        k = missing[0]
        stamp = gt.stamp_text[k] if gt.stamp_text else gt.keys[k].rsplit(",", 1)[1]
        problems.append(Problem("groundtruth keyframes with no detections", len(missing), "keyframes",
                                f"{_video(gt.keys[k])},{stamp}"))

    # per row: classes, boxes, duplicates
    known = np.zeros(max(max(labelmap), int(det.actions.max(initial=0))) + 1, dtype=bool)
    known[list(labelmap)] = True
    inside = (det.actions >= 0) & (det.actions < len(known))
    unknown = np.flatnonzero(~(inside & known[np.where(inside, det.actions, 0)]))
    if len(unknown):
        ids = sorted(set(det.actions[unknown].tolist()))
        shown = ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")
        problems.append(Problem(f"action ids outside the label map ({shown})", len(unknown), "rows",
                                row_text(int(unknown[0]))))
    off = np.flatnonzero(((det.boxes < 0) | (det.boxes > 1)).any(axis=1))
    if len(off):
        problems.append(Problem("boxes outside [0, 1]", len(off), "rows", row_text(int(off[0]))))
    if det.num_rows:
        b = det.boxes
        order = np.lexsort((np.arange(det.num_rows), b[:, 3], b[:, 2], b[:, 1], b[:, 0], det.actions, det.keyframe))
        same = ((det.keyframe[order][1:] == det.keyframe[order][:-1])
                & (det.actions[order][1:] == det.actions[order][:-1])
                & (b[order][1:] == b[order][:-1]).all(axis=1))
        repeats = order[1:][same]
        if len(repeats):
            first = int(repeats.min())
            problems.append(Problem("duplicate (box, class) rows of one keyframe", len(repeats),
                                    "rows beyond the first of each", row_text(first)))
    return CheckReport(detections=os.fspath(detections), groundtruth=os.fspath(groundtruth), num_rows=det.num_rows,
                       num_keyframes=len(det.keys), problems=problems)
