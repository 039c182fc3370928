"""AVA file formats: CSV and pbtxt reading (with file:line errors) and the results.csv writer."""

from __future__ import annotations

import os

import numpy as np
import pytest

import stage_dist.ava.formats as ava
from stage_dist.ava.evaluation import evaluate
from stage_dist.ava.formats import (
    AvaFormatError,
    image_key,
    read_ava_csv,
    read_exclusions,
    read_labelmap,
    write_results_csv,
)
from tests.conftest import FIXTURES

ITEM_LABELMAP = FIXTURES / "ava_action_list_v2.1_for_activitynet_2018.pbtxt"


# --- label maps ----------------------------------------------------------------------------------


def test_read_labelmap_item_form():
    labelmap = read_labelmap(ITEM_LABELMAP)
    assert len(labelmap) == 60
    assert list(labelmap.items())[:2] == [(1, "bend/bow (at the waist)"), (3, "crouch/kneel")]
    assert labelmap[80] == "watch (a person)"


def test_read_labelmap_label_form(tmp_path):
    path = tmp_path / "v2.2.pbtxt"
    path.write_text('label {\n  name: "bend/bow (at the waist)"\n  label_id: 1\n  label_type: PERSON_MOVEMENT\n}\n'
                    "# a comment\n"
                    "label { name: 'crouch/kneel' label_id: 3 label_type: PERSON_MOVEMENT }\n")
    assert read_labelmap(path) == {1: "bend/bow (at the waist)", 3: "crouch/kneel"}


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('item {\n  name: "a"\n  id: 1\n}\nitem {\n  name: "b"\n}\n', 5, "entry has no 'id' or 'label_id'"),
        ('item {\n  name: "a"\n  id: one\n}\n', 3, "id 'one' is not an integer"),
        ('item {\n  name: "a"\n  id: 1\n', 1, "block is not closed"),
        ('item {\n  name: "a\n  id: 1\n}\n', 2, "unexpected character '\"'"),
        ('item {\n  name: "a"\n  id: 1\n}\nitem {\n  name: "b"\n  id: 1\n}\n', 5, "class id 1 appears twice"),
        ('items {\n  name: "a"\n  id: 1\n}\n', 1, "expected 'item {' or 'label {'"),
        ('item {\n  id: 2\n}\n', 1, "has no 'name'"),
        ('item {\n  name: "a"\n  id: 0\n}\n', 3, "must be >= 1"),
    ],
)
def test_malformed_labelmap_names_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.pbtxt"
    path.write_text(text)
    with pytest.raises(AvaFormatError) as error:
        read_labelmap(path)
    assert str(error.value).startswith(f"{path}:{line}: ")
    assert message in str(error.value)


def test_empty_labelmap_is_an_error(tmp_path):
    (tmp_path / "empty.pbtxt").write_text("# nothing\n")
    with pytest.raises(AvaFormatError, match="no entries"):
        read_labelmap(tmp_path / "empty.pbtxt")


# --- CSV reading ---------------------------------------------------------------------------------


def test_read_groundtruth_fixture():
    rows = read_ava_csv(FIXTURES / "ava_val_v2.1_subset4.csv")
    assert rows.num_rows == 11874
    assert len(rows.keys) == 3119
    assert rows.keys[rows.keyframe[0]] == "1j20qq1JyX4,902.000000"
    np.testing.assert_array_equal(rows.boxes[0], [0.002, 0.118, 0.714, 0.977])
    assert rows.actions[:3].tolist() == [12, 79, 12]
    assert rows.scores[:3].tolist() == [1.0, 1.0, 0.0]  # 8th column: person id


def test_image_key_reads_timestamps_as_decimals():
    assert image_key("-5KQ66BBWC4", "0902") == image_key("-5KQ66BBWC4", "902.0") == "-5KQ66BBWC4,902.000000"
    with pytest.raises(ValueError):
        image_key("v", "abc")


def test_read_csv_handles_crlf_blank_lines_short_rows_and_no_final_newline(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"_145Aa_xkuE,0902,0.1,0.2,0.3,0.4,5,0.25\r\n\r\n"
                     b"_145Aa_xkuE,903\n"
                     b"_145Aa_xkuE,902.0,0.1,0.2,0.3,0.4,6")
    rows = read_ava_csv(path)
    assert rows.keys == ["_145Aa_xkuE,902.000000", "_145Aa_xkuE,903.000000"]
    assert rows.keyframe.tolist() == [0, 0]
    assert rows.marked_keyframes.tolist() == [1]
    assert rows.scores.tolist() == [0.25, 1.0]
    assert rows.actions.tolist() == [5, 6]


