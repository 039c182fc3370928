"""Process-group helpers: world size 1 without torchrun, and a real 2-process gloo run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stage_dist.engine.distributed import (
    DistEnv,
    DistributedError,
    all_reduce_mean,
    barrier,
    cleanup,
    gather_to_main,
    init_distributed,
    setup_logging,
)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_plain_run_is_world_size_one(no_torchrun):
    env = init_distributed("cpu")
    assert env == DistEnv(0, 1, 0, torch.device("cpu"), None)
    assert env.is_main and not env.distributed
    assert not torch.distributed.is_initialized()
    payload = {"scores": np.arange(4.0)}
    assert gather_to_main(payload, env) == [payload]
    assert all_reduce_mean(2.5, env) == 2.5
    barrier(env)
    cleanup(env)


@pytest.mark.parametrize(
    "environ,message",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "invalid RANK=2 for WORLD_SIZE=2"),
    ],
)
def test_bad_launch_environment(no_torchrun, monkeypatch, environ, message):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DistributedError, match=message):
        init_distributed("cpu")


def test_bad_device(no_torchrun):
    with pytest.raises(DistributedError, match="'auto', 'cuda' or 'cpu'"):
        init_distributed("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DistributedError, match="CUDA is not available"):
            init_distributed("cuda")


def test_setup_logging_prefixes_rank_and_quiets_other_ranks(capsys, restore_logging):
    worker = DistEnv(3, 4, 3, torch.device("cpu"), "gloo")
    setup_logging(worker)
    logging.getLogger("stage_dist.test").info("hidden")
    logging.getLogger("stage_dist.test").warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "[rank 3] WARNING stage_dist.test: shown" in err

    setup_logging(DistEnv(0, 4, 0, torch.device("cpu"), "gloo"))
    logging.getLogger("stage_dist.test").info("progress")
    assert "[rank 0] INFO stage_dist.test: progress" in capsys.readouterr().err


WORKER = """
import json, logging, sys
import numpy as np
from stage_dist.engine.distributed import (
    all_reduce_mean, barrier, cleanup, gather_to_main, init_distributed, setup_logging,
)
from stage_dist.data.sampler import ClipWindowSampler, plan_inference_windows, rank_slice

env = init_distributed("cpu")
setup_logging(env)
logging.getLogger("worker").info("info from rank %d", env.rank)
logging.getLogger("worker").warning("warning from rank %d", env.rank)

big = np.full((1_000_000,), env.rank, dtype=np.float32)  # 4 MB per rank
gathered = gather_to_main({"rank": env.rank, "big": big}, env)
mean = all_reduce_mean(float(env.rank + 1), env)

sampler = ClipWindowSampler([897, 3, 40, 7], rank=env.rank, world_size=env.world_size, seed=1)
sampler.set_epoch(1)
steps = [[list(w) for w in step] for step in sampler]
all_steps = gather_to_main(steps, env)
plan = plan_inference_windows([897, 3, 40, 7], window=6)
owned = gather_to_main(
    [[w.spec.clip, k] for w in rank_slice(plan, env.rank, env.world_size) for k in w.owned], env)
barrier(env)

result = {"rank": env.rank, "world_size": env.world_size, "backend": env.backend, "mean": mean,
          "gathered": None if gathered is None else [
              [g["rank"], float(g["big"].sum()), g["big"].shape[0]] for g in gathered],
          "steps": all_steps, "owned": owned}
with open(f"{sys.argv[1]}/rank{env.rank}.json", "w") as f:
    json.dump(result, f)
