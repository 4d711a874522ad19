"""The aggregation benchmark runs end to end on tiny shapes and reports every mode it was asked for.

Smoke test of the script's plumbing (workers, warm/cold columns, read passes); no timing is asserted.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_aggregation_benchmark_small_run(tmp_path):
    output = tmp_path / "aggregation.md"
    modes = "read-pass,fedavg,fcmoe-factor"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "aggregation.py"), "--small", "--repeat", "2"]
    cmd += ["--modes", modes, "--output", str(output)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    report = output.read_text()
    assert "allocator: retain" in report and "One read pass over all states" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert [row.split("|")[1].strip() for row in rows] == modes.split(",")
    fcmoe = rows[-1].split("|")
    assert float(fcmoe[2]) > 0 and float(fcmoe[4]) > 0  # a warm time and a read-pass count
    assert "conflict rate 0.125" in fcmoe[-2]  # the last of 8 clients pushes against the others
