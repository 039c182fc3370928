"""How sure an AVA frame-mAP is: video-bootstrap intervals, paired comparisons, runs of one model.

The evaluator (:mod:`stage_dist.evaluate`) gives one number. This module owns the statistics
around it, all computed from the :class:`~stage_dist.ava.evaluation.MatchTable` that scoring leaves
behind, never by evaluating again:

- **Bootstrap.** A resample draws the groundtruth's videos (AVA's unit of independence: the
  keyframes of one video are correlated) with replacement, as many as there are. Matching is
  per keyframe, so a video drawn ``k`` times contributes each of its detections ``k`` times with
  the same true/false-positive flag and each of its groundtruth boxes ``k`` times: a resample is
  a vector of video counts. Per class, detections are ranked once, in the official order
  (descending score, ties as the official ``np.argsort(scores)[::-1]`` breaks them on the full
  file, kept in every resample); at the true positives, the weighted cumulative true- and
  false-positive counts of every resample are one matrix product ``counts @ cumulative counts
  per video``, and the VOC all-point AP follows from them (the interpolated precision peaks at
  a true positive, so the false positives need no rows of their own). The AP of the identity
  resample (every video once) is the official AP bit for bit, each step summed as the official
  code sums it. Intervals are the 2.5 and 97.5 percentiles of the resampled values.
- **Paired comparison** of two detections files on one groundtruth: the same resampled videos
  for both, the difference ``A - B`` per resample, its percentile interval and a two-sided
  p-value for "no difference": the bootstrap distribution of the difference shifted to mean
  zero (centred at the observed difference ``d``), ``p = (1 + #{|d_b - d| >= |d|}) / (N + 1)``.
- **Runs**: mean and sample standard deviation (``ddof=1``) of mAP and group mAP over
  detections files of one model trained with different seeds.

Cost: per class ``O(N * V * T)`` for ``N`` resamples, ``V`` videos and ``T`` true positives
(BLAS), in blocks of resamples so memory stays bounded.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from stage_dist.ava.evaluation import (
    ActionGroups,
    CliOutput,
    EvalResult,
    MatchTable,
    _stable_argsort_small,
    evaluate,
    evaluate_with_table,
    group_label,
    group_line,
    metrics_json,
)
from stage_dist.ava.formats import PathLike

CONFIDENCE = 0.95
_BLOCK_ELEMENTS = 1 << 22  # resamples x true positives per block (~32 MiB per float64 array)


def resample_counts(num_videos: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, num_videos) int64: how often each video is drawn in each resample."""
    if num_videos == 0:  # every keyframe excluded: nothing to draw (every AP NaN)
        return np.zeros((resamples, 0), dtype=np.int64)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, num_videos, size=(resamples, num_videos))
    flat = (np.arange(resamples)[:, None] * num_videos + drawn).ravel()
    return np.bincount(flat, minlength=resamples * num_videos).reshape(resamples, num_videos)


def identity_counts(num_videos: int) -> np.ndarray:
    """The resample that draws every video once (its AP is the official AP)."""
    return np.ones((1, num_videos), dtype=np.int64)


@dataclass(frozen=True)
class _RankedClass:
    """One class's true positives in the official rank order, with per-video running counts."""

    tp_video: np.ndarray  # (T,) video of each true positive
    fp_before: np.ndarray  # (V, T) float64: false positives of each video ranked before it


def _ranked_classes(table: MatchTable) -> dict[int, _RankedClass]:
    """Per label-map class with groundtruth, its detections ranked as ``_per_class_ap`` ranks them."""
    num_videos = len(table.videos)
    by_class = _stable_argsort_small(table.actions)  # as evaluate._per_class_ap does
    bounds = np.searchsorted(table.actions[by_class], np.arange(table.num_classes + 2))
    out = {}
    for class_id in table.class_ids:
        rows = by_class[bounds[class_id]:bounds[class_id + 1]]
        ranked = rows[np.argsort(table.scores[rows])[::-1]]  # the official tie order
        flags = table.true_positive[ranked]
        tp_rank = np.flatnonzero(flags)
        tp_video = table.video[ranked[tp_rank]]
        fp_rank = np.flatnonzero(~flags)
        fp_video = table.video[ranked[fp_rank]]
        fp_before = np.zeros((num_videos, len(tp_rank)))
        if len(tp_rank):
            fp_order = np.lexsort((fp_rank, fp_video))
            fp_rank_by_video, fp_video_sorted = fp_rank[fp_order], fp_video[fp_order]
            edges = np.searchsorted(fp_video_sorted, np.arange(num_videos + 1))
            for v in np.flatnonzero(np.diff(edges)).tolist():
                fp_before[v] = np.searchsorted(fp_rank_by_video[edges[v]:edges[v + 1]], tp_rank)
        out[class_id] = _RankedClass(tp_video, fp_before)
    return out