@pytest.mark.parametrize(
    ("line2", "message"),
    [
        ("v,0903,0.1,0.2,0.3", "expected 2, 7 or 8 comma-separated columns, found 5"),
        ("v,0903,0.1,abc,0.3,0.4,1,0.5", "y1 'abc' is not a number"),
        ("v,0903,0.1,,0.3,0.4,1,0.5", "y1 '' is not a number"),
        ("v,0903,0.1,0.2,0.3,0.4,1.5,0.5", "action id '1.5' is not an integer"),
        ("v,0903,0.1,0.2,0.3,0.4,1,nan", "score 'nan' is not a finite number"),
        ("v,09x3,0.1,0.2,0.3,0.4,1,0.5", "timestamp '09x3' is not a number"),
        (",0903,0.1,0.2,0.3,0.4,1,0.5", "empty video id"),
        ("v" * 80 + ",0903,0.1,0.2,0.3,0.4,1,0.5", "video id is longer than 64 characters"),
        ("v,0903,0.1,0.2,0.3,0.4,1,0." + "5" * 80 + "x", "score '0." + "5" * 80 + "x' is not a number"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path, line2, message):
    path = tmp_path / "bad.csv"
    path.write_text(f"v,0902,0.1,0.2,0.3,0.4,1,0.5\n{line2}\nv,0904,0.1,0.2,0.3,0.4,1,0.5\n")
    with pytest.raises(AvaFormatError) as error:
        read_ava_csv(path)
    assert str(error.value) == f"{path}:2: {message}"


def test_line_numbers_stay_right_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(ava, "_READ_BLOCK_BYTES", 100)
    good = "vid,0902,0.1,0.2,0.3,0.4,1,0.5\n"
    path = tmp_path / "long.csv"
    path.write_text(good * 40 + "\n" + good * 10 + "vid,0902,0.1,0.2,0.3,0.4,1,bad\n")
    with pytest.raises(AvaFormatError, match=rf"^{path}:52: score 'bad' is not a number$"):
        read_ava_csv(path)
    path.write_text(good * 40 + "vid,0903\n")
    rows = read_ava_csv(path)
    assert rows.num_rows == 40 and rows.keys == ["vid,902.000000", "vid,903.000000"]


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(AvaFormatError, match="cannot read"):
        read_ava_csv(tmp_path / "missing.csv")


def test_read_exclusions(tmp_path):
    keys = read_exclusions(FIXTURES / "ava_val_excluded_timestamps_v2.1.csv")
    assert len(keys) == 37 and "5BDj0ow5hnA,1038.000000" in keys
    bad = tmp_path / "excl.csv"
    bad.write_text("v,0902\nv,0903,0.1,0.2,0.3,0.4,1\n")
    with pytest.raises(AvaFormatError, match=r":2: expected 2 comma-separated columns, found 7"):
        read_exclusions(bad)


# --- results.csv writing -------------------------------------------------------------------------


def small_predictions():
    video_ids = ["vid_b", "-vid_a", "vid_b", "-vid_a"]
    timestamps = np.array([903, 1798, 902, 1798])
    boxes = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9], [0.12345, 0.0, 1.0, 0.99999], [0.1, 0.1, 0.4, 0.4]])
    scores = np.zeros((4, 80))
    scores[:, 0] = [0.9, 0.8, 0.7, 0.6]
    scores[:, 4] = 0.25
    scores[:, 79] = [0.1, 0.123456789, 1.0, 0.0]
    return video_ids, timestamps, boxes, scores


def test_results_rows_are_sorted_and_formatted(tmp_path):
    path = tmp_path / "results.csv"
    rows = write_results_csv(path, *small_predictions(), class_ids=[80, 1, 5], min_score=0.2)
    assert path.read_text().splitlines() == [
        "-vid_a,1798,0.100,0.100,0.400,0.400,1,0.600000",
        "-vid_a,1798,0.100,0.100,0.400,0.400,5,0.250000",
        "-vid_a,1798,0.500,0.500,0.900,0.900,1,0.800000",
        "-vid_a,1798,0.500,0.500,0.900,0.900,5,0.250000",
        "vid_b,0902,0.123,0.000,1.000,1.000,1,0.700000",
        "vid_b,0902,0.123,0.000,1.000,1.000,5,0.250000",
        "vid_b,0902,0.123,0.000,1.000,1.000,80,1.000000",
        "vid_b,0903,0.100,0.200,0.300,0.400,1,0.900000",
        "vid_b,0903,0.100,0.200,0.300,0.400,5,0.250000",
    ]
    assert rows == 9


