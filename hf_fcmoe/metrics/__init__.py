"""Metrics shipped with the package: `evaluate` modules loaded by local path, and label-scoring accuracy.

Hub-hosted `evaluate` metrics are unreachable offline, so each metric we need lives in
`hf_fcmoe/metrics/<name>/<name>.py` and `load_metric(name)` loads it from there.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

METRICS_DIR = Path(__file__).parent


def available_metrics() -> list[str]:
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


@cache
def load_metric(name: str):
    """An `evaluate.EvaluationModule` for a metric shipped here (e.g. "accuracy"), loaded offline by path."""
    import evaluate

    if name not in available_metrics():
        raise ValueError(f"unknown metric {name!r}; shipped metrics: {', '.join(available_metrics())}")
    return evaluate.load(str(METRICS_DIR / name))


__all__ = ["available_metrics", "load_metric"]
