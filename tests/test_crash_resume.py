"""SIGKILL a tiny simulation at four points (during local training, right after aggregation, while a round is being
written, between the rename of a round and state.json), corrupt the newest round on disk once, resume after
each, and compare every final adapter (global and personalized) bit for bit with an uninterrupted run.

Slow (about 6 runs of the CLI in subprocesses):
    python -m pytest -m slow tests/test_crash_resume.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--num_clients", "3", "--clients_per_round", "3", "--num_examples", "256", "--num_rounds", "3", "--max_steps", "3",
    "--min_partition_size", "8", "--max_length", "48", "--partition", "dirichlet",
]  # fmt: skip


def simulate(output_dir: Path, crash_at: str | None = None, resume: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_FCMOE_CRASH_AT", None)
    if crash_at:
        env["HF_FCMOE_CRASH_AT"] = crash_at
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "hf_fcmoe.cli", "simulate", "--config", str(ROOT / "recipes/tiny/fcmoe.yaml")]
    cmd += ["--output_dir", str(output_dir), *ARGS] + (["--resume"] if resume else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def adapters(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    folders = [root / "global", *sorted((root / "personalized").iterdir())]
    return {str(f.relative_to(root)): load_file(str(f / "adapter_model.safetensors")) for f in folders}


@pytest.mark.slow
def test_sigkill_at_every_point_then_resume_is_bit_identical(tmp_path):
    reference = simulate(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    run = tmp_path / "crashed"
    for step, crash_at in enumerate(["train_step@1", "aggregated@2", "writing_round@2", "committed@3"]):
        killed = simulate(run, crash_at=crash_at, resume=step > 0)
        assert killed.returncode == -signal.SIGKILL, (crash_at, killed.stderr[-2000:])
    state = json.loads((run / "state.json").read_text())
    assert state["last_round"] == 2 and (run / "rounds" / "3").exists()  # killed between rename and state.json
    weights = run / "rounds" / "2" / "global" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the newest completed round: it must be redone, not loaded
    weights.write_bytes(bytes(data))
    resumed = simulate(run, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = adapters(tmp_path / "reference"), adapters(run)
    assert expected.keys() == got.keys() and len(got) == 4  # global + 3 personalized
    for name in expected:
        assert expected[name].keys() == got[name].keys()
        for key in expected[name]:
            assert torch.equal(expected[name][key], got[name][key]), (name, key)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["global_eval_loss"] for r in rows] == [r["global_eval_loss"] for r in ref_rows]