def test_results_topk_keeps_the_best_scores_per_box(tmp_path):
    path = tmp_path / "results.csv"
    video_ids, timestamps, boxes, scores = small_predictions()
    write_results_csv(path, video_ids[:1], timestamps[:1], boxes[:1], scores[:1], topk=3)
    # 0.9 (id 1), 0.25 (id 5), 0.1 (id 80); the zeros lose, ties go to the lower action id
    assert [line.split(",")[6] for line in path.read_text().splitlines()] == ["1", "5", "80"]
    write_results_csv(path, video_ids[3:], timestamps[3:], boxes[3:], scores[3:], topk=3)
    assert [line.split(",")[6] for line in path.read_text().splitlines()] == ["1", "2", "5"]


def test_results_do_not_depend_on_input_order(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    video_ids = [f"v{i}" for i in rng.integers(0, 5, n)]
    timestamps, boxes, scores = rng.integers(902, 910, n), rng.random((n, 4)), rng.random((n, 80))
    write_results_csv(tmp_path / "a.csv", video_ids, timestamps, boxes, scores, topk=5)
    perm = rng.permutation(n)
    write_results_csv(tmp_path / "b.csv", [video_ids[i] for i in perm], timestamps[perm], boxes[perm], scores[perm],
                      topk=5)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_results_numbers_match_printf_formatting(tmp_path):
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.random(20000), rng.random(100) * 1000, [0.0, 1.0, 0.5, 12.0]])
    assert ava._format_fixed(values, 6).astype(str).tolist() == ["%.6f" % v for v in values]
    assert ava._format_fixed(values, 3).astype(str).tolist() == ["%.3f" % v for v in values]
    assert ava._format_fixed(np.array([-1.25, -0.0000001]), 2).tolist() == [b"-1.25", b"0.00"]


def test_results_invalid_inputs_are_rejected(tmp_path):
    video_ids, timestamps, boxes, scores = small_predictions()
    path = tmp_path / "results.csv"
    with pytest.raises(ValueError, match="class ids must be in 1..80"):
        write_results_csv(path, video_ids, timestamps, boxes, scores, class_ids=[0, 1])
    with pytest.raises(ValueError, match="boxes has shape"):
        write_results_csv(path, video_ids, timestamps, boxes[:3], scores)
    with pytest.raises(ValueError, match="comma"):
        write_results_csv(path, ["a,b"] + video_ids[1:], timestamps, boxes, scores)
    with pytest.raises(ValueError, match="whole seconds"):
        write_results_csv(path, video_ids, timestamps + 0.5, boxes, scores)
    assert not path.exists()


def test_results_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    path.write_text("previous\n")
    monkeypatch.setattr(ava, "_WRITE_BLOCK_ROWS", 2)
    calls = []

    def failing_format(values, decimals):
        calls.append(len(values))
        if len(calls) > 2:
            raise RuntimeError("disk on fire")
        return original(values, decimals)

    original = ava._format_fixed
    monkeypatch.setattr(ava, "_format_fixed", failing_format)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_results_csv(path, *small_predictions())
    assert path.read_text() == "previous\n"
    assert os.listdir(tmp_path) == ["results.csv"]


