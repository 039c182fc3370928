"""launch/: the torchrun command each script builds, and a real 2-node job on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, Stores, subprocess_env

LAUNCH = REPO / "launch"

STUB_TORCHRUN = textwrap.dedent(
    """
    import json, os, sys
    out = os.path.join(os.environ["STUB_DIR"], "%d.json" % os.getpid())
    keep = ("OMP_NUM_THREADS", "SLURM_NODEID", "MASTER_ADDR")
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keep}}, open(out, "w"))
    """
)

# Stand-ins for SLURM's tools: srun starts its command once per node with SLURM_NODEID set.
FAKE_SRUN = textwrap.dedent(
    """\
    #!/usr/bin/env bash
    printf '%s\n' "$@" > "$STUB_DIR/srun_args.txt"
    nodes=1
    while [[ "$1" == --* ]]; do
        [[ "$1" == --nodes=* ]] && nodes="${1#--nodes=}"
        shift
    done
    pids=()
    for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit $status
    """
)
FAKE_SCONTROL = "#!/usr/bin/env bash\nprintf 'node-a\\nnode-b\\n'\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stub(tmp_path):
    """Environment whose TORCHRUN records its arguments instead of launching; returns (env, reader)."""
    script = tmp_path / "stub_torchrun.py"
    script.write_text(STUB_TORCHRUN)
    out = tmp_path / "calls"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_"))}
    env.update(TORCHRUN=f"{sys.executable} {script}", STUB_DIR=str(out), NPROC_PER_NODE="2")

    def calls() -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]

    return env, calls


def run(script: str, args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_single_node_is_standalone_and_passes_every_argument(stub):
    env, calls = stub
    result = run("single_node.sh", ["--train-store", "my store.zarr", "--epochs", "1"], env)
    assert result.returncode == 0, result.stderr
    [call] = calls()
    assert call["argv"] == ["--standalone", "--nproc-per-node=2", "--max-restarts=0", "-m", "stage_dist.train",
                            "--train-store", "my store.zarr", "--epochs", "1"]


@pytest.mark.parametrize("visible, expected", [("", "1"), ("0,1,2", "3")])
def test_nproc_defaults_to_the_visible_gpus(stub, visible, expected):
    env, calls = stub
    del env["NPROC_PER_NODE"]
    env.update(CUDA_VISIBLE_DEVICES=visible, MODULE="stage_dist.infer", MAX_RESTARTS="2")
    assert run("single_node.sh", ["--store", "s"], env).returncode == 0
    [call] = calls()
    assert call["argv"][1:5] == [f"--nproc-per-node={expected}", "--max-restarts=2", "-m", "stage_dist.infer"]


def test_multi_node_uses_c10d_rendezvous(stub):
    env, calls = stub
    env.update(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.1.2.3", MASTER_PORT="1234", RDZV_ID="job7")
    result = run("multi_node.sh", ["--output-dir", "runs/x"], env)
    assert result.returncode == 0, result.stderr
    [call] = calls()
    assert call["argv"] == [
        "--nnodes=2", "--nproc-per-node=2", "--node-rank=1", "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.1.2.3:1234", "--rdzv-id=job7", "--max-restarts=0",
        "-m", "stage_dist.train", "--output-dir", "runs/x",
    ]


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"MASTER_ADDR": "h"}, "NNODES"),
        ({"NNODES": "2"}, "MASTER_ADDR"),
        ({"NNODES": "two", "MASTER_ADDR": "h"}, "NNODES must be"),
        ({"NNODES": "2", "MASTER_ADDR": "h", "NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be"),
    ],
)
def test_multi_node_refuses_a_missing_or_bad_variable(stub, variables, message):
    env, calls = stub
    env.update(variables)
    result = run("multi_node.sh", [], env)
    assert result.returncode != 0
    assert message in result.stderr
    assert calls() == []


@pytest.fixture
def slurm(stub, tmp_path):
    """The stub environment inside a fake 2-node allocation (job 4242, 4 GPUs and 16 CPUs per task)."""
    env, calls = stub
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO), SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16")
    del env["NPROC_PER_NODE"]
    return env, calls


def test_slurm_runs_one_launcher_per_node_with_the_first_host_as_endpoint(slurm):
    env, calls = slurm
    result = run("slurm.sbatch", ["--train-store", "/shared/train.zarr"], env)
    assert result.returncode == 0, result.stderr
    by_node = sorted(calls(), key=lambda call: call["env"]["SLURM_NODEID"])
    assert [call["env"]["SLURM_NODEID"] for call in by_node] == ["0", "1"]
    for node, call in enumerate(by_node):
        assert call["argv"] == [
            "--nnodes=2", "--nproc-per-node=4", f"--node-rank={node}", "--rdzv-backend=c10d",
            "--rdzv-endpoint=node-a:24242", "--rdzv-id=4242", "--max-restarts=0",
            "-m", "stage_dist.train", "--train-store", "/shared/train.zarr",
        ]


def test_slurm_srun_gets_the_cpus_per_task(slurm):
    """Slurm >= 22.05: srun does not inherit sbatch's --cpus-per-task; the script passes it on."""
    env, _ = slurm
    assert run("slurm.sbatch", [], env).returncode == 0
    srun_args = (Path(env["STUB_DIR"]) / "srun_args.txt").read_text().split("\n")
    assert "--cpus-per-task=16" in srun_args
    del env["SLURM_CPUS_PER_TASK"]
    assert run("slurm.sbatch", [], env).returncode == 0
    assert not any(arg.startswith("--cpus-per-task") for arg in
                   (Path(env["STUB_DIR"]) / "srun_args.txt").read_text().split("\n"))


