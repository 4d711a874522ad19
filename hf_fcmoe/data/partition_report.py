"""What a partition looks like: per-client label counts as a table and a stacked-bar plot.

Non-IID results only mean something next to how skewed the split was, so `hf-fcmoe partition` and
the benchmark report show the same counts and the same concentration number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_fcmoe.data.federated import DataSpec

LabelCounts = dict[str, dict[str, int]]


def _labels(label_counts: LabelCounts) -> list[str]:
    return sorted({label for counts in label_counts.values() for label in counts})


def mean_max_label_share(label_counts: LabelCounts) -> float:
    """Mean over clients of the largest label's share of the client's rows: 1/num_labels (IID) .. 1 (one label)."""
    shares = [max(counts.values()) / sum(counts.values()) for counts in label_counts.values() if sum(counts.values())]
    return sum(shares) / len(shares) if shares else float("nan")


def describe_partition(label_counts: LabelCounts) -> str:
    """A Markdown table: one row per client, one column per label, plus the client's total and top-label share."""
    labels = _labels(label_counts)
    header = ["client", *labels, "total", "top share"]
    rows = [header, ["---"] * len(header)]
    for cid, counts in label_counts.items():
        total = sum(counts.values())
        top = max(counts.values()) / total if total else 0.0
        rows.append([cid, *(str(counts.get(label, 0)) for label in labels), str(total), f"{top:.2f}"])
    totals = [sum(counts.get(label, 0) for counts in label_counts.values()) for label in labels]
    rows.append(["all", *map(str, totals), str(sum(totals)), f"mean {mean_max_label_share(label_counts):.2f}"])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot_partition(label_counts: LabelCounts, path: str | Path, title: str = "examples per client") -> Path:
    """Stacked bars: one bar per client, one colour per label (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, clients = _labels(label_counts), list(label_counts)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(clients) + 3), 4))
    bottom = [0] * len(clients)
    colours = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    for i, label in enumerate(labels):
        heights = [label_counts[cid].get(label, 0) for cid in clients]
        ax.bar(range(len(clients)), heights, bottom=bottom, label=label, color=colours(i % colours.N))
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(clients)), clients, rotation=45, ha="right")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=1 + len(labels) // 12, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_partition(spec: DataSpec, out_dir: str | Path) -> str:
    """Partition `spec` (a `DataSpec`) as a run would; save partition.png/.json under `out_dir`; return the table."""
    from hf_fcmoe.data.federated import load_federated_data

    data = load_federated_data(spec)
    if not data.label_counts:
        raise ValueError(f"no label or partition column to report on: set label_column (now {spec.label_column!r})")
    out_dir = Path(out_dir)
    title = f"{spec.dataset_name}: {spec.partition} partition, {spec.num_clients} clients"
    if spec.partition in ("dirichlet", "quantity"):
        title += f", alpha={spec.dirichlet_alpha:g}"
    plot = plot_partition(data.label_counts, out_dir / "partition.png", title)
    (out_dir / "partition.json").write_text(json.dumps(data.label_counts, indent=2))
    return f"{title}\n\n{describe_partition(data.label_counts)}\n\nplot: {plot}"
