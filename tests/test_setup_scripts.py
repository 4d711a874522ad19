"""The set-up scripts: a lock file installed by default, a stamp that skips a finished set-up, pinned ranges."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANGED = ("transformers", "peft", "trl", "accelerate", "datasets", "huggingface_hub")

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls.log"
"""
FAKE_ACTIVATE = 'export PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd):$PATH"\ndeactivate() { :; }\n'


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_hf_dependencies_have_upper_bounds_and_the_lock_pins_them():
    requirements = {re.split(r"[<>=!~ ]", dep, maxsplit=1)[0]: dep for dep in _pyproject()["project"]["dependencies"]}
    lock = (ROOT / "constraints.txt").read_text().splitlines()
    pins = {line.split("==")[0].lower().replace("_", "-"): line for line in lock if "==" in line}
    for name in RANGED:
        assert "<" in requirements[name], f"{name} needs an upper bound in pyproject: {requirements[name]}"
        assert name.replace("_", "-") in pins, f"constraints.txt does not pin {name}"
    assert not any(line.startswith(("torch==", "hf-fcmoe", "hf_fcmoe", "-e ")) for line in lock)


def test_license_is_an_spdx_string():
    # a `{ text = ... }` table makes setuptools print a deprecation banner on every install
    assert isinstance(_pyproject()["project"]["license"], str)


@pytest.fixture
def fake_checkout(tmp_path: Path) -> Path:
    """The scripts and pyproject in a folder whose .venv/bin/python only records how it was called."""
    (tmp_path / "scripts").mkdir()
    for name in ("setup_env.sh", "lock.sh"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "activate").write_text(FAKE_ACTIVATE)
    return tmp_path


def _setup(checkout: Path, **env: str) -> list[str]:
    log = checkout / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    environ = {**os.environ, "PYTHON": sys.executable, **env}
    subprocess.run(["bash", "scripts/setup_env.sh"], cwd=checkout, env=environ, check=True, capture_output=True)
    return log.read_text().splitlines() if log.exists() else []


def test_setup_installs_the_lock_once_then_skips_until_an_input_changes(fake_checkout: Path):
    first = _setup(fake_checkout)
    install = [call for call in first if call.startswith("-m pip install") and "-e" in call.split()]
    assert install and "-c constraints.txt" in install[0], first
    assert _setup(fake_checkout) == []  # stamp matches: nothing reinstalled
    with (fake_checkout / "pyproject.toml").open("a") as handle:
        handle.write("\n# changed\n")
    assert any("-c constraints.txt" in call for call in _setup(fake_checkout))
    latest = _setup(fake_checkout, HF_FCMOE_LATEST="1")
    install = [call for call in latest if call.startswith("-m pip install") and "-e" in call.split()]
    assert install and "constraints.txt" not in install[0] and "--upgrade" in install[0], latest
