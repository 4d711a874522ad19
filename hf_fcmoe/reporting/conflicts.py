"""Conflict heatmap: how many clients conflicted on each (layer, expert) in each round."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _conflicts_of(row: dict) -> list[list[float]] | None:
    """The ``conflicts`` matrix of a diagnostics row, also when nested under ``diagnostics``/``aggregation``."""
    for source in (row, row.get("diagnostics") or {}, row.get("aggregation") or {}):
        if isinstance(source, dict) and source.get("conflicts") is not None:
            return source["conflicts"]
    return None


NO_CONFLICTS = "no conflicts in this run"


def conflict_summary(rows: list[dict]) -> str:
    """A sentence: how many (client, expert) conflicts fired over the run, or that none did."""
    matrices = [np.asarray(m, dtype=float) for m in map(_conflicts_of, rows) if m is not None]
    total = int(sum(m.sum() for m in matrices))
    if not total:
        return "No conflicts in this run: no client update had a negative inner product with its consensus."
    rounds = sum(bool(m.sum()) for m in matrices)
    return f"{total} (client, expert) conflicts over {rounds} of {len(matrices)} rounds."


def plot_conflict_heatmap(rows: list[dict], path) -> Path:
    """Draw conflicts per (layer, expert) (y) over rounds (x) from per-round diagnostics rows; returns the path.

    Each row needs ``conflicts`` ([[count per expert] per layer], as `AggregationHub` reports) and preferably
    ``round``; rows without conflicts are skipped. With nothing to draw the figure says so instead of failing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns, rounds = [], []
    for index, row in enumerate(rows):
        conflicts = _conflicts_of(row)
        if conflicts is None:
            continue
        columns.append(np.asarray(conflicts, dtype=float).reshape(-1))
        rounds.append(row.get("round", (row.get("diagnostics") or {}).get("round", index)))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(columns) + 2.5), 6.0))
    if not columns or not any(column.any() for column in columns):
        ax.text(0.5, 0.5, NO_CONFLICTS if columns else "no conflict diagnostics", ha="center", va="center")
        ax.set_axis_off()
    else:
        width = max(len(c) for c in columns)
        grid = np.zeros((width, len(columns)))
        for j, column in enumerate(columns):
            grid[: len(column), j] = column
        shape = np.asarray(_conflicts_of(next(r for r in rows if _conflicts_of(r) is not None)), dtype=float).shape
        num_experts = shape[1] if len(shape) == 2 else 1
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma_r", vmin=0)
        fig.colorbar(image, ax=ax, label="conflicting clients")
        step = max(1, len(columns) // 20)
        ax.set_xticks(range(0, len(columns), step), [str(r) for r in rounds[::step]])
        layer_ticks = range(0, width, num_experts)
        ax.set_yticks(list(layer_ticks), [f"L{t // num_experts}" for t in layer_ticks])
        for boundary in layer_ticks[1:]:
            ax.axhline(boundary - 0.5, color="grey", linewidth=0.5)
        ax.set_xlabel("round")
        ax.set_ylabel(f"layer / expert ({num_experts} experts per layer)")
        ax.set_title("FC-MoE conflicts per (layer, expert)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