@pytest.mark.parametrize("job_id, port", [("4242", "24242"), ("123456", "23456"), ("20000", "20000")])
def test_slurm_port_comes_from_the_job_id_unless_set(slurm, job_id, port):
    """Two jobs on one node get different rendezvous ports; an exported MASTER_PORT wins."""
    env, calls = slurm
    env["SLURM_JOB_ID"] = job_id
    assert run("slurm.sbatch", [], env).returncode == 0
    assert {call["argv"][4] for call in calls()} == {f"--rdzv-endpoint=node-a:{port}"}
    for path in Path(env["STUB_DIR"]).glob("*.json"):
        path.unlink()
    env["MASTER_PORT"] = "31000"
    assert run("slurm.sbatch", [], env).returncode == 0
    assert {call["argv"][4] for call in calls()} == {"--rdzv-endpoint=node-a:31000"}


def test_slurm_outside_an_allocation_fails_clearly(stub):
    env, calls = stub
    result = run("slurm.sbatch", [], env)
    assert result.returncode != 0 and "SLURM" in result.stderr
    assert calls() == []


@pytest.mark.slow
def test_two_node_job_on_loopback_trains_and_checkpoints(tiny_stores: Stores, tmp_path):
    """Two torchrun launchers (--nnodes=2, one process each) meet at a c10d rendezvous on
    127.0.0.1, train 3 steps as one world of 2 ranks and write a checkpoint."""
    from stage_dist.engine.checkpoint import read_checkpoint

    output_dir = tmp_path / "run"
    args = [
        "--train-store", str(tiny_stores.train), "--val-store", str(tiny_stores.val),
        "--val-groundtruth", str(tiny_stores.dataset.splits["val"].groundtruth_csv),
        "--labelmap", str(tiny_stores.dataset.labelmap), "--output-dir", str(output_dir),
        "--epochs", "1", "--max-steps", "3", "--val-every", "0", "--device", "cpu", "--workers", "0",
    ]
    env = dict(subprocess_env(), PYTHON=sys.executable, NNODES="2", NPROC_PER_NODE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RDZV_ID=f"test-{os.getpid()}")
    nodes = [
        subprocess.Popen(["bash", str(LAUNCH / "multi_node.sh"), *args], env=dict(env, NODE_RANK=str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} failed:\n{output[-4000:]}"
    assert "--rdzv-endpoint=127.0.0.1:" in outputs[1]  # the script's echo of its torchrun command

    checkpoints = sorted((output_dir / "checkpoints").glob("ckpt_*.pt"))
    assert checkpoints, f"no checkpoint in {output_dir}:\n{outputs[0][-4000:]}"
    state = read_checkpoint(checkpoints[-1]).training
    assert state.world_size == 2 and len(state.rng_per_rank) == 2
    assert state.global_step == 3
