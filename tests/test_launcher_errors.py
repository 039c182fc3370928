"""torchrun's failure summary names a failing rank's error: ``@record`` on every torchrun entry
point (an exception's traceback), and the one-line errors of exit codes 2-4 written as the
worker's error file."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from stage_dist.core.config import to_argv
from tests.conftest import subprocess_env, torchrun_command
from tests.test_train import make_config


@pytest.mark.slow
def test_a_failing_ranks_exception_is_in_torchruns_summary(tiny_stores, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import sys
        from stage_dist import train

        def fit(self):
            if self.env.rank == 1:
                raise RuntimeError("rank 1 exploded: boom-4217")
            return original(self)

        original, train.Trainer.fit = train.Trainer.fit, fit
        sys.exit(train.main(sys.argv[1:]))
    """))
    config = make_config(tiny_stores, tmp_path / "run", val_store=None, max_steps=2)
    result = subprocess.run(torchrun_command(2, str(driver), *to_argv(config)), env=subprocess_env(),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    summary = result.stderr[result.stderr.index("Root Cause"):]
    assert "rank      : 1" in summary and "RuntimeError: rank 1 exploded: boom-4217" in summary, summary
    assert "error_file: <N/A>" not in summary, summary


@pytest.mark.slow
def test_a_one_line_error_is_in_torchruns_summary(tiny_stores, tmp_path):
    """Exit code 2 on every rank (infer; train reports the same way, through report_to_launcher)."""
    missing = tmp_path / "missing.pt"
    args = ["--store", str(tiny_stores.val), "--checkpoint", str(missing), "--out", str(tmp_path / "r.csv"),
            "--device", "cpu", "--workers", "0"]
    result = subprocess.run(torchrun_command(2, "-m", "stage_dist.infer", *args), env=subprocess_env(),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    summary = result.stderr[result.stderr.index("Root Cause"):]
    assert "exitcode  : 2" in summary and str(missing) in summary, summary
    assert "error_file: <N/A>" not in summary, summary