def _class_ap(ranked: _RankedClass, counts: np.ndarray, num_gt: np.ndarray, has_detections: bool) -> np.ndarray:
    """AP of one class for each resample (rows of ``counts``); NaN where it has no groundtruth."""
    ap = np.full(len(counts), np.nan)
    scored = num_gt > 0
    ap[scored] = 0.0
    num_tp = len(ranked.tp_video)
    if not num_tp or not has_detections:
        return ap
    block = max(1, _BLOCK_ELEMENTS // num_tp)
    for lo in range(0, len(counts), block):
        part = counts[lo:lo + block].astype(np.float64)
        gt_part = num_gt[lo:lo + block]
        weight = part[:, ranked.tp_video]  # copies of each true positive
        cum_tp = np.cumsum(weight, axis=1)  # small integers: exact in float64
        cum_fp = part @ ranked.fp_before
        present = weight > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(present, cum_tp / (cum_tp + cum_fp), 0.0)
            recall = cum_tp / gt_part[:, None]
            previous = (cum_tp - weight) / gt_part[:, None]
            interpolated = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            steps = (recall - previous) * interpolated
        # Each AP is np.sum of the official array of steps (pairwise summation depends on the
        # length): the resample's true positives, then a step to recall 1 at precision 0 unless
        # the recall reached 1.
        terms = steps[present]
        lengths = present.sum(axis=1)
        last = num_tp - 1 - np.argmax(present[:, ::-1], axis=1)
        to_one = (lengths == 0) | (recall[np.arange(len(part)), last] != 1)
        ends = np.cumsum(lengths)
        terms = np.insert(terms, ends[to_one], 0.0)
        ends = ends + np.cumsum(to_one)
        starts = ends - lengths - to_one
        sums = [float(np.add.reduce(terms[a:b])) for a, b in zip(starts.tolist(), ends.tolist())]
        ap[lo:lo + len(part)] = np.where(gt_part > 0, sums, np.nan)
    return ap


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row of NaN -> NaN
        return np.array([np.nanmean(row) for row in values]) if len(values) else np.empty(0)


@dataclass(frozen=True)
class Resampled:
    """AP, mAP and group mAP of one detections file under each resample."""

    ap: np.ndarray  # (N, num_classes) AP of class id j + 1 (NaN: not evaluated or no groundtruth)
    mean_ap: np.ndarray  # (N,)
    group_map: dict[str, np.ndarray]  # group -> (N,)


def resampled_map(table: MatchTable, counts: np.ndarray, groups: ActionGroups) -> Resampled:
    """Per-class AP, mAP and group mAP of ``table`` under each row of video ``counts``."""
    ap = np.full((len(counts), table.num_classes), np.nan)
    num_gt = counts @ table.gt_counts  # (N, num_classes + 1)
    has_detections = np.bincount(table.actions, minlength=table.num_classes + 1) > 0
    for class_id, ranked in _ranked_classes(table).items():
        ap[:, class_id - 1] = _class_ap(ranked, counts, num_gt[:, class_id], bool(has_detections[class_id]))
    group_map = {name: _nanmean_rows(ap[:, [c - 1 for c in ids]]) for name, ids in groups.members.items()}
    return Resampled(ap=ap, mean_ap=_nanmean_rows(ap), group_map=group_map)


def interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of the finite ``values`` (NaN, NaN if there are none)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Bootstrap:
    """Percentile intervals of mAP and group mAP over video resamples."""

    resamples: int
    seed: int
    mean_ap: tuple[float, float]
    group_map: dict[str, tuple[float, float]]

    def format(self) -> str:
        shown = [f"mAP {_pair(self.mean_ap)}",
                 *(f"{group_label(name)} {_pair(pair)}" for name, pair in self.group_map.items())]
        return (f"95 % interval (video bootstrap, {self.resamples} resamples, seed {self.seed}): "
                + ", ".join(shown))

    def as_json(self) -> dict:
        return {"unit": "video", "resamples": self.resamples, "seed": self.seed, "confidence": CONFIDENCE,
                "mAP@0.5IOU": _json_pair(self.mean_ap),
                "group_mAP@0.5IOU": {name: _json_pair(pair) for name, pair in self.group_map.items()}}


def bootstrap(table: MatchTable, groups: ActionGroups, resamples: int, seed: int) -> Bootstrap:
    """95 % percentile intervals of mAP and each group's mAP over ``resamples`` video resamples."""
    values = resampled_map(table, resample_counts(len(table.videos), resamples, seed), groups)
    return Bootstrap(resamples=resamples, seed=seed, mean_ap=interval(values.mean_ap),
                     group_map={name: interval(v) for name, v in values.group_map.items()})


@dataclass(frozen=True)
class Comparison:
    """Detections A against detections B on the same groundtruth (``difference`` is A - B)."""

    map_a: float
    map_b: float
    difference: float
    interval: tuple[float, float]
    p_value: float
    group_difference: dict[str, float]
    group_interval: dict[str, tuple[float, float]]
    class_difference: list[tuple[int, float, float]]  # (class id, AP A, AP B), largest |A - B| first
    resamples: int
    seed: int


def compare(result_a: EvalResult, table_a: MatchTable, result_b: EvalResult, table_b: MatchTable,
            groups: ActionGroups, resamples: int, seed: int) -> Comparison:
    """Paired video bootstrap of A - B: both files scored on the same resampled videos."""
    if table_a.videos != table_b.videos or not np.array_equal(table_a.gt_counts, table_b.gt_counts):
        raise ValueError("the two tables were not scored on the same groundtruth")
    counts = resample_counts(len(table_a.videos), resamples, seed)
    a, b = resampled_map(table_a, counts, groups), resampled_map(table_b, counts, groups)
    observed = result_a.mean_ap - result_b.mean_ap
    diff = a.mean_ap - b.mean_ap
    diff = diff[np.isfinite(diff)]
    p_value = (1 + int(np.sum(np.abs(diff - observed) >= abs(observed)))) / (len(diff) + 1)
    classes = [(c, result_a.ap_by_id[c], result_b.ap_by_id[c]) for c in result_a.ap_by_id
               if not (math.isnan(result_a.ap_by_id[c]) or math.isnan(result_b.ap_by_id[c]))]
    classes.sort(key=lambda item: (-abs(item[1] - item[2]), item[0]))
    return Comparison(
        map_a=result_a.mean_ap, map_b=result_b.mean_ap, difference=observed,
        interval=interval(a.mean_ap - b.mean_ap), p_value=p_value,
        group_difference={g: result_a.group_map[g] - result_b.group_map[g] for g in groups.members},
        group_interval={g: interval(a.group_map[g] - b.group_map[g]) for g in groups.members},
        class_difference=classes, resamples=resamples, seed=seed,
    )


@dataclass(frozen=True)
class RunStats:
    """Mean and sample standard deviation over runs (NaN std for a single run)."""

    num_runs: int
    mean_ap: tuple[float, float]  # (mean, std)
    group_map: dict[str, tuple[float, float]]


def run_statistics(results: Sequence[EvalResult]) -> RunStats:
    """Mean +- sample std (``ddof=1``) of mAP and of each group's mAP over several runs."""

    def mean_std(values: Sequence[float]) -> tuple[float, float]:
        array = np.array(values, dtype=np.float64)
        std = float(np.std(array, ddof=1)) if len(array) > 1 else math.nan
        return float(np.mean(array)), std

    names = list(results[0].group_map) if results else []
    return RunStats(num_runs=len(results), mean_ap=mean_std([r.mean_ap for r in results]),
                    group_map={g: mean_std([r.group_map[g] for r in results]) for g in names})


def _json_pair(pair: tuple[float, float]) -> list[float | None]:
    return [None if math.isnan(x) else x for x in pair]


def _pair(pair: tuple[float, float]) -> str:
    return "[n/a]" if math.isnan(pair[0]) else f"[{pair[0]:.4f}, {pair[1]:.4f}]"


def _value(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.4f}"


# ---------------------------------------------------------------------------------------------
# The CLI modes of stage_dist.evaluate (--compare, several -d)
# ---------------------------------------------------------------------------------------------


def compare_files(groundtruth: PathLike, path_a: PathLike, path_b: PathLike, labelmap: Mapping[int, str],
                  exclusions: PathLike | None, groups: ActionGroups, resamples: int, seed: int) -> CliOutput:
    """``--compare A B``: both scored, then :func:`compare`; the report and its JSON."""
    result_a, table_a = evaluate_with_table(groundtruth, path_a, labelmap, exclusions, groups=groups)
    result_b, table_b = evaluate_with_table(groundtruth, path_b, labelmap, exclusions, groups=groups)
    found = compare(result_a, table_a, result_b, table_b, groups, resamples, seed)
    lo, hi = found.interval
    lines = [
        f"A - B frame-mAP@0.5: {found.difference:+.4f}  95 % interval [{lo:+.4f}, {hi:+.4f}], two-sided "
        f"p = {found.p_value:.4f}  (paired video bootstrap, {resamples} resamples, seed {seed})",
        f"A: {_value(found.map_a)}  {path_a}",
        f"B: {_value(found.map_b)}  {path_b}",
        f"group mAP A - B ({result_a.grouping}):",
        *(f"  {group_label(g):<20} A {_value(result_a.group_map[g])}  B {_value(result_b.group_map[g])}  "
          f"A - B {found.group_difference[g]:+.4f}  95 % interval {_signed_pair(found.group_interval[g])}"
          for g in groups.members),
        "per-class AP, largest difference first:",
        f"{'id':>4}  {'A':>6}  {'B':>6}  {'A - B':>7}  class",
        *(f"{c:>4}  {a:6.4f}  {b:6.4f}  {a - b:+7.4f}  {labelmap[c]}" for c, a, b in found.class_difference),
    ]
    data = {
        "A": str(path_a), "B": str(path_b),
        "mAP@0.5IOU": {"A": found.map_a, "B": found.map_b, "difference": found.difference,
                       "ci95": list(found.interval), "p_value": found.p_value},
        "group_mAP@0.5IOU": {g: {"A": result_a.group_map[g], "B": result_b.group_map[g],
                                 "difference": found.group_difference[g], "ci95": list(found.group_interval[g])}
                             for g in groups.members},
        "group_source": result_a.grouping,
        "per_class_difference": [{"id": c, "name": labelmap[c], "A": a, "B": b, "difference": a - b}
                                 for c, a, b in found.class_difference],
        "bootstrap": {"unit": "video", "resamples": resamples, "seed": seed, "confidence": CONFIDENCE,
                      "p_value": "two-sided, bootstrap distribution of A - B centred at the observed difference"},
    }
    return CliOutput("\n".join(lines), _json_ready(data))


def runs_files(groundtruth: PathLike, paths: Sequence[PathLike], labelmap: Mapping[int, str],
               exclusions: PathLike | None, groups: ActionGroups) -> CliOutput:
    """Several ``-d`` files of one model: each scored, then mean +- sample std."""
    results = [evaluate(groundtruth, path, labelmap, exclusions, groups=groups) for path in paths]
    stats = run_statistics(results)
    mean, std = stats.mean_ap
    lines = [
        f"frame-mAP@0.5 over {stats.num_runs} runs: {mean:.4f} +- {std:.4f} (mean +- sample std)",
        f"group mAP ({results[0].grouping}): " + ", ".join(
            f"{group_label(g)} {m:.4f} +- {s:.4f}" for g, (m, s) in stats.group_map.items()),
        *(f"  {_value(r.mean_ap)}  {path}  ({group_line(r.group_map, r.grouping).split(': ', 1)[1]})"
          for r, path in zip(results, paths)),
    ]
    data = {
        "num_runs": stats.num_runs,
        "mAP@0.5IOU": {"mean": mean, "std": std},
        "group_mAP@0.5IOU": {g: {"mean": m, "std": s} for g, (m, s) in stats.group_map.items()},
        "group_source": results[0].grouping,
        "runs": {str(path): metrics_json(r) for r, path in zip(results, paths)},
    }
    return CliOutput("\n".join(lines), _json_ready(data))


def _signed_pair(pair: tuple[float, float]) -> str:
    return "[n/a]" if math.isnan(pair[0]) else f"[{pair[0]:+.4f}, {pair[1]:+.4f}]"


def _json_ready(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value
