"""Summaries and paired comparisons of benchmark runs, from their metrics.jsonl rows only (pure Python).

A run's rows start with round 0 (the initial adapter) and add one row per round. The metric is the
global eval loss (lower is better) or, for classification, the global accuracy (higher is better).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """Which row field is compared, and in which direction."""

    global_key: str
    local_key: str
    higher_is_better: bool

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    def reached(self, value: float, target: float) -> bool:
        return value >= target if self.higher_is_better else value <= target

    def gain(self, value: float, reference: float) -> float:
        """Signed improvement over the reference: > 0 means better, whatever the direction."""
        return value - reference if self.higher_is_better else reference - value


LOSS = Metric("global_eval_loss", "local_eval_loss", higher_is_better=False)
ACCURACY = Metric("global_accuracy", "local_accuracy", higher_is_better=True)


def metric_for_task(task: str) -> Metric:
    return ACCURACY if task == "classification" else LOSS


@dataclass
class RunSummary:
    """The numbers one run contributes to the report."""

    final_global: float
    final_local: float
    local_client_std: float
    auc: float
    rounds_to_target: int | None
    megabytes: float
    conflict_rate: float | None
    global_curve: list[float]
    local_curve: list[float]


def rounds_to_target(curve: list[float], target: float, metric: Metric) -> int | None:
    """First round (1-based: curve[0] is round 0) whose value reaches `target`; None if it never does."""
    for round_index, value in enumerate(curve):
        if round_index > 0 and metric.reached(value, target):
            return round_index
    return None


def summarize_run(rows: list[dict], metric: Metric, target: float | None = None) -> RunSummary:
    """Final global/local values, area under the curve (mean over rounds 1..R), bytes, conflict rate."""
    rows = sorted(rows, key=lambda row: row["round"])
    global_curve = [float(row[metric.global_key]) for row in rows]
    local_curve = [float(row[metric.local_key]) for row in rows]
    trained = global_curve[1:] or global_curve
    # FC-MoE's measure (a negative inner product with the expert's weighted consensus); other methods' rows
    # carry no such measurement even when the hub fills the field
    measured = [row for row in rows if row.get("method") == "fcmoe"]
    conflicts = [row["conflict_rate"] for row in measured if row.get("conflict_rate") is not None]
    return RunSummary(
        final_global=global_curve[-1],
        final_local=local_curve[-1],
        local_client_std=float(rows[-1].get(f"{metric.local_key}_std") or 0.0),
        auc=sum(trained) / len(trained),
        rounds_to_target=None if target is None else rounds_to_target(global_curve, target, metric),
        megabytes=sum(row.get("bytes_up", 0) + row.get("bytes_down", 0) for row in rows) / 1e6,
        conflict_rate=sum(conflicts) / len(conflicts) if conflicts else None,
        global_curve=global_curve,
        local_curve=local_curve,
    )


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN mean for no values."""
    if not values:
        return math.nan, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class PairedDifference:
    """Per-seed gain of a method over the reference (> 0: the method is better on that seed)."""

    mean: float
    std: float
    wins: int
    seeds: int


def paired_difference(values: dict[int, float], reference: dict[int, float], metric: Metric) -> PairedDifference:
    """Gains on the seeds both have: the comparison that cancels partition and initialisation noise."""
    seeds = sorted(set(values) & set(reference))
    gains = [metric.gain(values[s], reference[s]) for s in seeds]
    mean, std = mean_std(gains)
    return PairedDifference(mean, std, sum(gain > 0 for gain in gains), len(seeds))


def best_method(finals: dict[str, list[float]], metric: Metric) -> str:
    """The name whose mean final value is best (ties: the first in order)."""
    best = None
    for name, values in finals.items():
        score = statistics.fmean(values)
        if best is None or metric.better(score, best[1]):
            best = (name, score)
    if best is None:
        raise ValueError("no runs to choose a reference from")
    return best[0]
