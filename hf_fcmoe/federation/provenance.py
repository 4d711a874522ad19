"""Which code trained a round: the library version and, in a git checkout, its commit.

Benchmarks read finished runs back instead of retraining them, so one report can pair runs trained by different
code. Every metrics row carries `code` so the report can say so: two numerically equivalent versions still drift
apart over a run (top-k routing amplifies fp32 rounding), and that drift is part of any difference between them.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

CODE_FIELD = "code"


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def describe_code(root: Path) -> str:
    """``<version>`` for an installed package; ``<version>+g<commit>`` for a git checkout at ``root``, with
    ``.dirty`` when tracked files under ``hf_fcmoe/`` differ from that commit."""
    from hf_fcmoe import __version__

    if not (root / ".git").exists():  # a wheel in site-packages: never report an enclosing repository's commit
        return __version__
    commit = _git(root, "rev-parse", "--short=12", "HEAD")
    if not commit:
        return __version__
    changes = _git(root, "status", "--porcelain", "--untracked-files=no", "--", "hf_fcmoe")
    return f"{__version__}+g{commit}{'.dirty' if changes else ''}"


@functools.cache
def code_version() -> str:
    """`describe_code` of the checkout or install this module was imported from (once per process)."""
    return describe_code(Path(__file__).resolve().parents[2])