def test_results_round_trip_through_reader_and_evaluator(tmp_path):
    gt_path = tmp_path / "gt.csv"
    gt_path.write_text("vid,0902,0.100,0.100,0.500,0.900,1,0\nvid,0902,0.100,0.100,0.500,0.900,3,0\n"
                       "vid,0902,0.600,0.100,0.900,0.900,2,1\nvid,0903\n")
    labelmap = tmp_path / "labelmap.pbtxt"
    labelmap.write_text("".join(f'item {{\n  name: "c{i}"\n  id: {i}\n}}\n' for i in (1, 2, 3)))
    boxes = np.array([[0.1, 0.1, 0.5, 0.9], [0.6, 0.1, 0.9, 0.9], [0.2, 0.2, 0.4, 0.4]])
    scores = np.full((3, 80), 0.01)
    scores[0, [0, 2]] = 0.9
    scores[1, 1] = 0.8
    path = tmp_path / "results.csv"
    rows = write_results_csv(path, ["vid"] * 3, np.array([902, 902, 903]), boxes, scores, class_ids=[1, 2, 3])
    read = read_ava_csv(path)
    assert rows == read.num_rows == 9
    np.testing.assert_allclose(np.sort(read.scores), np.sort(scores[:, :3].ravel()))
    assert set(read.actions.tolist()) == {1, 2, 3}
    result = evaluate(gt_path, path, labelmap)
    assert result.mean_ap == 1.0
    assert result.num_evaluated_detections == 9


def test_min_score_above_every_score_warns(tmp_path, caplog):
    video_ids, timestamps, boxes, scores = small_predictions()
    with caplog.at_level("WARNING", logger="stage_dist.ava.formats"):
        assert write_results_csv(tmp_path / "r.csv", video_ids, timestamps, boxes, scores, min_score=1.5) == 0
    assert "no score is >= min_score 1.5 (the highest is 1): no rows selected" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="stage_dist.ava.formats"):
        write_results_csv(tmp_path / "r.csv", video_ids, timestamps, boxes, scores, min_score=0.95)
    assert caplog.text == ""


def test_results_without_rows_still_write_a_file(tmp_path):
    assert write_results_csv(tmp_path / "none.csv", [], np.zeros(0), np.zeros((0, 4)), np.zeros((0, 80))) == 0
    assert write_results_csv(tmp_path / "low.csv", ["v"], np.array([902]), np.zeros((1, 4)), np.zeros((1, 80)),
                             min_score=0.5) == 0
    assert (tmp_path / "none.csv").read_bytes() == (tmp_path / "low.csv").read_bytes() == b""


# --- byte-order marks, line endings and column counts (both parser paths) ------------------------

BOM = b"\xef\xbb\xbf"


def read_slow_path(path, monkeypatch, reader=read_ava_csv):
    """The general parser only (the fast uniform-block path switched off)."""
    with monkeypatch.context() as patch:
        patch.setattr(ava._CsvBlockParser, "_parse_uniform", lambda self, block: False)
        return reader(path)


def parser_path(reader, slow: bool, monkeypatch):
    """``reader``, or ``reader`` restricted to the general parser when ``slow``."""
    return (lambda path: read_slow_path(path, monkeypatch, reader)) if slow else reader


