"""bench/gpu_check.py: its pure helpers against hand-made inputs, and the whole check in
``--cpu-smoke`` mode, so the GPU script cannot rot between device loans."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gpu_check = load_script()

# Defects the smoke run finds in the code as it stands (see the lead's wave-1 notes); the test
# xfails while they fail and passes once they are fixed. Any other failed check fails the test.
KNOWN_DEFECTS = {
    # DataLoader(num_workers > 0) calls iter(batch_sampler) twice on its first iterator and
    # ClipWindowSampler.__iter__ consumes the resume step on the first call: a resumed epoch restarts.
    "train_resume": "resume with DataLoader workers replays the epoch from its first step",
    # A batch of 2 windows scores differently (last digit) from the same windows one per batch.
    "inference_consistency": "results.csv depends on --windows-per-batch once a batch holds 2+ windows",
}

ROWS = ["vid_a,0902,0.100,0.200,0.300,0.400,{action},{score}".format(action=a, score=s)
        for a, s in ((1, "0.500000"), (2, "0.250000"))]


def test_compare_results_csv_identical_and_different(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    a.write_text("\n".join(ROWS) + "\n")
    b.write_text("\n".join(ROWS) + "\n")
    c.write_text("\n".join([ROWS[0], ROWS[1].replace("0.250000", "0.250700")]) + "\n")
    same = gpu_check.compare_results_csv(a, b)
    assert same["identical"] and same["max_abs_score_diff"] == 0.0
    differ = gpu_check.compare_results_csv(a, c)
    assert not differ["identical"] and differ["same_rows"]
    assert differ["max_abs_score_diff"] == pytest.approx(0.0007)
    missing = tmp_path / "d.csv"
    missing.write_text(ROWS[0] + "\n")
    assert not gpu_check.compare_results_csv(a, missing)["same_rows"]


def test_compare_states_finds_the_largest_difference():
    a = {"model_state": {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}, "step": 3,
         "rng": [torch.tensor([1, 2], dtype=torch.uint8)]}
    b = {"model_state": {"w": torch.tensor([1.0, 2.25]), "b": torch.tensor([0.5])}, "step": 3,
         "rng": [torch.tensor([1, 2], dtype=torch.uint8)]}
    assert gpu_check.compare_states(a, a)["equal"]
    result = gpu_check.compare_states(a, b)
    assert not result["equal"] and result["differing"] == ["/model_state/w"]
    assert result["max_abs_diff"] == 0.25
    assert gpu_check.compare_states({"x": 1}, {"y": 1})["num_differing"] == 2


def test_steady_is_the_median_of_the_second_half():
    assert gpu_check.steady([100.0, 1.0, 10.0, 30.0, 20.0]) == 20.0  # median of [10, 30, 20]
    assert gpu_check.steady([5.0]) == 5.0
    assert gpu_check.steady([]) is None


def test_newest_checkpoint_orders_by_epoch_then_step(tmp_path):
    for name in ("ckpt_e0000_s000900.pt", "ckpt_e0001_s000010.pt", "best.pt", ".tmp-ckpt_e0002_s000001.pt.x"):
        (tmp_path / name).write_bytes(b"")
    assert gpu_check.newest_checkpoint(tmp_path).name == "ckpt_e0001_s000010.pt"


def test_targets_pass_and_miss_on_the_gpu_and_are_not_judged_in_the_smoke_run():
    sections = {"throughput_recipe_eager": {"keyframes_per_s": 2500.0},
                "throughput_windows32": {"keyframes_per_s": 29000.0, "data_wait_fraction": 0.05},
                "profiler": {"host_syncs_per_step": 0.0}}
    rows = {row["target"]: row["result"] for row in gpu_check.evaluate_targets(sections, smoke=False)}
    assert rows == {"recipe eager, keyframes/s": "PASS", "recipe compiled, keyframes/s": "n/a",
                    "32 windows/step, keyframes/s": "MISS", "32 windows/step, data wait": "PASS",
                    "inference, keyframes/s": "n/a", "host syncs per step (no log step)": "PASS"}
    smoke = gpu_check.evaluate_targets(sections, smoke=True)
    assert {row["result"] for row in smoke} == {"n/a", "n/a (cpu-smoke)"}


@pytest.mark.slow
def test_cpu_smoke_run_has_every_section_and_its_checks_pass(tmp_path):
    report_path = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--budget", "400", "--json", str(report_path),
         "--out", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=600)
    report = json.loads(report_path.read_text())
    sections = report["sections"]
    assert report["meta"]["finished"] and report["meta"]["mode"] == "cpu-smoke"
    assert set(gpu_check.SECTIONS) <= set(sections), completed.stdout[-3000:]
    errors = {name: entry.get("error") for name, entry in sections.items() if entry["status"] == "error"}
    assert not errors, errors
    assert sections["throughput_recipe_compiled"]["status"] == "skipped"

    # The measurements are there and plausible (CPU: no GPU memory, no CUDA events).
    data = sections["data"]
    assert data["counts"]["train"]["keyframes"] == 4 * 24 and data["counts"]["val"]["keyframes"] == 2 * 24
    for name in ("throughput_recipe_eager", "throughput_windows32", "throughput_inference"):
        assert sections[name]["keyframes_per_s"] > 0 and 0 <= sections[name]["data_wait_fraction"] < 1, name
    assert sections["throughput_inference"]["actors_predicted"] == data["counts"]["train"]["actors"]
    profile = sections["profiler"]
    assert profile["profiled_steps"] == 4 and profile["item_calls_per_step"] >= 1  # at least the loss read-back
    assert "train_step" in " ".join(profile["host_read_sources_per_step"])
    assert [row["target"] for row in report["targets"]] == [
        "recipe eager, keyframes/s", "recipe compiled, keyframes/s", "32 windows/step, keyframes/s",
        "32 windows/step, data wait", "inference, keyframes/s", "host syncs per step (no log step)"]

    # Correctness: the kill lands mid-run and, without loader workers, resume is bitwise exact.
    for variant in sections["train_resume"]["variants"].values():
        assert variant["kill_landed"] and variant["resumed_logged"], variant
    assert sections["train_resume"]["variants"]["workers0"]["passed"]
    for name in ("train_fp16", "train_amp_off"):
        assert sections[name]["passed"] and all(math.isfinite(v) for v in sections[name]["losses"]), name
    assert sections["cross_device"]["gpu_ckpt"]["within_tolerance"]
    assert sections["cross_device"]["cpu_ckpt"]["within_tolerance"]
    shas = sections["inference_consistency"]["sha256"]
    assert len(shas) == 4 and all(shas.values())
    # Different settings agree to the printed precision even where the bytes differ.
    assert all(d <= 1e-5 for d in sections["inference_consistency"]["max_abs_score_diff_vs_r1_w24_b32"].values())

    failed = {name for name, ok in report["checks"].items() if not ok}
    assert failed <= set(KNOWN_DEFECTS), (failed, completed.stdout[-3000:])
    assert (completed.returncode == 0) == (not failed)
    if failed:
        pytest.xfail("known defects still present: " + "; ".join(KNOWN_DEFECTS[name] for name in sorted(failed)))
