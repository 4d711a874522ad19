"""Markdown report and plots of one run, built from its metrics.jsonl rows only."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curves(rows: list[dict], path: Path) -> None:
    """Global and mean personalized eval loss per round."""
    rounds = [row["round"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [row["global_eval_loss"] for row in rows], marker="o", label="global (union eval)")
    ax.plot(rounds, [row["local_eval_loss"] for row in rows], marker="s", label="personalized (mean over clients)")
    ax.set_xlabel("round")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title(f"{rows[-1].get('method', '')}: eval loss per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metrics_table(rows: list[dict]) -> str:
    header = "| round | global eval loss | local eval loss (mean +- std) | train loss | conflict rate | MB up | s |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in rows:
        local = f"{_fmt(row['local_eval_loss'])} +- {_fmt(row.get('local_eval_loss_std'))}"
        lines.append(
            f"| {row['round']} | {_fmt(row['global_eval_loss'])} | {local} | {_fmt(row.get('train_loss'))} | "
            f"{_fmt(row.get('conflict_rate'))} | {row.get('bytes_up', 0) / 1e6:.2f} | {_fmt(row.get('seconds'))} |"
        )
    return "\n".join(lines)


def write_run_report(root: Path, rows: list[dict], label_counts: dict[str, dict[str, int]] | None = None) -> Path:
    """Write `report.md` and `plots/*.png` for a run directory; returns the report path."""
    plots = root / "plots"
    plot_loss_curves(rows, plots / "loss.png")
    sections = [
        f"# Run report: {rows[-1].get('method', '')}",
        f"Run directory: `{root}`. Global adapter: `{root / 'global'}`; personalized adapters: "
        f"`{root / 'personalized'}/<client>`.",
        "## Metrics per round",
        metrics_table(rows),
        "![loss](plots/loss.png)",
    ]
    if any("conflicts" in row for row in rows):
        from hf_fcmoe.reporting.conflicts import plot_conflict_heatmap

        plot_conflict_heatmap([row for row in rows if "conflicts" in row], plots / "conflicts.png")
        sections += ["## Conflicts per (layer, expert)", "![conflicts](plots/conflicts.png)"]
    if label_counts:
        labels = sorted({label for counts in label_counts.values() for label in counts})
        lines = ["| client | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for cid, counts in label_counts.items():
            lines.append(f"| {cid} | " + " | ".join(str(counts.get(label, 0)) for label in labels) + " |")
        sections += ["## Client label counts", "\n".join(lines)]
    path = root / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path
