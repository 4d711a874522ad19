"""The README's python blocks run as written, in order, offline, in a fresh folder (skips are marked and say why)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(.+?)\s*-->\s*$")


def readme_python_blocks(text: str) -> list[tuple[int, str | None, str]]:
    """(line, skip reason or None, code) of every ```python block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.match(previous.strip())
            i += 1
            body = []
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((start + 1, skip.group(1) if skip else None, "\n".join(body)))
        i += 1
    return blocks


def test_block_extraction_honours_skip_markers():
    text = "a\n```python\nx = 1\n```\n<!-- readme-test: skip: needs a GPU -->\n```python\ny = 2\n```\n"
    assert readme_python_blocks(text) == [(2, None, "x = 1"), (6, "needs a GPU", "y = 2")]


def test_readme_python_blocks_run(tmp_path):
    blocks = readme_python_blocks((ROOT / "README.md").read_text())
    runnable = [(line, code) for line, skip, code in blocks if skip is None]
    assert len(runnable) >= 3, "the README lost its examples"
    script = []
    for line, code in runnable:
        script.append(f"print('--- README block at line {line}', flush=True)\n{code}\n")
    (tmp_path / "readme_blocks.py").write_text("\n".join(script))
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "readme_blocks.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("--- README block") == len(runnable)
