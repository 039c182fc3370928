"""Preemption signals and time-based checkpoints: one agreed checkpoint, a clean stop, an exact resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from stage_dist.core.config import ConfigError, to_argv
from stage_dist.core.errors import EXIT_PREEMPTED
from stage_dist.engine.checkpoint import read_checkpoint
from stage_dist.engine.distributed import init_distributed
from stage_dist.engine.preemption import PreemptedError, RunControl, parse_signals
from stage_dist.engine.trainer import Trainer
from tests.conftest import subprocess_env, torchrun_command
from tests.test_train import _children, assert_same_final_checkpoint, make_config


def test_parse_signals_accepts_names_and_refuses_uncatchable_ones():
    assert parse_signals("TERM,USR1") == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_signals("sigusr2, term,TERM") == (signal.SIGUSR2, signal.SIGTERM)
    assert parse_signals("none") == () and parse_signals("") == ()
    for bad in ("KILL", "STOP", "NOPE", "TERM,9"):
        with pytest.raises(ValueError, match="not a signal that can be caught"):
            parse_signals(bad)


def test_bad_preemption_flags_are_config_errors(tiny_stores, tmp_path):
    with pytest.raises(ConfigError, match="--preempt-signals"):
        make_config(tiny_stores, tmp_path, preempt_signals="TERM,KILL")
    with pytest.raises(ConfigError, match="--checkpoint-every-minutes"):
        make_config(tiny_stores, tmp_path, checkpoint_every_minutes=-1.0)


def test_agreement_follows_the_reduced_flags_not_the_local_ones():
    """A rank that got no signal stops when the reduction says another rank did; the timer flag
    of one rank makes every rank save."""
    now = [0.0]
    control = RunControl((signal.SIGUSR1,), checkpoint_every_minutes=1.0, clock=lambda: now[0])
    assert control.flags(__import__("torch").device("cpu")).tolist() == [0, 0]
    now[0] = 61.0
    assert control.flags(__import__("torch").device("cpu")).tolist() == [0, -1]
    control.agree([0, -1])
    assert control.save and not control.stop
    control.saved()
    assert not control.save and control.flags(__import__("torch").device("cpu")).tolist() == [0, 0]
    control.agree([-1, 0])  # another rank was signalled
    assert control.stop and control.stop_signal == "(another rank)"


def _signal_self_at(trainer: Trainer, step: int, sig: signal.Signals) -> None:
    original = trainer.train_step

    def train_step(batch):
        loss = original(batch)
        if trainer.global_step + 1 == step:  # the handler runs during this step
            os.kill(os.getpid(), sig)
        return loss

    trainer.train_step = train_step  # type: ignore[method-assign]  # the signal arrives inside a step


def test_signal_checkpoints_at_the_agreed_step_and_the_rerun_resumes_exactly(tiny_stores, tmp_path):
    """SIGUSR1 during step 5 (log every 4): the run finishes steps 5-8, checkpoints at step 8 only,
    raises PreemptedError; rerunning the same config ends bitwise equal to an uninterrupted run."""
    env = init_distributed("cpu")
    previous = signal.getsignal(signal.SIGUSR1)
    config = make_config(tiny_stores, tmp_path / "run", epochs=2, val_store=None, log_every=4)
    trainer = Trainer(config, env)
    _signal_self_at(trainer, 5, signal.SIGUSR1)
    with pytest.raises(PreemptedError, match="SIGUSR1.*step 8") as raised:
        trainer.fit()
    assert signal.getsignal(signal.SIGUSR1) == previous, "the handler is restored"
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("ckpt_*.pt"))
    assert [read_checkpoint(path).training.global_step for path in checkpoints] == [8]
    assert raised.value.checkpoint == checkpoints[0]
    Trainer(config, env).fit()
    Trainer(make_config(tiny_stores, tmp_path / "uninterrupted", epochs=2, val_store=None, log_every=4), env).fit()
    assert_same_final_checkpoint(tmp_path / "uninterrupted", tmp_path / "run")


def test_main_exits_with_the_preempted_code(tiny_stores, tmp_path, monkeypatch, capsys):
    from stage_dist.train import main

    original = Trainer.train_step

    def train_step(self, batch):
        loss = original(self, batch)
        if self.global_step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(Trainer, "train_step", train_step)
    config = make_config(tiny_stores, tmp_path / "run", val_store=None, log_every=2)
    assert main(to_argv(config)) == EXIT_PREEMPTED
    assert "stopped: preempted by SIGTERM" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt_*.pt")] == ["ckpt_e0000_s000002.pt"]


def test_unlisted_signal_keeps_its_default_handler(tiny_stores, tmp_path):
    config = make_config(tiny_stores, tmp_path, val_store=None, max_steps=2, preempt_signals="none")
    trainer = Trainer(config, init_distributed("cpu"))
    seen = []
    with trainer.control.handling_signals():
        seen.append(signal.getsignal(signal.SIGTERM))
    assert seen == [signal.getsignal(signal.SIGTERM)]


def test_checkpoint_every_minutes_saves_at_log_steps(tiny_stores, tmp_path):
    """A timer that is always due: one checkpoint at every log step (and the epoch end), agreed
    through the log step's reduction."""
    config = make_config(tiny_stores, tmp_path, val_store=None, epochs=1, log_every=3, keep_last=100,
                         checkpoint_every_minutes=1e-9)
    trainer = Trainer(config, init_distributed("cpu"))
    total = trainer.fit().global_step
    steps = [read_checkpoint(p).training.global_step for p in sorted((tmp_path / "checkpoints").glob("ckpt_*.pt"))]
    assert steps == sorted({*range(3, total + 1, 3), total}), steps


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc to find the worker processes")
def test_sigterm_to_torchrun_checkpoints_once_and_the_rerun_resumes_exactly(tiny_stores, tmp_path):
    """2 gloo ranks under torchrun: SIGTERM to torchrun mid-epoch (torchrun forwards it to both
    workers); both stop after the same step, one checkpoint is written at that step, the workers
    exit EXIT_PREEMPTED; rerunning the same command ends with the final weights, optimizer and
    every rank's RNG states of an uninterrupted run, bit for bit."""
    output_dir = tmp_path / "run"
    config = make_config(tiny_stores, output_dir, epochs=4, checkpoint_every=3, val_store=None, log_every=2)
    command = torchrun_command(2, "-m", "stage_dist.train", *to_argv(config))
    launcher = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((output_dir / "checkpoints").glob("ckpt_*.pt")):
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        assert len(_children(launcher.pid)) == 2
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0, output  # torchrun itself re-raises the SIGTERM it got
    assert "stopped: preempted by SIGTERM" in output, output
    checkpoints = sorted((output_dir / "checkpoints").glob("ckpt_*.pt"))
    newest = read_checkpoint(checkpoints[-1]).training
    assert f"at step {newest.global_step};" in output, output
    agreed_at_a_log_or_checkpoint_step = newest.global_step % 2 == 0 or newest.global_step % 3 == 0
    assert agreed_at_a_log_or_checkpoint_step, newest.global_step
    assert newest.epoch < 4, "the signal came after training ended"

    rerun = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumed from" in rerun.stdout + rerun.stderr
    uninterrupted = make_config(tiny_stores, tmp_path / "uninterrupted", epochs=4, checkpoint_every=3,
                                val_store=None, log_every=2)
    subprocess.run(torchrun_command(2, "-m", "stage_dist.train", *to_argv(uninterrupted)), check=True,
                   env=subprocess_env(), capture_output=True, timeout=240)
    assert_same_final_checkpoint(tmp_path / "uninterrupted", output_dir)


