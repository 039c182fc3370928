"""python -m stage_dist.curves: the points it draws, the PNG, and bad metrics files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stage_dist.curves import main as curves_main
from stage_dist.engine.curves import Curves, run_names
from stage_dist.engine.metrics_log import MetricsLog, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(directory: Path, losses: dict[int, float], val: dict[int, float]) -> Path:
    log = MetricsLog.open(directory / "metrics.jsonl", resumed_step=0)
    for step in sorted({*losses, *val}):
        if step in losses:
            log.train(step=step, epoch=0, loss=losses[step], lr=1e-3, keyframes_per_s=100.0, data_wait=0.1)
        if step in val:
            log.write({"kind": "val", "step": step, "epoch": 1, "val_map": val[step], "per_class": {}})
    log.close()
    return directory


def test_curves_are_the_records_points():
    records = [{"kind": "train", "step": 2, "loss": 0.5}, {"kind": "val", "step": 4, "val_map": 0.25},
               {"kind": "train", "step": 4, "loss": 0.25}, {"kind": "val", "step": 8, "val_map": None}]
    assert Curves.of(records) == Curves([2, 4], [0.5, 0.25], [4], [0.25])


def test_two_runs_side_by_side_make_one_png(tmp_path, capsys):
    a = make_run(tmp_path / "a" / "run", {10: 0.7, 20: 0.5, 30: 0.4}, {20: 0.3, 30: 0.35})
    b = make_run(tmp_path / "b" / "run", {10: 0.6, 20: 0.45}, {})
    with open(b / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "st')  # a torn last line (a run killed mid-write) is skipped
    assert run_names([a, b / "metrics.jsonl"]) == ["a/run", "b/run"]
    out = tmp_path / "curves.png"
    assert curves_main([str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000
    assert "2 run(s)" in capsys.readouterr().out


def test_both_panels_share_the_step_axis_and_a_run_without_validation_is_named():
    """A run validated once at its end: its point sits at that step of the loss panel's axis (not
    on an axis of its own around it); a run without validation is in the mAP legend as such."""
    import matplotlib.pyplot as plt

    from stage_dist.engine.curves import curves_figure

    ended = [*({"kind": "train", "step": s, "loss": 1 / s} for s in range(10, 1001, 10)),
             {"kind": "val", "step": 1000, "val_map": 0.4}]
    fig = curves_figure([("ended", ended), ("no val", [{"kind": "train", "step": 500, "loss": 0.2}])])
    try:
        loss_ax, map_ax = fig.axes
        assert map_ax.get_xlim() == loss_ax.get_xlim() and map_ax.get_xlim()[0] < 100
        labels = [text.get_text() for text in map_ax.get_legend().get_texts()]
        assert labels == ["ended (last 0.4000, best 0.4000)", "no val (no validation)"]
    finally:
        plt.close(fig)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "holds no metrics records"),
    ('{"kind": "train", "step": 1, "loss": 1}\n{oops\n{"kind": "train", "step": 2, "loss": 1}\n', "line 2"),
])
def test_bad_metrics_file_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    out = tmp_path / "curves.png"
    assert curves_main([str(run), "-o", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(run / "metrics.jsonl") in error and message in error, error
    assert not out.exists()


def test_refuses_to_write_over_its_input(tmp_path, capsys):
    run = make_run(tmp_path / "run", {1: 0.5}, {})
    before = (run / "metrics.jsonl").read_bytes()
    assert curves_main([str(run), "-o", str(run / "metrics.jsonl")]) == 2
    assert (run / "metrics.jsonl").read_bytes() == before
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert "metrics.jsonl" in capsys.readouterr().err


def test_names_must_match_the_runs(tmp_path, capsys):
    run = make_run(tmp_path / "run", {1: 0.5}, {})
    with pytest.raises(SystemExit) as exit_:
        curves_main([str(run), "-o", str(tmp_path / "c.png"), "--names", "x", "y"])
    assert exit_.value.code == 2 and "--names" in capsys.readouterr().err
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
