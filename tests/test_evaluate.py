"""The AVA evaluator: official answers on real fixtures, one test per protocol rule, and a
row-by-row reference of the official protocol on random files full of ties."""

from __future__ import annotations

import csv
import dataclasses
import heapq
import json
import math
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

import stage_dist.ava.formats as ava
from stage_dist.ava.evaluation import CLASS_KEY_PREFIX, MAP_KEY, evaluate, evaluate_predictions
from stage_dist.ava.formats import (
    read_detections,
    read_groundtruth,
    read_labelmap,
    results_as_read,
    results_rows,
    write_results_csv,
)
from stage_dist.evaluate import main
from tests.conftest import FIXTURES

LABELMAP_3 = {1: "one", 2: "two", 3: "three"}
TP_BOX = (0.1, 0.1, 0.5, 0.9)


def write_csv(path: Path, rows) -> Path:
    path.write_text("".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return path


def det(ts, box, action, score, video="vid_A"):
    return (video, ts, *box, action, score)


def gt(ts, box, action, person=0, video="vid_A"):
    return (video, ts, *box, action, person)


def run(tmp_path, gt_rows, det_rows, labelmap=LABELMAP_3, exclusions=None):
    g = write_csv(tmp_path / "gt.csv", gt_rows)
    d = write_csv(tmp_path / "det.csv", det_rows)
    e = write_csv(tmp_path / "excl.csv", exclusions) if exclusions is not None else None
    return evaluate(g, d, labelmap, e)


def assert_matches_official(result, official: dict) -> None:
    assert set(official) <= set(result.metrics)
    for key, expected in official.items():
        got = result.metrics[key]
        if expected is None:
            assert math.isnan(got), key
        else:
            assert got == pytest.approx(expected, abs=1e-5), key


# --- the official answers on real files ---------------------------------------------------------


def test_subset_fixture_matches_official_evaluator():
    result = evaluate(
        FIXTURES / "ava_val_v2.1_subset4.csv",
        FIXTURES / "detections_subset4.csv",
        FIXTURES / "ava_action_list_v2.1_for_activitynet_2018.pbtxt",
    )
    official = json.loads((FIXTURES / "official_metrics_subset4.json").read_text())
    assert result.mean_ap == pytest.approx(0.4855841290372813, abs=1e-5)
    assert_matches_official(result, official)
    assert len(result.per_class) == 60
    assert sum(math.isnan(ap) for ap in result.per_class.values()) == 9
    assert result.num_detection_rows == 32410


def test_mmaction2_fixture_matches_official_evaluator():
    root = FIXTURES / "mmaction2_eval_detection"
    result = evaluate(root / "gt.csv", root / "pred.csv", root / "action_list.txt")
    assert result.mean_ap == pytest.approx(0.09385521885521886, abs=1e-5)
    assert_matches_official(result, json.loads((root / "official_metrics.json").read_text()))


# --- a row-by-row reference of the protocol ---------------------------------------------------------


def reference_metrics(gt_path: Path, det_path: Path, labelmap: dict[int, str], capacity=50) -> dict[int, float]:
    """The official protocol written out with Python loops, heaps and lists, class by class."""

    def key(row):
        return "%s,%.6f" % (row[0], Decimal(row[1]))

    def iou(a, b):  # boxes as (y1, x1, y2, x2)
        h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = h * w
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    def read(path, cap):
        heaps: defaultdict[str, list[tuple[float, int, float, float, float, float]]] = defaultdict(list)
        keys = set()
        for row in csv.reader(path.open()):
            keys.add(key(row))
            if len(row) == 2 or int(row[6]) not in labelmap:
                continue
            x1, y1, x2, y2 = map(float, row[2:6])
            item = (float(row[7]) if len(row) == 8 else 1.0, int(row[6]), y1, x1, y2, x2)
            heap = heaps[key(row)]
            if cap == 0 or len(heap) < cap:
                heapq.heappush(heap, item)
            elif item[0] > heap[0][0]:
                heapq.heapreplace(heap, item)
        return {k: sorted(h, key=lambda item: -item[0]) for k, h in heaps.items()}, keys

    gt, gt_keys = read(gt_path, 0)
    dets, _ = read(det_path, capacity)
    scores, labels = defaultdict(list), defaultdict(list)
    for k, items in dets.items():
        if k not in gt_keys:
            continue
        items = [d for d in items if d[2] < d[4] and d[3] < d[5]]
        for c in labelmap:
            boxes = [g[2:] for g in gt.get(k, []) if g[1] == c]
            taken = [False] * len(boxes)
            for d in (d for d in items if d[1] == c):
                positive = False
                if boxes:
                    overlaps = [iou(d[2:], b) for b in boxes]
                    j = overlaps.index(max(overlaps))
                    if overlaps[j] >= 0.5 and not taken[j]:
                        taken[j] = positive = True
                scores[c].append(d[0])
                labels[c].append(positive)
    num_gt = Counter(g[1] for items in gt.values() for g in items)
    aps = {}
    for c in labelmap:
        if num_gt[c] == 0:
            aps[c] = math.nan
            continue
        order = np.argsort(np.array(scores[c], dtype=float))[::-1]
        tp = np.array(labels[c], dtype=bool)[order]
        precision = [sum(tp[: i + 1]) / (i + 1) for i in range(len(tp))]
        recall = [sum(tp[: i + 1]) / num_gt[c] for i in range(len(tp))]
        recall, precision = [0.0, *recall, 1.0], [0.0, *precision, 0.0]
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        aps[c] = sum((recall[i] - recall[i - 1]) * precision[i]
                     for i in range(1, len(recall)) if recall[i] != recall[i - 1]) if tp.size else 0.0
    return aps


def random_files(tmp_path: Path, seed: int) -> tuple[Path, Path]:
    """Few keyframes, up to 90 rows each, scores and boxes from tiny sets: ties everywhere."""
    rng = np.random.default_rng(seed)
    box_pool = [(0.1, 0.1, 0.5, 0.9), (0.12, 0.1, 0.5, 0.85), (0.5, 0.2, 0.9, 0.8),
                (0.55, 0.2, 0.9, 0.75), (0.3, 0.3, 0.2, 0.6), (0.0, 0.0, 1.0, 1.0)]
    stamps = ["0902", "903", "904.0", "905"]
    gt_rows, det_rows = [], []
    for v in ("vidA", "-vidB_"):
        for ts in stamps:
            if rng.random() < 0.2:
                gt_rows.append((v, ts))
                continue
            for person in rng.permutation(4)[: rng.integers(1, 4)]:
                box = box_pool[person]
                for action in rng.choice([1, 2, 3, 4, 5], size=rng.integers(1, 3), replace=False):
                    gt_rows.append(gt(ts, box, action, person, v))
    for _ in range(1000):
        v, ts = ("vidA", "-vidB_", "vidC")[rng.integers(3)], stamps[rng.integers(4)]
        ts = {"0902": "902", "903": "0903"}.get(ts, ts) if rng.random() < 0.3 else ts
        score = float(rng.choice([0.1, 0.25, 0.5, 0.75, 0.9]))
        det_rows.append(det(ts, box_pool[rng.integers(len(box_pool))], int(rng.integers(1, 7)), score, v))
    rng.shuffle(gt_rows)
    return write_csv(tmp_path / "gt.csv", gt_rows), write_csv(tmp_path / "det.csv", det_rows)


@pytest.mark.parametrize("seed", range(6))
def test_matches_row_by_row_reference_on_ties(tmp_path, seed):
    labelmap = {1: "a", 2: "b", 3: "c", 5: "e", 6: "f"}
    gt_path, det_path = random_files(tmp_path, seed)
    expected = reference_metrics(gt_path, det_path, labelmap)
    result = evaluate(gt_path, det_path, labelmap)
    for class_id, ap in expected.items():
        got = result.ap_by_id[class_id]
        assert (math.isnan(ap) and math.isnan(got)) or got == pytest.approx(ap, abs=1e-12), class_id
    assert result.mean_ap == pytest.approx(np.nanmean(list(expected.values())), abs=1e-12)


# --- one test per protocol rule ---------------------------------------------------------------------


def test_cap_keeps_the_50_highest_scores(tmp_path):
    gt_rows = [gt("0902", TP_BOX, 1)]
    fillers = [det("0902", (0.6, 0.1, 0.9, 0.9), 2, 0.9)] * 50
    low = run(tmp_path, gt_rows, fillers + [det("0902", TP_BOX, 1, 0.5)])
    high = run(tmp_path, gt_rows, fillers + [det("0902", TP_BOX, 1, 0.95)])
    assert low.ap_by_id[1] == 0.0
    assert high.ap_by_id[1] == 1.0
    assert low.num_evaluated_detections == high.num_evaluated_detections == 50


def test_cap_needs_a_strictly_greater_score(tmp_path):
    gt_rows = [gt("0902", TP_BOX, 1)]
    fillers = [det("0902", (0.6, 0.1, 0.9, 0.9), 2, 0.5)] * 50
    tp = det("0902", TP_BOX, 1, 0.5)
    assert run(tmp_path, gt_rows, fillers + [tp]).ap_by_id[1] == 0.0  # equal score: not admitted
    assert run(tmp_path, gt_rows, [tp] + fillers).ap_by_id[1] == 1.0  # first in: kept


def test_cap_evicts_the_smallest_tuple_among_tied_scores(tmp_path):
    # Both files start with the true positive; the heap evicts the smallest
    # (score, action, y1, x1, y2, x2) tuple, not the first or last row.
    evict = det("0902", (0.0, 0.0, 1.0, 1.0), 3, 0.9)
    filler = (0.6, 0.1, 0.9, 0.9)
    tp_low_action = [det("0902", TP_BOX, 1, 0.5)] + [det("0902", filler, 2, 0.5)] * 49 + [evict]
    tp_high_action = [det("0902", TP_BOX, 2, 0.5)] + [det("0902", filler, 1, 0.5)] * 49 + [evict]
    assert run(tmp_path, [gt("0902", TP_BOX, 1)], tp_low_action).ap_by_id[1] == 0.0
    assert run(tmp_path, [gt("0902", TP_BOX, 2)], tp_high_action).ap_by_id[2] == 1.0


def test_classes_outside_the_labelmap_are_dropped_before_the_cap(tmp_path):
    unknown = [det("0902", (0.6, 0.1, 0.9, 0.9), 77, 0.99)] * 60
    result = run(tmp_path, [gt("0902", TP_BOX, 1)], unknown + [det("0902", TP_BOX, 1, 0.1)])
    assert result.ap_by_id[1] == 1.0
    assert result.num_evaluated_detections == 1


def test_two_column_groundtruth_rows_make_detections_false_positives(tmp_path):
    gt_rows = [gt("0902", TP_BOX, 1)]
    det_rows = [det("0902", TP_BOX, 1, 0.5), det("0903", TP_BOX, 1, 0.9)]
    assert run(tmp_path, gt_rows, det_rows).ap_by_id[1] == 1.0  # 0903 absent: ignored
    marked = run(tmp_path, gt_rows + [("vid_A", "0903")], det_rows)
    assert marked.ap_by_id[1] == 0.5
    assert marked.num_groundtruth_keyframes == 2
    # a keyframe whose only rows have classes outside the label map counts the same way
    assert run(tmp_path, gt_rows + [gt("0903", TP_BOX, 77)], det_rows).ap_by_id[1] == 0.5


def test_keyframes_absent_from_groundtruth_are_ignored(tmp_path):
    det_rows = [det("0902", TP_BOX, 1, 0.5), det("0950", TP_BOX, 1, 0.9), det("0902", TP_BOX, 1, 0.9, "other")]
    result = run(tmp_path, [gt("0902", TP_BOX, 1)], det_rows)
    assert result.ap_by_id[1] == 1.0
    assert result.num_evaluated_detections == 1


def test_iou_of_exactly_half_is_a_true_positive(tmp_path):
    gt_rows = [gt("0902", (0.0, 0.0, 1.0, 1.0), 1)]
    # intersection 0.5, union 1 + 0.5 - 0.5 = 1: IoU exactly 0.5 (and no +1 in the areas)
    assert run(tmp_path, gt_rows, [det("0902", (0.0, 0.0, 0.5, 1.0), 1, 0.9)]).ap_by_id[1] == 1.0
    assert run(tmp_path, gt_rows, [det("0902", (0.0, 0.0, 0.499, 1.0), 1, 0.9)]).ap_by_id[1] == 0.0


def test_invalid_detection_boxes_are_dropped_after_the_cap(tmp_path):
    gt_rows = [gt("0902", TP_BOX, 1)]
    inverted = (0.5, 0.1, 0.1, 0.9)  # x1 > x2
    flat = (0.1, 0.5, 0.9, 0.5)  # y1 == y2
    not_fp = run(tmp_path, gt_rows, [det("0902", inverted, 1, 0.9), det("0902", flat, 1, 0.8),
                                     det("0902", TP_BOX, 1, 0.5)])
    assert not_fp.ap_by_id[1] == 1.0  # an invalid box is not a false positive
    assert not_fp.num_evaluated_detections == 1
    capped = run(tmp_path, gt_rows, [det("0902", inverted, 2, 0.9)] * 50 + [det("0902", TP_BOX, 1, 0.5)])
    assert capped.ap_by_id[1] == 0.0  # ... but it takes a place under the 50 cap
    assert capped.num_evaluated_detections == 0


def test_no_second_choice_after_the_best_box_is_taken(tmp_path):
    gt_rows = [gt("0902", (0.0, 0.0, 1.0, 1.0), 1, 0), gt("0902", (0.0, 0.0, 0.8, 1.0), 1, 1)]
    det_rows = [det("0902", (0.0, 0.0, 1.0, 1.0), 1, 0.9),
                det("0902", (0.0, 0.0, 0.95, 1.0), 1, 0.8)]  # IoU 0.95 with the taken box, 0.84 with the free one
    assert run(tmp_path, gt_rows, det_rows).ap_by_id[1] == 0.5


def test_equal_iou_goes_to_the_groundtruth_box_with_the_highest_person_id(tmp_path):
    # The official reader orders a keyframe's groundtruth by descending 8th column (person id);
    # argmax then takes the first of equally overlapping boxes.
    low, high = (0.0, 0.0, 0.75, 1.0), (0.25, 0.0, 1.0, 1.0)
    det_rows = [det("0902", (0.125, 0.0, 0.875, 1.0), 1, 0.9),  # IoU 0.625 / 0.875 with both
                det("0902", low, 1, 0.8)]
    takes_high = run(tmp_path, [gt("0902", low, 1, 0), gt("0902", high, 1, 1)], det_rows)
    takes_low = run(tmp_path, [gt("0902", low, 1, 1), gt("0902", high, 1, 0)], det_rows)
    assert (takes_high.ap_by_id[1], takes_low.ap_by_id[1]) == (1.0, 0.5)


def test_class_with_groundtruth_but_no_detection_scores_zero(tmp_path):
    result = run(tmp_path, [gt("0902", TP_BOX, 1), gt("0902", TP_BOX, 2)], [det("0902", TP_BOX, 1, 0.7)])
    assert (result.ap_by_id[1], result.ap_by_id[2]) == (1.0, 0.0)
    assert math.isnan(result.ap_by_id[3])
    assert result.mean_ap == 0.5


def test_class_without_groundtruth_is_nan_and_left_out_of_the_mean(tmp_path):
    result = run(tmp_path, [gt("0902", TP_BOX, 1)], [det("0902", TP_BOX, 1, 0.7), det("0902", TP_BOX, 3, 0.9)])
    assert math.isnan(result.ap_by_id[3]) and math.isnan(result.ap_by_id[2])
    assert math.isnan(result.metrics[CLASS_KEY_PREFIX + "three"])
    assert result.mean_ap == result.metrics[MAP_KEY] == 1.0


def test_decimal_timestamps_name_one_keyframe(tmp_path):
    left, right = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
    gt_rows = [gt("0902", left, 1, 0), gt("0902", right, 1, 1)]
    det_rows = [det("902", left, 1, 0.9), det("902.0", right, 1, 0.8)]
    assert run(tmp_path, gt_rows, det_rows).ap_by_id[1] == 1.0


def test_both_labelmap_forms_give_the_same_result(tmp_path):
    item_form = FIXTURES / "ava_action_list_v2.1_for_activitynet_2018.pbtxt"
    from stage_dist.ava.formats import read_labelmap

    label_form = tmp_path / "label_form.pbtxt"
    label_form.write_text("".join(
        f'label {{\n  name: "{name}"\n  label_id: {i}\n  label_type: PERSON_MOVEMENT\n}}\n'
        for i, name in read_labelmap(item_form).items()))
    args = (FIXTURES / "ava_val_v2.1_subset4.csv", FIXTURES / "detections_subset4.csv")
    assert evaluate(*args, label_form).metrics == pytest.approx(evaluate(*args, item_form).metrics, nan_ok=True)


def test_exclusions_drop_groundtruth_and_detections(tmp_path):
    gt_rows = [gt("0902", TP_BOX, 1), gt("0903", TP_BOX, 1)]
    det_rows = [det("0902", TP_BOX, 1, 0.5), det("0903", (0.6, 0.1, 0.9, 0.9), 1, 0.9)]
    assert run(tmp_path, gt_rows, det_rows).ap_by_id[1] == 0.25
    excluded = run(tmp_path, gt_rows, det_rows, exclusions=[("vid_A", "903")])
    assert excluded.ap_by_id[1] == 1.0
    assert excluded.num_groundtruth_keyframes == 1


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_prints_table_and_writes_json_and_plot(tmp_path, capsys):
    root = FIXTURES / "mmaction2_eval_detection"
    out_json, out_png = tmp_path / "m.json", tmp_path / "ap.png"
    status = main(["-g", str(root / "gt.csv"), "-d", str(root / "pred.csv"), "-l", str(root / "action_list.txt"),
                   "--json", str(out_json), "--plot", str(out_png)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "frame-mAP@0.5: 0.0939" in printed and "action2" in printed
    written = json.loads(out_json.read_text())
    official = json.loads((root / "official_metrics.json").read_text())
    assert written.keys() - official.keys() == {"group_mAP@0.5IOU", "group_source"}  # issue 18: keys added
    assert written[MAP_KEY] == pytest.approx(official[MAP_KEY], abs=1e-9)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_null_for_classes_without_groundtruth(tmp_path):
    out_json = tmp_path / "m.json"
    assert main(["-g", str(FIXTURES / "ava_val_v2.1_subset4.csv"), "-d", str(FIXTURES / "detections_subset4.csv"),
                 "-l", str(FIXTURES / "ava_action_list_v2.1_for_activitynet_2018.pbtxt"), "-q",
                 "--json", str(out_json)]) == 0
    official = json.loads((FIXTURES / "official_metrics_subset4.json").read_text())
    written = json.loads(out_json.read_text())
    assert {key: written[key] for key in official} == pytest.approx(official, abs=1e-5)


def test_cli_reports_malformed_input_with_file_and_line(tmp_path, capsys):
    root = FIXTURES / "mmaction2_eval_detection"
    bad = tmp_path / "bad.csv"
    bad.write_text("vid,0902,0.1,0.1,0.5,0.5,1,0.9\nvid,0903,0.1,zero,0.5,0.5,1,0.9\n")
    status = main(["-g", str(root / "gt.csv"), "-d", str(bad), "-l", str(root / "action_list.txt")])
    assert status == 2
    assert f"{bad}:2: y1 'zero' is not a number" in capsys.readouterr().err


def test_empty_detections_and_in_memory_inputs(tmp_path):
    from stage_dist.ava.formats import read_ava_csv

    gt_path = write_csv(tmp_path / "gt.csv", [gt("0902", TP_BOX, 1), gt("0902", TP_BOX, 2)])
    (tmp_path / "empty.csv").write_text("")
    result = evaluate(read_ava_csv(gt_path), tmp_path / "empty.csv", LABELMAP_3)
    assert (result.ap_by_id[1], result.ap_by_id[2], result.mean_ap) == (0.0, 0.0, 0.0)
    assert result.num_evaluated_detections == 0


def test_module_cli_runs_as_a_process(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.pbtxt"
    bad.write_text('item {\n  name: "a"\n  id: x\n}\n')
    root = FIXTURES / "mmaction2_eval_detection"
    done = subprocess.run([sys.executable, "-m", "stage_dist.evaluate", "-g", str(root / "gt.csv"),
                           "-d", str(root / "pred.csv"), "-l", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {bad}:3: id 'x' is not an integer"


# --- in-memory evaluation: the same result as writing results.csv and evaluating the file -------


def random_predictions(seed: int, gt_rows, num_boxes: int):
    """Boxes on the groundtruth's keyframes (and a few others), 80 scores each, full of ties."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(gt_rows), num_boxes)
    video_ids = np.array([gt_rows[i][0] for i in pick], dtype=object)
    timestamps = np.array([int(gt_rows[i][1]) for i in pick])
    video_ids[rng.random(num_boxes) < 0.05] = "not_in_gt"
    boxes = np.array([[float(v) for v in gt_rows[i][2:6]] for i in pick]) + rng.normal(0, 0.03, (num_boxes, 4))
    boxes[rng.random(num_boxes) < 0.1] = boxes[0]  # equal boxes: their order is the input order
    scores = rng.random((num_boxes, 80)).astype(np.float32)  # float32 like stage_dist.infer
    scores[rng.random((num_boxes, 80)) < 0.3] = np.float32(0.5)  # ties at the 50-cap threshold
    return video_ids, timestamps, boxes.astype(np.float32), scores


def comparable(result) -> str:
    """Every field but the timing, floats by repr (so -0.0 / NaN / last-bit differences show)."""
    return repr(sorted(dataclasses.asdict(dataclasses.replace(result, seconds=0.0)).items()))


@pytest.mark.parametrize(
    ("class_ids", "topk", "min_score"),
    [(None, None, 0.0), ("labelmap", None, 0.0), (None, 3, 0.0), ("labelmap", 5, 0.4), (None, None, 0.5)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_in_memory_evaluation_equals_the_written_file(tmp_path, seed, class_ids, topk, min_score):
    gt_path = FIXTURES / "ava_val_v2.1_subset4.csv"
    labelmap = read_labelmap(FIXTURES / "ava_action_list_v2.1_for_activitynet_2018.pbtxt")
    gt_rows = [row for row in csv.reader(gt_path.open()) if len(row) >= 7]
    predictions = random_predictions(seed, gt_rows, 600)
    selection = dict(class_ids=sorted(labelmap) if class_ids == "labelmap" else None, topk=topk, min_score=min_score)
    path = tmp_path / "results.csv"
    write_results_csv(path, *predictions, **selection)

    from_file = evaluate(gt_path, path, labelmap)
    in_memory = evaluate_predictions(read_groundtruth(gt_path), labelmap, *predictions, **selection)
    assert comparable(in_memory) == comparable(from_file)
    assert in_memory.num_detection_rows == path.read_bytes().count(b"\n")
    if topk is None and min_score < 0.5:
        assert in_memory.num_evaluated_detections < in_memory.num_detection_rows  # the 50 cap cut rows

    # the rows themselves: same order, keys and float64 values as the reader gives
    read = read_detections(path)
    rows = results_as_read(results_rows(*predictions, **selection))
    assert rows.keys == read.keys
    for name in ("keyframe", "boxes", "actions", "scores", "marked_keyframes"):
        np.testing.assert_array_equal(getattr(rows, name), getattr(read, name), err_msg=name)
        assert getattr(rows, name).dtype == getattr(read, name).dtype


def test_in_memory_values_are_the_parsed_text_bit_for_bit():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.random(200_000), rng.random(1000) * 3 - 1, [0.0, -0.0, 1.0, 0.0005, 0.0015]])
    for decimals in (3, 6):
        text = ava._format_fixed(values, decimals)
        expected = text.astype(np.float64)
        got = ava._as_written(values, decimals)
        assert np.array_equal(got.view(np.int64), expected.view(np.int64)), decimals  # bits, not ==


def test_in_memory_evaluation_builds_keys_per_keyframe_not_per_row(monkeypatch):
    """Python work is per keyframe (the keys); every per-row quantity stays in arrays."""
    calls = []
    original = ava.image_key
    monkeypatch.setattr(ava, "image_key", lambda video, stamp: calls.append(1) or original(video, stamp))
    num_boxes = 4000
    video_ids = np.array(["vid"] * num_boxes, dtype=object)
    timestamps = np.repeat(np.arange(902, 942), num_boxes // 40)
    scores = np.random.default_rng(0).random((num_boxes, 80))
    rows = results_rows(video_ids, timestamps, np.tile([0.1, 0.1, 0.5, 0.5], (num_boxes, 1)), scores)
    read = results_as_read(rows)
    assert read.num_rows == num_boxes * 80 and len(calls) == 40
    assert all(isinstance(getattr(read, name), np.ndarray) for name in ("keyframe", "boxes", "actions", "scores"))


def test_in_memory_min_score_above_every_score_warns(caplog):
    gt = read_groundtruth(FIXTURES / "mmaction2_eval_detection" / "gt.csv")
    labelmap = {1: "one", 2: "two"}
    scores = np.full((2, 80), 0.3)
    with caplog.at_level("WARNING"):
        result = evaluate_predictions(gt, labelmap, ["x", "y"], np.array([902, 903]), np.zeros((2, 4)) + 0.5, scores,
                                      min_score=0.9)
    assert "no score is >= min_score 0.9 (the highest is 0.3): no rows selected" in caplog.text
    assert "<predictions>: no detections: every class with groundtruth has AP 0" in caplog.text
    assert result.num_detection_rows == 0 and result.mean_ap == 0.0
