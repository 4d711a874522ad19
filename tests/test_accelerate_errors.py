"""`accelerate launch` with bad settings: the error is said once, before any process starts (no launcher traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fcmoe.cli import main

ROOT = Path(__file__).resolve().parents[1]
# two gloo processes on CPU (DESIGN.md section 4: --cpu with 2 processes silently runs one)
TWO_CPU_PROCESSES = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
use_cpu: true
mixed_precision: "no"
"""


@pytest.fixture
def existing_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text('{"last_round": 1, "num_rounds": 1}')
    return run


@pytest.fixture
def accelerate_config(tmp_path: Path) -> Path:
    path = tmp_path / "two_cpu.yaml"
    path.write_text(TWO_CPU_PROCESSES)
    return path


def test_config_error_is_reported_before_launching(existing_run, accelerate_config, capsys, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("accelerate launch must not start when the settings are wrong")

    monkeypatch.setattr(subprocess, "run", no_launch)
    argv = ["simulate", "--config", "recipes/tiny/fedavg.yaml", "--accelerate_config", str(accelerate_config)]
    assert main([*argv, "--output_dir", str(existing_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"hf-fcmoe simulate: error: {existing_run} already holds a run; pass --resume to continue it "
        "or --overwrite_output_dir true"
    ]


def test_only_rank_zero_prints_the_error(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(["simulate", "--config", "recipes/tiny/fedavg.yaml", "--num_rounds", "0"]) == 2
    assert capsys.readouterr().err == ""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_two_process_launch_prints_a_config_error_once(existing_run, accelerate_config):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
    command += ["-m", "hf_fcmoe.cli", "simulate", "--config", "recipes/tiny/fedavg.yaml"]
    done = subprocess.run(
        [*command, "--output_dir", str(existing_run)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    assert done.stderr.count("already holds a run") == 1, done.stderr


@pytest.mark.slow
def test_two_process_run_through_the_cli(tmp_path, accelerate_config):
    out = tmp_path / "two"
    command = [sys.executable, "-m", "hf_fcmoe.cli", "simulate", "--config", "recipes/tiny/fedavg.yaml"]
    command += ["--accelerate_config", str(accelerate_config), "--output_dir", str(out), "--use_cpu", "true"]
    command += ["--num_rounds", "1", "--max_steps", "2", "--num_examples", "256"]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "global" / "adapter_model.safetensors").exists()
    assert done.stdout.count("finished 1 rounds") == 1
    assert "find_unused_parameters=True" not in done.stderr  # DDP's warning: every LoRA tensor is used
