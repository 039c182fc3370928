"""Hostile input for ``python -m stage_dist.evaluate``: what a careless or unlucky user gives it.

Every case runs the real command line in a subprocess and asserts the exit code, that the
message names the file (and line where there is one), that a warning reaches stderr where the
numbers are still right but probably not what the user wanted, and that no file in the case's
directory changed (sha256 before and after) apart from the outputs the case asks for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, subprocess_env

GOOD_GT = "vid,0902,0.100,0.100,0.500,0.900,1,0\nvid,0902,0.600,0.100,0.900,0.900,2,1\nvid,0903\n"
GOOD_DET = ("vid,0902,0.100,0.100,0.500,0.900,1,0.900000\nvid,0902,0.600,0.100,0.900,0.900,2,0.800000\n"
            "vid,0902,0.600,0.100,0.900,0.900,1,0.300000\nvid,0903,0.200,0.200,0.400,0.400,2,0.500000\n")
GOOD_LABELMAP = 'item {\n  name: "one"\n  id: 1\n}\nitem {\n  name: "two"\n  id: 2\n}\n'
BOM = b"\xef\xbb\xbf"


# --- a small local harness (the shared one lives in tests/hostile.py on another branch) -----------


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (relative path -> sha256 of a file, a link's target, or "dir")."""
    entries = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            entries[str(path.relative_to(root))] = "link -> " + os.readlink(path)
        elif path.is_dir():
            entries[str(path.relative_to(root))] = "dir"
        else:
            entries[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def evaluate_cli(cwd: Path, *args: str, outputs: tuple[str, ...] = ()) -> Outcome:
    """Run the CLI in ``cwd``; assert that no file there changed apart from ``outputs``."""
    before = snapshot(cwd)
    done = subprocess.run([sys.executable, "-m", "stage_dist.evaluate", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    after = snapshot(cwd)
    for name in outputs:
        before.pop(name, None)
        after.pop(name, None)
    assert after == before, "an input or unrelated file changed"
    assert "Traceback" not in done.stderr, done.stderr
    return Outcome(done.returncode, done.stdout, done.stderr)


def assert_error(outcome: Outcome, where: str, what: str) -> None:
    """Exit 2 with one line ``error: <where>: ...<what>...``."""
    assert outcome.returncode == 2, outcome
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith(f"error: {where}: "), lines[0]
    assert what in lines[0], lines[0]


def write(root: Path, name: str, content: str | bytes) -> Path:
    path = root / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.fixture
def case(tmp_path: Path) -> Path:
    """A directory with a good groundtruth, detections file and label map."""
    write(tmp_path, "gt.csv", GOOD_GT)
    write(tmp_path, "det.csv", GOOD_DET)
    write(tmp_path, "labels.pbtxt", GOOD_LABELMAP)
    return tmp_path


def run_default(root: Path, *extra: str, outputs: tuple[str, ...] = ()) -> Outcome:
    return evaluate_cli(root, "-g", "gt.csv", "-d", "det.csv", "-l", "labels.pbtxt", *extra, outputs=outputs)


# --- malformed CSV rows: one line naming file and line -------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "where", "what"),
    [
        # a detections file without its score column must never be read as scores of 1.0
        ("det.csv", GOOD_DET.replace(",0.900000\n", "\n").replace(",0.800000\n", "\n").replace(
            ",0.300000\n", "\n").replace(",0.500000\n", "\n"), "det.csv:1",
         "expected 8 comma-separated columns, found 7 (video,ts,x1,y1,x2,y2,action,score)"),
        ("det.csv", GOOD_DET + "vid,0903,0.2,0.2,0.4,0.4,2\n", "det.csv:5", "found 7"),  # fast path, then 7
        ("det.csv", GOOD_DET.replace("0.800000\n", "0.800000,1\n"), "det.csv:2", "found 9"),
        ("det.csv", GOOD_DET + "vid,0904\n", "det.csv:5", "expected 8 comma-separated columns, found 2"),
        ("det.csv", GOOD_DET.replace("0.500000", "nan"), "det.csv:4", "score 'nan' is not a finite number"),
        ("det.csv", "video_id,timestamp,x1,y1,x2,y2,action_id,score\n" + GOOD_DET, "det.csv:1",
         "timestamp 'timestamp' is not a number"),
        ("gt.csv", GOOD_GT.replace("0.900,2,1\n", "2\n"), "gt.csv:2",
         "expected 2, 7 or 8 comma-separated columns, found 6"),
        ("gt.csv", GOOD_GT.replace("0.600", "abc"), "gt.csv:2", "x1 'abc' is not a number"),
        ("gt.csv", GOOD_GT.replace(",", ";"), "gt.csv:1", "expected 2, 7 or 8 comma-separated columns, found 1"),
        ("gt.csv", "vid,0902,0.1,0.1,0.5,0.9,1.5,0\n", "gt.csv:1", "action id '1.5' is not an integer"),
        ("gt.csv", b"\xff\xfe" + GOOD_GT.encode("utf-16-le"), "gt.csv:1", "UTF-16"),
        ("det.csv", b"\xe9t\xe9,0902,0.1,0.1,0.5,0.9,1,0.5\n", "det.csv:1", "not valid UTF-8"),
    ],
    ids=["det-7-columns", "det-7-columns-after-good-rows", "det-9-columns", "det-2-columns",
         "det-nan-score", "det-header-line", "gt-6-columns", "gt-bad-number", "gt-semicolons",
         "gt-fractional-action", "gt-utf16", "det-latin1"],
)
def test_malformed_rows_name_file_and_line(case, name, content, where, what):
    write(case, name, content)
    assert_error(run_default(case), where, what)


def test_binary_file_without_line_breaks(case):
    blob = bytes(b for b in os.urandom(1_200_000) if b != 10)
    write(case, "det.csv", blob)
    assert_error(run_default(case), "det.csv:1", "no line break within")


def test_exclusions_with_box_columns(case):
    write(case, "excl.csv", "vid,0902\nvid,0903,0.1,0.1,0.5,0.9,1\n")
    assert_error(run_default(case, "-e", "excl.csv"), "excl.csv:2", "expected 2 comma-separated columns, found 7")


# --- label maps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "where", "what"),
    [
        (GOOD_LABELMAP.replace("id: 2", "id: 1"), "labels.pbtxt:5", "class id 1 appears twice"),
        (GOOD_LABELMAP.replace('"two"', '"one"'), "labels.pbtxt:5", "class name 'one' appears twice (ids 1 and 2)"),
        (GOOD_LABELMAP.replace("id: 2", "id: 0"), "labels.pbtxt:7", "id 0 must be >= 1"),
        (GOOD_DET, "labels.pbtxt:1", "expected 'item {' or 'label {'"),  # results.csv given as -l
        ("", "labels.pbtxt", "label map has no entries"),
        (b"item {\n  name: \"caf\xe9\"\n  id: 1\n}\n", "labels.pbtxt:2", "not UTF-8 text"),
    ],
    ids=["duplicate-id", "duplicate-name", "id-zero", "a-csv", "empty", "latin1"],
)
def test_bad_labelmap(case, content, where, what):
    write(case, "labels.pbtxt", content)
    assert_error(run_default(case), where, what)


# --- bad paths ------------------------------------------------------------------------------------------


def test_missing_groundtruth(case):
    (case / "gt.csv").unlink()
    assert_error(run_default(case), "gt.csv", "cannot read: No such file or directory")


def test_directory_as_detections(case):
    (case / "det.csv").unlink()
    (case / "det.csv").mkdir()
    assert_error(run_default(case), "det.csv", "cannot read: Is a directory")


def test_directory_as_labelmap(case):
    (case / "labels.pbtxt").unlink()
    (case / "labels.pbtxt").mkdir()
    assert_error(run_default(case), "labels.pbtxt", "cannot read label map: Is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_detections(case):
    (case / "det.csv").chmod(0)
    try:
        assert_error(run_default(case), "det.csv", "cannot read: Permission denied")
    finally:
        (case / "det.csv").chmod(0o644)


def test_unreadable_detections_as_any_user(case, monkeypatch, capsys):
    """The same, in process, with ``open`` refusing the file (works when the tests run as root)."""
    import builtins

    from stage_dist.evaluate import main

    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file).endswith("det.csv"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.chdir(case)
    before = snapshot(case)
    monkeypatch.setattr(builtins, "open", refusing_open)
    assert main(["-g", "gt.csv", "-d", "det.csv", "-l", "labels.pbtxt"]) == 2
    monkeypatch.undo()
    assert capsys.readouterr().err == "error: det.csv: cannot read: Permission denied\n"
    assert snapshot(case) == before


def test_missing_labelmap_flag_is_a_usage_error(case):
    outcome = evaluate_cli(case, "-g", "gt.csv", "-d", "det.csv")
    assert outcome.returncode == 2 and "-l/--labelmap" in outcome.stderr


def test_empty_groundtruth(case):
    write(case, "gt.csv", b"")
    assert_error(run_default(case), "gt.csv", "the groundtruth has no rows")
    write(case, "gt.csv", BOM + b"\r\n")
    assert_error(run_default(case), "gt.csv", "the groundtruth has no rows")


# --- outputs never replace an input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "target", "what"),
    [
        ("--json", "gt.csv", "--json would overwrite the file given as -g"),
        ("--plot", "det.csv", "--plot would overwrite the file given as -d"),
        ("--json", "./labels.pbtxt", "--json would overwrite the file given as -l"),
    ],
)
def test_output_that_is_an_input_is_refused(case, flag, target, what):
    assert_error(run_default(case, flag, target), target, what)


def test_output_through_a_symlink_to_an_input_is_refused(case):
    (case / "metrics.json").symlink_to(case / "gt.csv")
    assert_error(run_default(case, "--json", "metrics.json"), "metrics.json", "would overwrite the file given as -g")


def test_json_and_plot_to_one_file_is_refused(case):
    assert_error(run_default(case, "--json", "out", "--plot", "out"), "out",
                 "--plot would overwrite the file given as --json")
    assert not (case / "out").exists()


def test_output_that_is_a_directory(case):
    (case / "metrics.json").mkdir()
    assert_error(run_default(case, "--json", "metrics.json"), "metrics.json", "--json is a directory")


def test_output_in_an_unwritable_place(case):
    write(case, "blocker", "a file, not a directory\n")
    assert_error(run_default(case, "--json", "blocker/metrics.json"), "blocker/metrics.json", "cannot write")


def test_json_is_written_and_replaced_atomically(case):
    write(case, "metrics.json", "old\n")
    outcome = run_default(case, "--json", "metrics.json", outputs=("metrics.json",))
    assert outcome.returncode == 0, outcome
    metrics = json.loads((case / "metrics.json").read_text())
    assert metrics["PascalBoxes_Precision/mAP@0.5IOU"] == pytest.approx(1.0)
    assert sorted(p.name for p in case.iterdir()) == ["det.csv", "gt.csv", "labels.pbtxt", "metrics.json"]


# --- warnings: right numbers, but probably not what the user meant --------------------------------------


def test_empty_detections_warn_and_score_zero(case):
    write(case, "det.csv", b"")
    outcome = run_default(case)
    assert outcome.returncode == 0, outcome
    assert "WARNING" in outcome.stderr and "det.csv: no detections" in outcome.stderr
    assert outcome.stdout.startswith("frame-mAP@0.5: 0.0000")


def test_detections_of_other_videos_warn(case):
    write(case, "det.csv", GOOD_DET.replace("vid,", "other_vid,"))
    outcome = run_default(case)
    assert outcome.returncode == 0, outcome
    assert "det.csv: none of the 2 detection keyframes is a groundtruth keyframe" in outcome.stderr
    assert outcome.stdout.startswith("frame-mAP@0.5: 0.0000")


def test_detections_of_classes_outside_the_labelmap_warn(case):
    write(case, "det.csv", GOOD_DET.replace(",1,0.", ",7,0.").replace(",2,0.", ",9,0."))
    outcome = run_default(case)
    assert outcome.returncode == 0 and "det.csv: no detection has an action id of the label map" in outcome.stderr


def test_groundtruth_without_labelmap_classes_warns(case):
    write(case, "gt.csv", GOOD_GT.replace(",1,0\n", ",5,0\n").replace(",2,1\n", ",6,1\n"))
    outcome = run_default(case)
    assert outcome.returncode == 0 and "gt.csv: no groundtruth box has an action of the label map" in outcome.stderr
    assert outcome.stdout.startswith("frame-mAP@0.5: nan")


# --- encodings and line endings give the same numbers ---------------------------------------------------


def official_files(root: Path) -> None:
    shutil.copy(FIXTURES / "ava_val_v2.1_subset4.csv", root / "gt.csv")
    shutil.copy(FIXTURES / "detections_subset4.csv", root / "det.csv")
    shutil.copy(FIXTURES / "ava_action_list_v2.1_for_activitynet_2018.pbtxt", root / "labels.pbtxt")


@pytest.mark.parametrize(
    "variant",
    ["bom-gt", "bom-det", "bom-labelmap", "crlf-everywhere", "trailing-blank-lines", "bom-crlf-gt"],
)
def test_bom_crlf_and_blank_lines_change_nothing(tmp_path, variant):
    clean, odd = tmp_path / "clean", tmp_path / "odd"
    clean.mkdir(), odd.mkdir()
    official_files(clean)
    official_files(odd)

    def edit(name: str, change) -> None:
        (odd / name).write_bytes(change((odd / name).read_bytes()))

    if variant == "bom-gt":
        edit("gt.csv", lambda b: BOM + b)
    elif variant == "bom-det":
        edit("det.csv", lambda b: BOM + b)
    elif variant == "bom-labelmap":
        edit("labels.pbtxt", lambda b: BOM + b)
    elif variant == "crlf-everywhere":
        for name in ("gt.csv", "det.csv", "labels.pbtxt"):
            edit(name, lambda b: b.replace(b"\n", b"\r\n"))
    elif variant == "trailing-blank-lines":
        edit("gt.csv", lambda b: b + b"\n\n")
        edit("det.csv", lambda b: b + b"\r\n")
    else:
        edit("gt.csv", lambda b: BOM + b.replace(b"\n", b"\r\n"))
    expected = run_default(clean, "--json", "m.json", outputs=("m.json",))
    got = run_default(odd, "--json", "m.json", outputs=("m.json",))
    assert expected.returncode == got.returncode == 0, got
    assert got.stdout == expected.stdout and got.stderr == expected.stderr == ""
    assert (odd / "m.json").read_bytes() == (clean / "m.json").read_bytes()
    official = json.loads((FIXTURES / "official_metrics_subset4.json").read_text())
    assert json.loads((odd / "m.json").read_text())["PascalBoxes_Precision/mAP@0.5IOU"] == pytest.approx(
        official["PascalBoxes_Precision/mAP@0.5IOU"], abs=1e-5)


def test_detections_that_are_only_a_bom_are_empty(case):
    write(case, "det.csv", BOM)
    outcome = run_default(case)
    assert outcome.returncode == 0 and "det.csv: no detections" in outcome.stderr


def test_negative_and_flipped_boxes_are_read_as_the_official_evaluator_does(case):
    """Boxes outside [0, 1] are kept; boxes with x1 >= x2 are dropped after the cap (no error)."""
    write(case, "det.csv", GOOD_DET + "vid,0902,0.9,0.1,0.6,0.9,2,0.95\nvid,0902,-0.2,-0.1,0.1,0.2,1,0.99\n")
    outcome = run_default(case, "--json", "m.json", outputs=("m.json",))
    assert outcome.returncode == 0 and outcome.stderr == ""
    metrics = json.loads((case / "m.json").read_text())
    # class 2: the flipped box is dropped, so its AP stays 1.0; class 1: a false positive ranks first
    assert metrics["PascalBoxes_PerformanceByCategory/AP@0.5IOU/two"] == 1.0
    assert metrics["PascalBoxes_PerformanceByCategory/AP@0.5IOU/one"] == 0.5