FAKE_SRUN_WAITING = """#!/usr/bin/env bash
trap 'echo USR1 > "$STUB_DIR/srun_got"; exit 4' USR1
touch "$STUB_DIR/srun_started"
while true; do sleep 0.05; done
"""
FAKE_SCONTROL_RECORDING = """#!/usr/bin/env bash
if [[ "$1" == requeue ]]; then echo "$@" > "$STUB_DIR/scontrol_requeue"; exit 0; fi
printf 'node-a\\nnode-b\\n'
"""


def test_slurm_script_forwards_usr1_to_srun_and_requeues(tmp_path):
    """sbatch --signal=B:USR1@120 signals the batch shell only: the script forwards SIGUSR1 to
    srun (which hands it to every process of the step) and, when srun ends, requeues the job."""
    from pathlib import Path

    from tests.conftest import REPO

    script = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120" in script and "#SBATCH --requeue" in script
    bin_dir, stub_dir = tmp_path / "bin", tmp_path / "stub"
    bin_dir.mkdir(), stub_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN_WAITING), ("scontrol", FAKE_SCONTROL_RECORDING)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_DIR=str(stub_dir), SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO))
    batch = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (stub_dir / "srun_started").exists():
            assert batch.poll() is None and time.monotonic() < deadline, batch.stdout.read() if batch.stdout else ""
            time.sleep(0.05)
        batch.send_signal(signal.SIGUSR1)
        output, _ = batch.communicate(timeout=30)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 0, output
    assert (stub_dir / "srun_got").read_text().strip() == "USR1"
    assert Path(stub_dir / "scontrol_requeue").read_text().split() == ["requeue", "4242"], output


