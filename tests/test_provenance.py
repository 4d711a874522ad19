"""Which code trained a run: `describe_code` on checkouts and installs, and the bench report's note on it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from hf_fcmoe import __version__
from hf_fcmoe.bench.report import code_versions_note
from hf_fcmoe.federation.provenance import describe_code

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_an_install_without_git_is_its_version(tmp_path):
    (tmp_path / "hf_fcmoe").mkdir()
    assert describe_code(tmp_path) == __version__


@needs_git
def test_a_checkout_names_its_commit_and_only_code_changes_make_it_dirty(tmp_path):
    (tmp_path / "hf_fcmoe").mkdir()
    (tmp_path / "hf_fcmoe" / "x.py").write_text("A = 1\n")
    (tmp_path / "README.md").write_text("docs\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    commit = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert describe_code(tmp_path) == f"{__version__}+g{commit}"
    (tmp_path / "README.md").write_text("more docs\n")  # not code
    (tmp_path / "hf_fcmoe" / "new.py").write_text("")  # untracked
    assert describe_code(tmp_path) == f"{__version__}+g{commit}"
    (tmp_path / "hf_fcmoe" / "x.py").write_text("A = 2\n")
    assert describe_code(tmp_path) == f"{__version__}+g{commit}.dirty"


def test_the_report_names_mixed_code_versions_and_stays_quiet_on_old_runs():
    old = {"fcmoe": {0: [{"round": 0}], 1: [{"round": 0}]}}
    assert code_versions_note(old) is None
    same = {"fcmoe": {0: [{"code": "v1"}]}, "fedavg@1": {0: [{"code": "v1"}]}}
    assert code_versions_note(same) == "Code: every run trained by `v1`."
    mixed = {"fcmoe": {0: [{"code": "v1"}], 1: [{"code": "v1"}, {"code": "v2"}]}, "fedavg@1": {0: [{"round": 0}]}}
    note = code_versions_note(mixed)
    assert "trained by 3 code versions" in note
    assert "`unrecorded` (1 run)" in note and "`v1` (1 run)" in note and "`v1 and v2` (1 run)" in note