def assert_same_rows(a, b):
    assert a.keys == b.keys
    for name in ("keyframe", "boxes", "actions", "scores", "marked_keyframes"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize("block_bytes", [1, 2, 5, 1 << 25])
@pytest.mark.parametrize("slow", [False, True])
def test_bom_crlf_and_trailing_blank_lines_read_like_a_clean_file(tmp_path, monkeypatch, block_bytes, slow):
    monkeypatch.setattr(ava, "_READ_BLOCK_BYTES", block_bytes)  # 1, 2: the BOM split across reads
    clean = FIXTURES.joinpath("detections_subset4.csv").read_bytes()[:5000].rsplit(b"\n", 1)[0] + b"\n"
    (tmp_path / "clean.csv").write_bytes(clean)
    (tmp_path / "odd.csv").write_bytes(BOM + clean.replace(b"\n", b"\r\n") + b"\r\n\n")
    read = parser_path(ava.read_detections, slow, monkeypatch)
    expected, got = ava.read_detections(tmp_path / "clean.csv"), read(tmp_path / "odd.csv")
    assert expected.num_rows == clean.count(b"\n") and not any(k.startswith("\ufeff") for k in got.keys)
    assert_same_rows(got, expected)


def test_fast_and_general_paths_agree_on_the_fixtures(monkeypatch):
    for name in ("ava_val_v2.1_subset4.csv", "detections_subset4.csv"):
        assert_same_rows(read_slow_path(FIXTURES / name, monkeypatch), read_ava_csv(FIXTURES / name))


@pytest.mark.parametrize("content", [b"", BOM, BOM + b"\n", b"\r\n\r\n", BOM + b"\r\n\n"])
def test_files_with_no_rows(tmp_path, content):
    (tmp_path / "empty.csv").write_bytes(content)
    rows = ava.read_groundtruth(tmp_path / "empty.csv")
    assert rows.num_rows == 0 and rows.keys == [] and rows.boxes.shape == (0, 4)


@pytest.mark.parametrize("slow", [False, True])
def test_bom_inside_the_file_is_an_error(tmp_path, monkeypatch, slow):
    """``cat a.csv b.csv`` of two Excel files: the second BOM would make a phantom video id."""
    path = tmp_path / "gt.csv"
    path.write_bytes(BOM + b"v,0902,0.1,0.2,0.3,0.4,1\n" + BOM + b"v,0903,0.1,0.2,0.3,0.4,1\n")
    read = parser_path(ava.read_groundtruth, slow, monkeypatch)
    with pytest.raises(AvaFormatError, match=r":2: a byte-order mark inside the file"):
        read(path)


@pytest.mark.parametrize("slow", [False, True])
def test_detections_need_exactly_eight_columns(tmp_path, monkeypatch, slow):
    path = tmp_path / "det.csv"
    read = parser_path(ava.read_detections, slow, monkeypatch)
    path.write_text("v,0902,0.1,0.2,0.3,0.4,1\nv,0903,0.1,0.2,0.3,0.4,1\n")  # uniform 7-column block
    with pytest.raises(AvaFormatError) as error:
        read(path)
    assert str(error.value) == (f"{path}:1: expected 8 comma-separated columns, found 7 "
                                "(video,ts,x1,y1,x2,y2,action,score)")
    path.write_text("v,0902,0.1,0.2,0.3,0.4,1,0.5\nv,0903,0.1,0.2,0.3,0.4,1,0.5,7\n")
    with pytest.raises(AvaFormatError, match=r":2: expected 8 comma-separated columns, found 9"):
        read(path)
    path.write_text("v,0902,0.1,0.2,0.3,0.4,1,0.5\nv,0903\n")
    with pytest.raises(AvaFormatError, match=r":2: expected 8 comma-separated columns, found 2"):
        read(path)


@pytest.mark.parametrize("slow", [False, True])
def test_groundtruth_takes_2_7_or_8_columns(tmp_path, monkeypatch, slow):
    path = tmp_path / "gt.csv"
    read = parser_path(ava.read_groundtruth, slow, monkeypatch)
    path.write_text("v,0902,0.1,0.2,0.3,0.4,1\nv,0903,0.1,0.2,0.3,0.4,2,7\nv,0904\n")
    rows = read(path)
    assert rows.actions.tolist() == [1, 2] and rows.scores.tolist() == [1.0, 7.0]
    assert rows.marked_keyframes.tolist() == [2]
    for bad, found in (("v,0905,0.1,0.2,0.3,0.4", 6), ("v,0905,0.1,0.2,0.3,0.4,1,0,9", 9), ("v", 1)):
        path.write_text(f"v,0902,0.1,0.2,0.3,0.4,1,0\n{bad}\n")
        with pytest.raises(AvaFormatError, match=rf":2: expected 2, 7 or 8 comma-separated columns, found {found}$"):
            read(path)


def test_utf16_and_lines_without_breaks_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "gt.csv"
    path.write_bytes("v,0902,0.1,0.2,0.3,0.4,1\n".encode("utf-16"))
    with pytest.raises(AvaFormatError, match=r":1: the file is UTF-16 text"):
        ava.read_groundtruth(path)
    monkeypatch.setattr(ava, "_READ_BLOCK_BYTES", 64)
    monkeypatch.setattr(ava, "_MAX_LINE_BYTES", 200)
    path.write_bytes(b"v,0902\n" + b"x" * 1000)
    with pytest.raises(AvaFormatError, match=r":2: no line break within 200 bytes"):
        ava.read_groundtruth(path)


def test_labelmap_with_bom_crlf_and_duplicate_names(tmp_path):
    path = tmp_path / "labels.pbtxt"
    path.write_bytes(BOM + ITEM_LABELMAP.read_bytes().replace(b"\n", b"\r\n"))
    assert read_labelmap(path) == read_labelmap(ITEM_LABELMAP)
    path.write_text('item { name: "a" id: 1 }\nitem { name: "a" id: 2 }\n')
    with pytest.raises(AvaFormatError, match=r":2: class name 'a' appears twice \(ids 1 and 2\)"):
        read_labelmap(path)
