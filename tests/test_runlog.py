"""metrics.jsonl: records written and read back, the resume rule, torn and malformed lines."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from stage_dist.engine.metrics_log import MetricsFileError, MetricsLog, read_metrics


def write_steps(path, steps, *, resumed_step=0):
    log = MetricsLog.open(path, resumed_step=resumed_step)
    for step in steps:
        log.train(step=step, epoch=0, loss=1.0 / step, lr=1e-3, keyframes_per_s=10.0, data_wait=0.5)
    log.close()


def test_records_round_trip_with_nan_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog.open(path, resumed_step=0)
    log.train(step=2, epoch=0, loss=0.25, lr=1e-3, keyframes_per_s=812.5, data_wait=0.125)
    log.validation(step=4, epoch=1, result=SimpleNamespace(mean_ap=0.5, per_class={"sit": 0.75, "run": math.nan},
                                                           group_map={"POSE": 0.75}, grouping="AVA id ranges"))
    log.close()
    train, val = read_metrics(tmp_path)  # the run directory or the file
    assert {k: v for k, v in train.items() if k != "time"} == {
        "kind": "train", "step": 2, "epoch": 0, "loss": 0.25, "lr": 1e-3, "keyframes_per_s": 812.5, "data_wait": 0.125}
    assert val["kind"] == "val" and val["val_map"] == 0.5 and val["per_class"] == {"sit": 0.75, "run": None}
    assert val["group_map"] == {"POSE": 0.75} and val["grouping"] == "AVA id ranges"
    assert all(json.loads(line) for line in path.read_text().splitlines())  # strict JSON: no NaN tokens
    assert "NaN" not in path.read_text()


def test_resume_drops_lines_after_the_checkpoint_and_a_torn_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_steps(path, [2, 4, 6, 8])
    with open(path, "ab") as handle:  # a run killed mid-write
        handle.write(b'{"kind": "train", "step": 1')
    assert [r["step"] for r in read_metrics(path)] == [2, 4, 6, 8]  # a torn last line does not break reading
    write_steps(path, [6, 8, 10], resumed_step=5)  # resumed from the checkpoint of step 5
    assert [r["step"] for r in read_metrics(path)] == [2, 4, 6, 8, 10]
    assert path.read_bytes().endswith(b"}\n")
    write_steps(path, [2], resumed_step=0)  # a fresh run starts the file anew
    assert [r["step"] for r in read_metrics(path)] == [2]


def test_resume_after_the_last_line_keeps_everything(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_steps(path, [2, 4])
    before = path.read_bytes()
    MetricsLog.open(path, resumed_step=4).close()
    assert path.read_bytes() == before


@pytest.mark.parametrize("content, where", [
    (b"", "holds no metrics records"),
    (b'{"kind": "train", "step": 2}\nnot json\n{"kind": "train", "step": 4}\n', "line 2: not JSON"),
    (b'{"kind": "train", "step": 2}\n[1, 2]\n', "line 2: not a metrics record"),
    (b'{"kind": "eval", "step": 2}\n', "line 1: not a metrics record"),
    (b'{"kind": "train", "step": "2"}\n', "line 1: not a metrics record"),
])
def test_bad_files_are_one_line_naming_file_and_line(tmp_path, content, where):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    with pytest.raises(MetricsFileError, match=where) as error:
        read_metrics(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(MetricsFileError, match="no such file"):
        read_metrics(tmp_path / "elsewhere")
