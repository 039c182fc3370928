"""The config mechanism: dataclass -> flags, --config FILE, overrides, validation, round trip."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch

from stage_dist.core.config import (
    ConfigError,
    build_parser,
    from_dict,
    load_json,
    option,
    parse_config,
    save_json,
    section,
    to_dict,
)


@dataclass(frozen=True)
class Optim:
    lr: float = option(0.5, help="learning rate")
    schedule: Literal["constant", "cosine"] = option("constant", help="LR schedule")
    clip: float | None = option(None, help="gradient clip")

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class Job:
    out: Path = option(help="output directory")
    steps: int = option(10, help="steps to run")
    fast: bool = option(False, help="go fast")
    sizes: tuple[int, ...] = option((1, 2), help="sizes")
    optim: Optim = section(Optim, help="optimisation")


def test_defaults_flags_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    job = parse_config(Job, ["--out", "o"])
    assert job == Job(out=Path("o"))
    job = parse_config(Job, ["--out", "o", "--steps", "3", "--fast", "--sizes", "4", "5", "--lr", "0.1",
                             "--schedule", "cosine", "--clip", "2"])
    assert job == Job(out=Path("o"), steps=3, fast=True, sizes=(4, 5), optim=Optim(lr=0.1, schedule="cosine", clip=2.0))
    text = build_parser(Job).format_help()
    for expected in ("--lr LR", "learning rate (default: 0.5)", "{constant,cosine}", "--no-fast", "optimisation",
                     "--config FILE", "output directory (default: required)"):
        assert expected in text


@pytest.mark.parametrize(("argv", "message"), [
    ([], "the following arguments are required: --out"),
    (["--out", "o", "--steps", "x"], "--steps: invalid int value: 'x'"),
    (["--out", "o", "--schedule", "linear"], "invalid choice: 'linear'"),
    (["--out", "o", "--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--out", "o", "--config", "/nonexistent/c.json"], "/nonexistent/c.json: config file not found"),
])
def test_bad_command_lines_exit_2_with_one_line(argv, message, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Job, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_config_file_round_trips_and_flags_override_it(tmp_path: Path) -> None:
    job = Job(out=Path("run"), steps=7, fast=True, sizes=(3,), optim=Optim(lr=0.25, schedule="cosine"))
    path = tmp_path / "config.json"
    save_json(job, path)
    assert json.loads(path.read_text())["optim"] == {"lr": 0.25, "schedule": "cosine", "clip": None}
    assert load_json(Job, path) == job
    assert parse_config(Job, ["--config", str(path)]) == job
    again = parse_config(Job, ["--config", str(path), "--lr", "0.125", "--no-fast", "--out", "other"])
    assert again == Job(out=Path("other"), steps=7, fast=False, sizes=(3,), optim=Optim(lr=0.125, schedule="cosine"))


@pytest.mark.parametrize(("data", "message"), [
    ({"out": "o", "stepz": 1}, "c.json: unknown setting 'stepz'"),
    ({"out": "o", "steps": "3"}, "c.json.steps: expected an integer, got '3'"),
    ({"out": "o", "steps": True}, "c.json.steps: expected an integer"),
    ({"out": "o", "optim": {"schedule": "linear"}}, "c.json.optim.schedule: 'linear' is not one of"),
    ({"out": "o", "optim": {"lr": 0}}, "--lr must be > 0"),
    ({"steps": 3}, "missing setting 'out'"),
    ([1, 2], "expected an object of settings"),
])
def test_bad_config_files_name_the_key(data, message, tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=None) as err:
        load_json(Job, path)
    assert message in str(err.value)


def test_config_file_that_is_not_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.json"
    path.write_text("\ufeff{ not json")
    with pytest.raises(SystemExit):
        parse_config(Job, ["--config", str(path)])
    assert f"{path}: not JSON (line 1" in capsys.readouterr().err


def test_to_dict_is_json_and_from_dict_inverts_it() -> None:
    job = Job(out=Path("x"), sizes=(9, 8))
    data = to_dict(job)
    assert json.loads(json.dumps(data)) == data
    assert from_dict(Job, data) == job


def test_a_run_repeated_from_its_config_json_is_bitwise_identical(tiny_stores, tmp_path: Path) -> None:
    """``--config OUTPUT_DIR/config.json`` (with only --output-dir changed) repeats a run exactly on CPU."""
    from stage_dist.engine.checkpoint import CheckpointManager
    from stage_dist.train import main as train_main

    first = tmp_path / "first"
    assert train_main(["--train-store", str(tiny_stores.train), "--output-dir", str(first), "--epochs", "1",
                       "--lr", "1e-3", "--workers", "0", "--device", "cpu", "--seed", "3", "--window", "4"]) == 0
    second = tmp_path / "second"
    assert train_main(["--config", str(first / "config.json"), "--output-dir", str(second)]) == 0
    saved = json.loads((second / "config.json").read_text())
    assert saved == {**json.loads((first / "config.json").read_text()), "output_dir": str(second)}
    weights = [CheckpointManager(run / "checkpoints").load_latest().model_state for run in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_a_misspelt_key_is_named_before_missing_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"optim": {"lrr": 0.1}}))
    with pytest.raises(SystemExit):
        parse_config(Job, ["--config", str(path)])
    assert f"{path}.optim: unknown setting 'lrr'" in capsys.readouterr().err


def test_a_single_string_reads_as_a_one_item_list_of_paths() -> None:
    from stage_dist.core.config import from_dict
    from stage_dist.infer import InferConfig

    old = {"checkpoint": "runs/a/checkpoints", "store": "val.zarr", "out": "results.csv"}  # before ensembles
    assert from_dict(InferConfig, old).checkpoint == ("runs/a/checkpoints",)
    assert from_dict(InferConfig, {**old, "checkpoint": ["a.pt", "b.pt"]}).checkpoint == ("a.pt", "b.pt")
