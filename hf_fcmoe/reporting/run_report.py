"""Markdown report and plots of one run, built from its metrics.jsonl rows only."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_figure(rows: list[dict]):
    """Global and mean personalized eval loss per round (rounds are integers: integer ticks only)."""
    from matplotlib.ticker import MaxNLocator

    rounds = [row["round"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [row["global_eval_loss"] for row in rows], marker="o", label="global (union eval)")
    ax.plot(rounds, [row["local_eval_loss"] for row in rows], marker="s", label="personalized (mean over clients)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title(f"{rows[-1].get('method', '')}: eval loss per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_loss_curves(rows: list[dict], path: Path) -> None:
    fig = loss_figure(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


PERSONALIZING_METHODS = {"fcmoe": "FC-MoE retention", "local": "local training"}


def personalization_note(rows: list[dict], tolerance: float = 1e-9) -> str:
    """One plain sentence: do the personalized adapters differ from the global one in this run, and why not."""
    final = rows[-1]
    method = final.get("method", "")
    local = final.get("local_eval_loss_per_client") or {}
    global_ = final.get("global_eval_loss_per_client") or {}
    differs = any(abs(local[cid] - global_.get(cid, local[cid])) > tolerance for cid in local)
    if differs:
        gaps = [global_[cid] - local[cid] for cid in local if cid in global_]
        better = sum(gap > 0 for gap in gaps)
        return (
            f"Personalized adapters differ from the global one: on its own eval split each client's personalized "
            f"adapter is {sum(gaps) / len(gaps):+.4f} nats/token better on average than the global one "
            f"(better for {better}/{len(gaps)} clients, final round)."
        )
    if method not in PERSONALIZING_METHODS:
        why = f"`{method}` keeps no per-client state (only fcmoe retention and local training personalize)"
    elif method == "fcmoe" and not any(sum(map(sum, row.get("conflicts") or [[0]])) for row in rows):
        why = (
            "no conflict fired in any round (every expert update agreed with its consensus), so every retained "
            "residual is zero and global + lambda * residual = global"
        )
    else:
        why = "retention is off or its lambda is 0, so nothing is kept per client"
    return (
        f"**Personalized adapters equal the global adapter in this run**: {why}. The local columns repeat the global."
    )


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


def lambda_table(rows: list[dict]) -> str | None:
    """retention_lambda_grid: the lambda each client chose (held-out validation loss per grid value), final round,
    and how often each client's choice was each value over the rounds; None when lambda was not chosen."""
    chosen_rows = [row for row in rows if row.get("retention_lambda_per_client")]
    if not chosen_rows:
        return None
    final = chosen_rows[-1]
    losses = final.get("retention_lambda_validation_loss") or {}
    grid = sorted({value for per_client in losses.values() for value in per_client}, key=float)
    header = "| client | chosen lambda | " + " | ".join(f"val. loss at {value}" for value in grid)
    lines = [
        f"Lambda chosen per client (round {final['round']}) on a validation slice held out of its own train split, "
        "never on the eval split scored above; personalized adapter = global + lambda * residual.",
        "",
        header + " | chosen in rounds |",
        "|---" * (len(grid) + 3) + "|",
    ]
    for cid, value in final["retention_lambda_per_client"].items():
        history = [row["retention_lambda_per_client"].get(cid) for row in chosen_rows]
        counts = {v: history.count(v) for v in sorted({v for v in history if v is not None})}
        cells = [_fmt(losses.get(cid, {}).get(g)) for g in grid]
        spread = ", ".join(f"{v:g}: {n}" for v, n in counts.items())
        lines.append(f"| {cid} | {value:g} | " + " | ".join(cells) + f" | {spread} |")
    return "\n".join(lines)


def write_run_report(root: Path, rows: list[dict], label_counts: dict[str, dict[str, int]] | None = None) -> Path:
    """Write `report.md` and `plots/*.png` for a run directory; returns the report path."""
    plots = root / "plots"
    plot_loss_curves(rows, plots / "loss.png")
    sections = [
        f"# Run report: {rows[-1].get('method', '')}",
        "Paths are relative to this run directory (it can be moved as a whole). Global adapter: `global/`; "
        "personalized adapters: `personalized/<client>/`; per-round checkpoints: `rounds/<t>/`.",
        personalization_note(rows),
        "## Metrics per round",
        metrics_table(rows),
        "![loss](plots/loss.png)",
    ]
    lambdas = lambda_table(rows)
    if lambdas is not None:
        sections += ["## Retention lambda per client", lambdas]
    if any("conflicts" in row for row in rows):
        from hf_fcmoe.reporting.conflicts import conflict_summary, plot_conflict_heatmap

        conflict_rows = [row for row in rows if "conflicts" in row]
        plot_conflict_heatmap(conflict_rows, plots / "conflicts.png")
        sections += [
            "## Conflicts per (layer, expert)",
            conflict_summary(conflict_rows),
            "![conflicts](plots/conflicts.png)",
        ]
    if label_counts:
        labels = sorted({label for counts in label_counts.values() for label in counts})
        lines = ["| client | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for cid, counts in label_counts.items():
            lines.append(f"| {cid} | " + " | ".join(str(counts.get(label, 0)) for label in labels) + " |")
        sections += ["## Client label counts", "\n".join(lines)]
    path = root / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path