@pytest.mark.slow
def test_torchrun_forwards_usr1_with_the_launchers_setting(tmp_path):
    """launch/common.sh's PET_SIGNALS_TO_HANDLE makes torchrun forward SIGUSR1 to its workers
    (without it, SIGUSR1 would kill torchrun and leave the workers unsignalled)."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import pathlib, signal, sys, time\n"
        f"out = pathlib.Path({str(tmp_path)!r})\n"
        "signal.signal(signal.SIGUSR1, lambda *_: ((out / 'got').write_text('USR1'), sys.exit(4)))\n"
        "(out / 'ready').touch()\n"
        "while True: time.sleep(0.05)\n")
    env = dict(subprocess_env(), PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    launcher = subprocess.Popen(torchrun_command(1, str(worker)), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        launcher.send_signal(signal.SIGUSR1)
        output, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert (tmp_path / "got").read_text() == "USR1", output


@pytest.mark.parametrize("form", ["store", "shards"])
def test_training_loader_workers_ignore_the_stop_signals(tiny_stores, tmp_path, form):
    """SLURM signals every process of a step: a loader worker must survive SIGTERM/SIGUSR1 so that
    its rank can finish the step and checkpoint."""
    import torch

    from stage_dist.data.split_config import SplitConfig
    from stage_dist.data.splits import open_train_data
    from stage_dist.store.feature_store import FeatureStore
    from stage_dist.store.tar_shards import shard_pattern, write_shards

    shards = None
    if form == "shards":
        manifest = write_shards(FeatureStore.open(tiny_stores.train), tmp_path / "shards", max_shard_bytes=50_000)
        shards = shard_pattern(manifest, tmp_path / "shards")
    split = SplitConfig(store=str(tiny_stores.train) if shards is None else None, shards=shards)
    data = open_train_data(split, window=6, windows_per_step=1, seed=0, rank=0, world_size=1, num_workers=1,
                           pin_memory=False)

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return torch.tensor([signal.getsignal(signal.SIGTERM) == signal.SIG_IGN,
                                 signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN])

    probe = torch.utils.data.DataLoader(Probe(), num_workers=1, worker_init_fn=data.loader.worker_init_fn)
    assert next(iter(probe)).tolist() == [[True, True]]
    assert next(iter(data.loader)) is not None  # the loader itself still works with it
