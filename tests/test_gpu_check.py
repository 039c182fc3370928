"""bench/gpu_check.py: its pure helpers against hand-made inputs, and the whole check in
``--cpu-smoke`` mode, so the GPU script cannot rot between device loans."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import gpu_check
from stage_dist.data.batch import Padding, collate
from tests.reference_stage import random_window

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


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


def test_classify_host_reads_counts_stage_dist_reads_inside_train_step_only():
    step = "stage_dist/train.py(520): train_step"
    stacks = [
        ["torch/optim/adam.py(802): _fused_adam", step, "stage_dist/train.py(499): train_epoch"],  # CPU fused Adam
        ["stage_dist/train.py(504): train_epoch", "stage_dist/train.py(470): fit"],  # loop bookkeeping
        ["stage_dist/model/stage.py(230): padded_logits", "torch/nn/modules/module.py(1): _call_impl", step],
        ["<built-in method item of Tensor object>", "stage_dist/train.py(530): train_step"],
        ["torch/nn/utils/clip_grad.py(80): clip_grad_norm_", step],
    ]
    result = gpu_check.classify_host_reads(stacks, steps=2)
    assert result["host_reads_per_step"] == 2.5
    assert result["stage_dist_reads_in_train_step_per_step"] == 1.5  # model, the step itself, clipping
    sources = result["host_read_sources_per_step"]
    assert sources["torch/optim/adam.py(802): _fused_adam <- " + step] == 0.5
    assert sources["stage_dist/train.py(530): train_step"] == 0.5  # the built-in frame is skipped
    assert gpu_check.classify_host_reads([], steps=4)["stage_dist_reads_in_train_step_per_step"] == 0


def test_describe_loader_batch_wants_a_collated_graph_and_uint8_labels_on_the_host():
    rng = np.random.default_rng(0)
    batch = collate([random_window(rng, 6, 8, 16, clip=c) for c in range(2)], Padding(bucketed=True))
    info = gpu_check.describe_loader_batch(batch)
    assert info["graph_built_in_collate"] and info["labels_uint8_on_host"], info
    assert info["graph_nodes"] == info["feature_rows"] >= batch.num_actors + batch.num_objects
    moved = gpu_check.describe_loader_batch(batch.to("cpu"))  # what the model gets: float labels
    assert moved["graph_built_in_collate"] and not moved["labels_uint8_on_host"]
    assert not gpu_check.describe_loader_batch(object())["graph_built_in_collate"]


def test_read_stats_takes_rank_zero_and_the_largest_peak(tmp_path):
    stats = tmp_path / "run.stats"
    (tmp_path / "run.stats.rank0").write_text(json.dumps({"started": 10.0, "max_allocated": 5,
                                                          "compile": {"seconds": 3.5, "graphs": 2}}))
    (tmp_path / "run.stats.rank1").write_text(json.dumps({"started": 11.0, "max_allocated": 7}))
    result = gpu_check.GpuCheck.read_stats(stats)
    assert result["started"] == 10.0 and result["max_allocated"] == 7 and result["compile"]["graphs"] == 2
    (tmp_path / "cpu.stats.rank0").write_text(json.dumps({"started": 1.0}))
    assert gpu_check.GpuCheck.read_stats(tmp_path / "cpu.stats")["max_allocated"] is None
    with pytest.raises(RuntimeError, match="left no"):
        gpu_check.GpuCheck.read_stats(tmp_path / "missing.stats")


@pytest.mark.slow
def test_cpu_smoke_run_has_every_section_and_every_check_passes(tmp_path):
    report_path = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--budget", "400", "--json", str(report_path),
         "--out", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=600)
    report = json.loads(report_path.read_text())
    sections = report["sections"]
    assert report["meta"]["finished"] and report["meta"]["mode"] == "cpu-smoke"
    assert set(gpu_check.SECTIONS) <= set(sections), completed.stdout[-3000:]
    errors = {name: entry.get("error") for name, entry in sections.items() if entry["status"] != "ok"}
    assert not errors, errors

    # The measurements are there and plausible (CPU: no GPU memory, no CUDA events).
    data = sections["data"]
    assert data["counts"]["train"]["keyframes"] == 4 * 24 and data["counts"]["val"]["keyframes"] == 2 * 24
    for name in ("throughput_recipe_eager", "throughput_windows32", "throughput_recipe_compiled",
                 "throughput_inference"):
        assert sections[name]["keyframes_per_s"] > 0 and 0 <= sections[name]["data_wait_fraction"] < 1, name
    assert sections["throughput_inference"]["actors_predicted"] == data["counts"]["train"]["actors"]
    # The training throughput runs read the node-shared decompressed store.
    for name in ("throughput_recipe_eager", "throughput_windows32", "throughput_recipe_compiled"):
        memmap = sections[name]["memmap"]
        assert memmap["dir"] == str(tmp_path / "work" / "memmap") and "actors__features.npy" in memmap["arrays"]
    assert sections["throughput_windows32"]["windows_per_step"] == 4
    # --compile: compilation measured on its own, throughput after it; its steps profiled too.
    compiled = sections["throughput_recipe_compiled"]
    assert compiled["compile_backend"] == "aot_eager" and compiled["graphs_compiled"] >= 1
    assert 0 < compiled["compile_seconds"] < compiled["process_seconds"]
    assert compiled["seconds_to_first_log"] > compiled["eager_seconds_to_first_log"]  # the compilation shows
    assert compiled["profile"]["compiled"] and compiled["profile"]["profiled_steps"] == 4
    assert compiled["profile"]["stage_dist_reads_in_train_step_per_step"] == 0
    # The profiler runs the current Trainer: train_step gets a Batch with its graph built in collate.
    profile = sections["profiler"]
    assert profile["profiled_steps"] == 4 and not profile["compiled"]
    assert profile["graph_built_in_collate"] and profile["labels_uint8_on_host"]
    assert profile["stage_dist_reads_in_train_step_per_step"] == 0
    assert [row["target"] for row in report["targets"]] == [
        "recipe eager, keyframes/s", "recipe compiled, keyframes/s", "32 windows/step, keyframes/s",
        "32 windows/step, data wait", "inference, keyframes/s", "host syncs per step (no log step)"]

    # Correctness: the kill lands mid-run and resume is exact with and without loader workers.
    resume = sections["train_resume"]
    assert resume["required"] == ["workers0", "workers2"]
    for variant in resume["variants"].values():
        assert variant["kill_landed"] and variant["resumed_logged"], variant
        assert variant["model_optimizer_bitwise"] and variant["rng_equal"] and not variant["differing_keys"], variant
    for name in ("train_fp16", "train_amp_off"):
        assert sections[name]["passed"] and all(math.isfinite(v) for v in sections[name]["losses"]), name
    assert sections["cross_device"]["gpu_ckpt"]["identical"] and sections["cross_device"]["cpu_ckpt"]["identical"]
    shas = sections["inference_consistency"]["sha256"]
    assert len(shas) == 4 and len(set(shas.values())) == 1 and all(shas.values())

    assert report["checks"] == {name: True for name in gpu_check.CHECKS}, completed.stdout[-3000:]
    assert completed.returncode == 0, completed.stdout[-3000:]