cleanup(env)
"""


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    environ = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    environ["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=environ,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    main = json.loads((tmp_path / "rank0.json").read_text())
    other = json.loads((tmp_path / "rank1.json").read_text())

    assert (main["rank"], main["world_size"], main["backend"]) == (0, 2, "gloo")
    assert (other["rank"], other["world_size"]) == (1, 2)
    assert main["mean"] == other["mean"] == 1.5
    assert main["gathered"] == [[0, 0.0, 1_000_000], [1, 1_000_000.0, 1_000_000]]
    assert other["gathered"] is None and other["steps"] is None

    steps = main["steps"]
    assert len(steps[0]) == len(steps[1]) > 0, "both ranks run the same number of steps"
    assert steps[0] != steps[1]
    owned = [tuple(key) for shard in main["owned"] for key in shard]
    expected = [(c, k) for c, n in enumerate([897, 3, 40, 7]) for k in range(n)]
    assert owned == expected, "every keyframe owned once, rank shards concatenate in store order"

    assert "[rank 0] INFO worker: info from rank 0" in proc.stderr
    assert "[rank 1] WARNING worker: warning from rank 1" in proc.stderr
    assert "info from rank 1" not in proc.stderr


def test_process_group_binds_the_gpu_and_takes_the_timeout():
    from datetime import timedelta

    from stage_dist.engine.distributed import process_group_options

    gpu = torch.device("cuda", 3)  # a device object needs no GPU
    assert process_group_options(gpu, timedelta(minutes=60)) == {
        "backend": "nccl", "device_id": gpu, "timeout": timedelta(minutes=60)}
    assert process_group_options(torch.device("cpu"), timedelta(minutes=5)) == {
        "backend": "gloo", "timeout": timedelta(minutes=5)}


def test_dist_timeout_reaches_init_process_group(no_torchrun, monkeypatch):
    from datetime import timedelta

    from stage_dist.engine import distributed

    calls = []
    monkeypatch.setattr(distributed, "_attempt_store", lambda rank, world, timeout: ("store", timeout))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    env = init_distributed("cpu", timeout_minutes=90)
    assert env.backend == "gloo"
    [call] = calls
    assert call["timeout"] == timedelta(minutes=90) and call["store"] == ("store", timedelta(minutes=90))
    assert call["backend"] == "gloo" and "device_id" not in call
    with pytest.raises(DistributedError, match="timeout must be > 0"):
        init_distributed("cpu", timeout_minutes=0)


@pytest.mark.parametrize(
    "cores,local_world,distributed,workers,expected",
    [
        # (affinity cores, LOCAL_WORLD_SIZE, in a process group, --workers, (workers, threads))
        (16, 8, True, None, (1, 1)),  # 8 GPUs on a 16-core node: 2 cores a rank
        (16, 1, True, None, (4, 12)),  # one rank owns the node: at most 4 workers
        (64, 8, True, None, (4, 4)),
        (2, 1, False, None, (1, 1)),
        (1, 1, False, None, (0, 1)),  # one core: batches built in the rank itself
        (16, 8, False, None, (4, 12)),  # LOCAL_WORLD_SIZE without a process group is not a share
        (16, 8, True, 3, (3, 1)),  # --workers N is taken as given; threads never below 1
        (16, 1, True, 0, (0, 16)),
    ],
)
def test_loader_workers_and_threads_are_the_ranks_share_of_its_cores(monkeypatch, cores, local_world,
                                                                     distributed, workers, expected):
    from stage_dist.engine import distributed as dist_module
    from stage_dist.engine.distributed import configure_threads, loader_workers

    monkeypatch.setattr(dist_module.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads_set: list[int] = []
    monkeypatch.setattr(dist_module.torch, "set_num_threads", threads_set.append)
    env = DistEnv(0, 8 if distributed else 1, 0, torch.device("cpu"), "gloo" if distributed else None)
    resolved = loader_workers(workers, env)
    assert (resolved, configure_threads(0, env, workers)) == expected
    assert threads_set == [expected[1]]
    assert configure_threads(5, env, workers) == 5  # --threads N wins


def test_runtime_workers_default_is_auto_and_explicit_counts_stay():
    from stage_dist.core.config import ConfigError, RuntimeConfig, build_parser, parse_config

    assert RuntimeConfig().workers is None
    assert parse_config(RuntimeConfig, ["--workers", "3"]).workers == 3
    assert parse_config(RuntimeConfig, ["--workers", "0"]).workers == 0
    with pytest.raises(ConfigError, match="--workers must be >= 0"):
        RuntimeConfig(workers=-1)
    assert "auto" in build_parser(RuntimeConfig).format_help()


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:]


def test_deterministic_sets_cublas_workspace_and_deterministic_kernels(restore_determinism, monkeypatch):
    from stage_dist.engine.distributed import configure_determinism

    configure_determinism(False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()
    torch.backends.cudnn.benchmark = True
    configure_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other valid setting is the user's to choose
    configure_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
