"""Issue 18 on the evaluator: action groups, the video bootstrap (against re-running the plain
evaluator on every resampled file), paired comparisons, runs of one model and ``--check``."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stage_dist.ava import statistics as eval_stats
from stage_dist.ava.evaluation import MAP_KEY, action_groups, evaluate, evaluate_with_table, read_action_groups
from stage_dist.ava.formats import read_label_types, read_labelmap
from stage_dist.ava.results_check import check
from stage_dist.evaluate import main
from tests.conftest import FIXTURES, subprocess_env

SUBSET = (FIXTURES / "ava_val_v2.1_subset4.csv", FIXTURES / "detections_subset4.csv",
          FIXTURES / "ava_action_list_v2.1_for_activitynet_2018.pbtxt")
LABELMAP = {2: "two", 5: "five", 20: "twenty", 33: "thirty-three", 70: "seventy"}
BOXES = [(0.1, 0.1, 0.4, 0.9), (0.5, 0.2, 0.9, 0.8), (0.3, 0.0, 0.7, 0.5)]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# --- action groups ---------------------------------------------------------------------------------


V22 = """label {
  name: "bend/bow (at the waist)"
  label_id: 1
  label_type: PERSON_MOVEMENT
}
label {
  name: "carry/hold (an object)"
  label_id: 17
  label_type: OBJECT_MANIPULATION
}
label { name: "talk to" label_id: 79 label_type: PERSON_INTERACTION }
label { name: "odd one" label_id: 80 label_type: PERSON_MOVEMENT }
"""


def test_label_type_defines_the_groups_and_is_named(tmp_path):
    path = tmp_path / "v22.pbtxt"
    path.write_text(V22)
    assert read_labelmap(path) == {1: "bend/bow (at the waist)", 17: "carry/hold (an object)", 79: "talk to",
                                   80: "odd one"}
    assert read_label_types(path) == {1: "PERSON_MOVEMENT", 17: "OBJECT_MANIPULATION", 79: "PERSON_INTERACTION",
                                      80: "PERSON_MOVEMENT"}
    groups = read_action_groups(path)
    assert groups.members == {"PERSON_MOVEMENT": (1, 80), "OBJECT_MANIPULATION": (17,), "PERSON_INTERACTION": (79,)}
    assert groups.source == f"label_type of {path}"


def test_id_ranges_without_label_type_and_no_groups_outside_ava_ids(tmp_path):
    groups = read_action_groups(SUBSET[2])  # the v2.1 item { name id } form: no types
    assert read_label_types(SUBSET[2]) == {}
    assert groups.source == "AVA id ranges 1-14, 15-63, 64-80"
    assert groups.members["PERSON_MOVEMENT"] == tuple(c for c in read_labelmap(SUBSET[2]) if c <= 14)
    assert sum(len(ids) for ids in groups.members.values()) == 60 and len(groups.members["PERSON_MOVEMENT"]) == 13
    partial = action_groups({1: "a", 70: "b"}, {1: "PERSON_MOVEMENT"})
    assert partial.members == {"PERSON_MOVEMENT": (1,), "PERSON_INTERACTION": (70,)}
    assert "label_type on only 1 of 2 classes" in partial.source
    none = action_groups({1: "a", 81: "b"})
    assert none.members == {} and none.source.startswith("none: class ids outside AVA's 1..80")


def test_group_map_is_the_mean_ap_of_each_groups_classes_with_groundtruth():
    result = evaluate(*SUBSET)
    assert result.grouping == "AVA id ranges 1-14, 15-63, 64-80"
    for name, (lo, hi) in {"PERSON_MOVEMENT": (1, 14), "OBJECT_MANIPULATION": (15, 63),
                           "PERSON_INTERACTION": (64, 80)}.items():
        values = [ap for c, ap in result.ap_by_id.items() if lo <= c <= hi and not math.isnan(ap)]
        assert result.group_map[name] == pytest.approx(sum(values) / len(values), abs=1e-15)


# --- the bootstrap ----------------------------------------------------------------------------------


def random_case(tmp_path: Path, seed: int, videos: int = 5, ties: bool = False) -> tuple[Path, Path]:
    """A few videos of a few keyframes; continuous scores (no ties) unless ``ties``."""
    rng = np.random.default_rng(seed)
    gt_lines, det_lines = [], []
    for v in range(videos):
        for ts in range(902, 902 + int(rng.integers(2, 5))):
            key = f"vid{v},{ts:04d}"
            if rng.random() < 0.15:
                gt_lines.append(key)  # a keyframe without boxes
            for b, box in enumerate(BOXES[: rng.integers(1, 4)]):
                for action in rng.choice(list(LABELMAP) + [7], size=int(rng.integers(1, 3)), replace=False):
                    gt_lines.append(f"{key},{','.join(map(str, box))},{action},{b}")
            for _ in range(int(rng.integers(3, 12))):
                jittered = np.clip(np.array(BOXES[rng.integers(3)]) + rng.normal(0, 0.06, 4), 0, 1)
                score = rng.choice([0.2, 0.5, 0.8]) if ties else rng.random()
                action = rng.choice(list(LABELMAP))
                det_lines.append(f"{key},{','.join(f'{x:.3f}' for x in jittered)},{action},{score:.6f}")
    gt_path, det_path = tmp_path / f"gt{seed}.csv", tmp_path / f"det{seed}.csv"
    gt_path.write_text("\n".join(gt_lines) + "\n")
    det_path.write_text("\n".join(det_lines) + "\n")
    return gt_path, det_path


def resampled_file(path: Path, counts: np.ndarray, videos: list[str], out: Path) -> Path:
    """``path`` with video ``v`` written ``counts[v]`` times, copy ``k`` renamed ``<v>_copy<k>``."""
    lines = path.read_text().splitlines()
    written = []
    for v, video in enumerate(videos):
        mine = [line for line in lines if line.split(",", 1)[0] == video]
        for k in range(int(counts[v])):
            written += [f"{video}_copy{k}," + line.split(",", 1)[1] for line in mine]
    out.write_text("".join(line + "\n" for line in written))
    return out


@pytest.mark.parametrize("case", [SUBSET, (FIXTURES / "mmaction2_eval_detection" / "gt.csv",
                                           FIXTURES / "mmaction2_eval_detection" / "pred.csv",
                                           FIXTURES / "mmaction2_eval_detection" / "action_list.txt")])
def test_identity_resample_is_the_official_result_bit_for_bit(case):
    result, table = evaluate_with_table(*case)
    groups = read_action_groups(case[2])
    values = eval_stats.resampled_map(table, eval_stats.identity_counts(len(table.videos)), groups)
    assert values.mean_ap[0] == result.mean_ap
    assert all(same(values.ap[0, c - 1], ap) for c, ap in result.ap_by_id.items())
    assert all(same(values.group_map[g][0], v) for g, v in result.group_map.items())


@pytest.mark.parametrize("seed", [0, 1])
def test_identity_resample_keeps_the_official_tie_order(tmp_path, seed):
    gt_path, det_path = random_case(tmp_path, seed, ties=True)
    result, table = evaluate_with_table(gt_path, det_path, LABELMAP)
    values = eval_stats.resampled_map(table, eval_stats.identity_counts(len(table.videos)), action_groups(LABELMAP))
    assert values.mean_ap[0] == result.mean_ap
    assert all(same(values.ap[0, c - 1], ap) for c, ap in result.ap_by_id.items())


def test_resamples_equal_the_plain_evaluator_on_each_resampled_file(tmp_path):
    gt_path, det_path = random_case(tmp_path, 3, videos=5)
    det_b = random_case(tmp_path, 4, videos=5)[1]  # another model's detections, same groundtruth
    groups = action_groups(LABELMAP)
    result, table = evaluate_with_table(gt_path, det_path, LABELMAP)
    result_b, table_b = evaluate_with_table(gt_path, det_b, LABELMAP)
    counts = eval_stats.resample_counts(len(table.videos), 12, seed=7)
    assert (counts.sum(axis=1) == len(table.videos)).all() and (counts == 0).any()
    fast = eval_stats.resampled_map(table, counts, groups)
    fast_b = eval_stats.resampled_map(table_b, counts, groups)
    brute: list[float] = []
    brute_b: list[float] = []
    for i, row in enumerate(counts):
        gt_i = resampled_file(gt_path, row, table.videos, tmp_path / f"gt_r{i}.csv")
        for path, out, expected in ((det_path, brute, fast), (det_b, brute_b, fast_b)):
            slow = evaluate(gt_i, resampled_file(path, row, table.videos, tmp_path / f"det_r{i}.csv"), LABELMAP)
            out.append(slow.mean_ap)
            assert expected.mean_ap[i] == pytest.approx(slow.mean_ap, abs=1e-12)
            for c, ap in slow.ap_by_id.items():
                assert (math.isnan(ap) and math.isnan(expected.ap[i, c - 1])) or \
                    expected.ap[i, c - 1] == pytest.approx(ap, abs=1e-12), (i, c)
            for g, value in slow.group_map.items():
                assert same(value, expected.group_map[g][i]) or value == pytest.approx(expected.group_map[g][i],
                                                                                        abs=1e-12)
    # the paired comparison is the same resamples' differences
    found = eval_stats.compare(result, table, result_b, table_b, groups, 12, seed=7)
    diff = np.array(brute) - np.array(brute_b)
    low, high = np.percentile(diff, [2.5, 97.5])
    assert found.interval == pytest.approx((low, high), abs=1e-12)
    observed = result.mean_ap - result_b.mean_ap
    assert found.difference == observed
    expected_p = (1 + np.sum(np.abs(diff - observed) >= abs(observed) - 1e-12)) / 13
    assert found.p_value == pytest.approx(expected_p)
    sizes = [abs(a - b) for _, a, b in found.class_difference]
    assert sizes == sorted(sizes, reverse=True)


def test_resample_counts_are_seeded_multisets():
    a, b = eval_stats.resample_counts(64, 50, seed=1), eval_stats.resample_counts(64, 50, seed=1)
    assert (a == b).all() and (a.sum(axis=1) == 64).all()
    assert not (a == eval_stats.resample_counts(64, 50, seed=2)).all()
    # each video is drawn about once per resample on average
    assert a.mean() == pytest.approx(1.0) and 0.2 < (a == 0).mean() < 0.5


# --- the CLI ---------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stage_dist.evaluate", *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_bootstrap_adds_intervals_and_keeps_the_official_json(tmp_path, capsys):
    plain, boot = tmp_path / "plain.json", tmp_path / "boot.json"
    flags = ["-g", str(SUBSET[0]), "-d", str(SUBSET[1]), "-l", str(SUBSET[2])]
    assert main([*flags, "--json", str(plain)]) == 0
    assert main([*flags, "--json", str(boot), "--bootstrap", "50", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "group mAP (AVA id ranges 1-14, 15-63, 64-80): person movement 0.4302" in printed
    assert "95 % interval (video bootstrap, 50 resamples, seed 3): mAP [" in printed
    plain_data, boot_data = json.loads(plain.read_text()), json.loads(boot.read_text())
    official = json.loads((FIXTURES / "official_metrics_subset4.json").read_text())
    assert {key: plain_data[key] for key in official} == pytest.approx(official, abs=1e-5)
    assert boot_data.pop("bootstrap")["resamples"] == 50
    assert boot_data == plain_data  # same numbers, bit for bit (JSON floats are repr)
    low, high = json.loads(boot.read_text())["bootstrap"]["mAP@0.5IOU"]
    assert low <= plain_data[MAP_KEY] <= high


def test_compare_reports_the_difference_and_exits_zero(tmp_path):
    gt_path, det_a = random_case(tmp_path, 5)
    det_b = random_case(tmp_path, 6)[1]
    out = tmp_path / "cmp.json"
    labels = tmp_path / "labels.pbtxt"
    labels.write_text("".join(f'item {{ name: "{n}" id: {c} }}\n' for c, n in LABELMAP.items()))
    done = cli("-g", str(gt_path), "-l", str(labels), "--compare", str(det_a), str(det_b), "--bootstrap", "200",
               "--json", str(out))
    assert done.returncode == 0, done.stderr
    a, b = evaluate(gt_path, det_a, LABELMAP), evaluate(gt_path, det_b, LABELMAP)
    data = json.loads(out.read_text())
    assert data["mAP@0.5IOU"]["A"] == a.mean_ap and data["mAP@0.5IOU"]["B"] == b.mean_ap
    assert data["mAP@0.5IOU"]["difference"] == a.mean_ap - b.mean_ap
    assert 0 < data["mAP@0.5IOU"]["p_value"] <= 1
    assert done.stdout.startswith(f"A - B frame-mAP@0.5: {a.mean_ap - b.mean_ap:+.4f}  95 % interval [")
    assert [d["id"] for d in data["per_class_difference"]][0] == max(
        LABELMAP, key=lambda c: abs(a.ap_by_id[c] - b.ap_by_id[c]) if not math.isnan(a.ap_by_id[c]) else -1)
    # identical files: difference 0, p = 1
    same_out = cli("-g", str(gt_path), "-l", str(labels), "--compare", str(det_a), str(det_a), "--bootstrap", "20")
    assert same_out.returncode == 0 and "+0.0000  95 % interval [+0.0000, +0.0000], two-sided p = 1.0000" in \
        same_out.stdout


def test_several_detections_files_give_mean_and_sample_std(tmp_path, capsys):
    gt_path, det_path = random_case(tmp_path, 8)
    rng = np.random.default_rng(0)
    runs = []
    for k in range(3):  # three "seeds" of one model: the same boxes, scores perturbed
        lines = [line.rsplit(",", 1) for line in det_path.read_text().splitlines()]
        path = tmp_path / f"run{k}.csv"
        path.write_text("".join(f"{head},{float(score) * rng.uniform(0.5, 1.5):.6f}\n" for head, score in lines))
        runs.append(path)
    results = [evaluate(gt_path, path, LABELMAP) for path in runs]
    out = tmp_path / "runs.json"
    labels = tmp_path / "labels.pbtxt"
    labels.write_text("".join(f'item {{ name: "{n}" id: {c} }}\n' for c, n in LABELMAP.items()))
    assert main(["-g", str(gt_path), "-l", str(labels), "-d", *map(str, runs), "--json", str(out)]) == 0
    values = [r.mean_ap for r in results]
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)  # sample std by hand
    data = json.loads(out.read_text())
    assert data["num_runs"] == 3
    assert data["mAP@0.5IOU"]["mean"] == pytest.approx(mean) and data["mAP@0.5IOU"]["std"] == pytest.approx(std)
    group = "OBJECT_MANIPULATION"
    gvalues = [r.group_map[group] for r in results]
    assert data["group_mAP@0.5IOU"][group]["std"] == pytest.approx(float(np.std(gvalues, ddof=1)))
    assert f"over 3 runs: {mean:.4f} +- {std:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "what"), [
    (["--compare", "a.csv"], "--compare takes two detections files"),
    ([], "give -d/--detections or --compare"),
    (["-d", "a.csv", "b.csv", "--bootstrap", "10"], "--bootstrap with several -d files"),
    (["-d", "a.csv", "--bootstrap", "-1"], "--bootstrap must be >= 0"),
    (["-d", "a.csv", "--bootstrap", "100000000000"], "--bootstrap must be at most 100000"),
    (["-d", "a.csv", "--bootstrap", "5", "--seed", "-3"], "--seed must be >= 0"),
    (["-d", "a.csv", "--check", "--json", "a.json"], "--check scores nothing and writes nothing: drop --json"),
    (["-d", "a.csv", "--check", "--plot", "a.png", "--bootstrap", "3"], "drop --plot, --bootstrap"),
    (["--compare", "a.csv", "b.csv", "--check"], "--check validates one -d file"),
])
def test_bad_flag_combinations_are_one_line_exit_2(tmp_path, flags, what):
    done = cli("-g", "gt.csv", "-l", "labels.pbtxt", *flags)
    assert done.returncode == 2 and what in done.stderr and "Traceback" not in done.stderr


def test_compare_with_a_malformed_file_names_file_and_line(tmp_path):
    gt_path, det_a = random_case(tmp_path, 12)
    bad = tmp_path / "bad.csv"
    bad.write_text(det_a.read_text().splitlines()[0] + "\nvid0,0902,0.1,0.1,0.5\n")
    labels = tmp_path / "labels.pbtxt"
    labels.write_text("".join(f'item {{ name: "{n}" id: {c} }}\n' for c, n in LABELMAP.items()))
    done = cli("-g", str(gt_path), "-l", str(labels), "--compare", str(det_a), str(bad), "--json", str(bad))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "--json would overwrite the file given as --compare" in done.stderr
    done = cli("-g", str(gt_path), "-l", str(labels), "--compare", str(det_a), str(bad))
    assert done.returncode == 2 and done.stderr.startswith(f"error: {bad}:2: expected 8 comma-separated columns")


# --- --check and the timestamp warning ------------------------------------------------------------------


GT = "vid,0902,0.1,0.1,0.5,0.9,2,0\nvid,0903,0.1,0.1,0.5,0.9,5,0\nvid,0904,0.1,0.1,0.5,0.9,5,0\n"


def test_check_reports_every_problem_class_with_counts_and_first_example(tmp_path):
    (tmp_path / "gt.csv").write_text(GT)
    det = tmp_path / "det.csv"
    det.write_text(
        "vid,902,0.1,0.1,0.5,0.9,2,0.9\n"  # written 902 for 0902
        "vid,902,0.1,0.1,0.5,0.9,2,0.8\n"  # duplicate (box, class)
        "vid,0903,0.1,0.1,0.5,1.2,5,0.7\n"  # box outside [0, 1]
        "vid,0903,0.1,0.1,0.5,0.9,99,0.7\n"  # class outside the label map
        "vid ,0903.4,0.1,0.1,0.5,0.9,5,0.6\n"  # matches only after stripping and rounding
        "other,0902,0.1,0.1,0.5,0.9,2,0.5\n"  # not in the groundtruth
        "vid,1e400,0.1,0.1,0.5,0.9,2,0.5\n"  # not in the groundtruth, no whole second to round to
    )
    report = check(tmp_path / "gt.csv", det, LABELMAP)
    found = {p.what.split(" (")[0]: p for p in report.problems}
    assert not report.clean
    assert found["keyframes not in the groundtruth"].count == 3
    assert found["timestamps written differently from the groundtruth"].count == 1
    assert "written '902', groundtruth '0902'" in found["timestamps written differently from the groundtruth"].example
    assert found["keyframes that match the groundtruth only after rounding the timestamp or stripping spaces "
                 "from the video id"].count == 1
    assert found["keyframes that match the groundtruth only after rounding the timestamp or stripping spaces "
                 "from the video id"].example.endswith("would be groundtruth keyframe 'vid,0903'")  # as written
    assert found["groundtruth keyframes with no detections"].example == "vid,0904"
    assert found["action ids outside the label map"].count == 1 and "99" in \
        next(p.what for p in report.problems if p.what.startswith("action ids"))
    assert found["boxes outside [0, 1]"].example.startswith("row 3: vid,0903,")
    assert found["duplicate"].example.startswith("row 2: ")
    labels = tmp_path / "labels.pbtxt"
    labels.write_text("".join(f'item {{ name: "{n}" id: {c} }}\n' for c, n in LABELMAP.items()))
    done = cli("-g", str(tmp_path / "gt.csv"), "-d", str(det), "-l", str(labels), "--check")
    assert done.returncode == 2 and "7 kinds of problem" in done.stdout
    assert len(done.stdout.strip().splitlines()) == 8


def test_check_finds_a_timestamp_respelled_on_later_rows_of_a_keyframe(tmp_path):
    """A keyframe whose first rows are written as the groundtruth writes it and later rows not
    (e.g. two tools' files concatenated): still a spelling problem, and the plain evaluation warns."""
    (tmp_path / "gt.csv").write_text(GT)
    det = tmp_path / "det.csv"
    det.write_text("".join(line.rsplit(",", 1)[0] + ",0.5\n" for line in GT.splitlines())
                   + "vid,903.0,0.2,0.1,0.5,0.9,5,0.4\n")
    report = check(tmp_path / "gt.csv", det, LABELMAP)
    assert [p.what.split(" (")[0] for p in report.problems] == ["timestamps written differently from the groundtruth"]
    assert report.problems[0].count == 1 and "vid written '903.0', groundtruth '0903'" in report.problems[0].example
    from stage_dist.ava.evaluation import timestamp_spellings
    from stage_dist.ava.formats import read_detections, read_groundtruth

    assert timestamp_spellings(read_groundtruth(tmp_path / "gt.csv"), read_detections(det)) == [
        ("vid,903.000000", "903.0", "0903")]


def test_check_of_a_clean_file_exits_zero(tmp_path):
    (tmp_path / "gt.csv").write_text(GT)
    det = tmp_path / "det.csv"
    det.write_text("".join(line.rsplit(",", 1)[0] + ",0.5\n" for line in GT.splitlines()))
    labels = tmp_path / "labels.pbtxt"
    labels.write_text("".join(f'item {{ name: "{n}" id: {c} }}\n' for c, n in LABELMAP.items()))
    done = cli("-g", str(tmp_path / "gt.csv"), "-d", str(det), "-l", str(labels), "--check")
    assert done.returncode == 0 and done.stdout.strip().endswith("no problems"), done.stdout


def test_plain_evaluation_warns_when_timestamps_match_only_as_numbers(tmp_path, caplog):
    (tmp_path / "gt.csv").write_text(GT)
    det = tmp_path / "det.csv"
    det.write_text("vid,902.0,0.1,0.1,0.5,0.9,2,0.9\nvid,0903,0.1,0.1,0.5,0.9,5,0.9\n")
    with caplog.at_level(logging.WARNING):
        result = evaluate(tmp_path / "gt.csv", det, LABELMAP)
    assert result.ap_by_id[2] == 1.0  # still matched
    assert "1 keyframes have timestamps written differently" in caplog.text and "'902.0'" in caplog.text
    caplog.clear()
    det.write_text("vid,0902,0.1,0.1,0.5,0.9,2,0.9\n")
    with caplog.at_level(logging.WARNING):
        evaluate(tmp_path / "gt.csv", det, LABELMAP)
    assert "written differently" not in caplog.text
