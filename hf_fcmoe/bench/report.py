"""The benchmark's report.md and plots, from the runs' metrics rows (no model, no training here)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hf_fcmoe.bench.analysis import (  # noqa: E402
    Metric,
    RunSummary,
    best_method,
    mean_std,
    metric_for_task,
    paired_difference,
    summarize_run,
)
from hf_fcmoe.bench.config import FEDAVG_GRID_PREFIX, BenchConfig  # noqa: E402
from hf_fcmoe.config import FederatedMoEConfig  # noqa: E402
from hf_fcmoe.federation.provenance import CODE_FIELD  # noqa: E402

Results = dict[tuple[str, float, int], list[dict]]


def _f(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pm(values: list[float], digits: int = 4) -> str:
    """Mean ± sd over seeds; one seed has no spread, so only its value is shown."""
    mean, std = mean_std(values)
    return f"{_f(mean, digits)} ± {_f(std, digits)}" if len(values) > 1 else _f(mean, digits)


def partition_text(config: FederatedMoEConfig) -> str:
    """What the partition of the runs was, in words (the alpha grid only means something for Dirichlet skews)."""
    column = config.partition_column or config.label_column
    return {
        "dirichlet": f"Dirichlet label skew over `{column}`",
        "natural": f"natural partition (one value of `{column}` per client)",
        "iid": "IID partition (uniformly random)",
        "quantity": "quantity skew (Dirichlet client sizes, labels IID)",
        "shards": f"label shards ({config.shards_per_client} values of `{column}` per client)",
    }.get(config.partition, f"`{config.partition}` partition")


def section_title(config: FederatedMoEConfig, alpha: float) -> str:
    if config.partition in ("dirichlet", "quantity"):
        return f"{'Dirichlet' if config.partition == 'dirichlet' else 'Quantity-skew'} alpha = {alpha:g}"
    return f"{partition_text(config)[0].upper()}{partition_text(config)[1:]} (dirichlet_alpha {alpha:g} is unused)"


def _rounds_cell(values: list[int | None]) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return f"not reached (0/{len(values)})"
    return f"{statistics.median(reached):g} ({len(reached)}/{len(values)} seeds)"


def code_versions_note(rows: dict[str, dict[int, list[dict]]]) -> str | None:
    """Which code trained these runs (method -> seed -> metric rows), when the rows say. Finished runs are read back,
    so a report can pair runs of different versions, and their numerical drift is then part of every paired
    difference. None when no row records it (runs older than the stamp)."""
    runs: dict[str, int] = {}
    for per_seed in rows.values():
        for run_rows in per_seed.values():
            versions = sorted({str(row[CODE_FIELD]) for row in run_rows if CODE_FIELD in row}) or ["unrecorded"]
            key = " and ".join(versions)  # a run resumed by other code lists both
            runs[key] = runs.get(key, 0) + 1
    if not runs or list(runs) == ["unrecorded"]:
        return None
    if len(runs) == 1:
        return f"Code: every run trained by `{next(iter(runs))}`."
    spread = ", ".join(f"`{key}` ({count} run{'s' * (count > 1)})" for key, count in sorted(runs.items()))
    return (
        f"**Code: these runs were trained by {len(runs)} code versions** ({spread}); a paired difference between "
        "runs of different versions includes their numerical drift."
    )


class AlphaSection:
    """Summaries of every method at one alpha, with the tuned FedAvg chosen and the target set."""

    def __init__(self, bench: BenchConfig, results: Results, alpha: float, metric: Metric, label: str | None = None):
        self.alpha, self.metric = alpha, metric
        self.label = label or f"alpha={alpha:g}"
        methods = list(bench.method_overrides())
        raw = {m: {s: results[(m, alpha, s)] for s in bench.seeds if (m, alpha, s) in results} for m in methods}
        finals = {m: [summarize_run(rows, metric).final_global for rows in raw[m].values()] for m in methods}
        grid = {m: v for m, v in finals.items() if m.startswith(FEDAVG_GRID_PREFIX) and v}
        self.reference = best_method(grid, metric)
        self.target = bench.target if bench.target is not None else statistics.fmean(grid[self.reference])
        self.summaries: dict[str, dict[int, RunSummary]] = {
            m: {s: summarize_run(rows, metric, self.target) for s, rows in raw[m].items()} for m in methods if raw[m]
        }
        self.rows = raw

    def values(self, method: str, attribute: str) -> dict[int, float]:
        return {seed: getattr(summary, attribute) for seed, summary in self.summaries[method].items()}

    def code_note(self) -> str | None:
        return code_versions_note(self.rows)

    def table(self) -> str:
        header = (
            "| method | global final (mean ± sd over seeds) | paired gain vs tuned FedAvg: global (wins) | "
            "personalized final (mean ± sd) | paired gain: personalized (wins) | client sd | rounds to target | "
            "AUC | MB sent | conflict rate |"
        )
        lines = [header, "|---" * 10 + "|"]
        for method, per_seed in self.summaries.items():
            name = f"**{method}** (tuned FedAvg)" if method == self.reference else method
            cells = [name]
            for attribute in ("final_global", "final_local"):  # value, then its paired gain
                cells += [_pm(list(self.values(method, attribute).values())), self._gain_cell(method, attribute)]
            conflicts = [s.conflict_rate for s in per_seed.values() if s.conflict_rate is not None]
            cells += [
                _f(statistics.fmean(s.local_client_std for s in per_seed.values())),
                _rounds_cell([s.rounds_to_target for s in per_seed.values()]),
                _pm(list(self.values(method, "auc").values())),
                _f(statistics.fmean(s.megabytes for s in per_seed.values()), 1),
                _f(statistics.fmean(conflicts), 3) if conflicts else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _gain_cell(self, method: str, attribute: str) -> str:
        if method == self.reference:
            return "reference"
        diff = paired_difference(self.values(method, attribute), self.values(self.reference, attribute), self.metric)
        spread = f" ± {diff.std:.4f}" if diff.seeds > 1 else ""
        return f"{diff.mean:+.4f}{spread} ({diff.wins}/{diff.seeds})"

    def _mean_curve(self, method: str, attribute: str) -> list[float]:
        curves = [getattr(s, attribute) for s in self.summaries[method].values()]
        length = min(len(c) for c in curves)
        return [statistics.fmean(c[i] for c in curves) for i in range(length)]

    def plot_curves(self, path: Path) -> None:
        """Top: every method over all rounds. Bottom: the second half of the run, zoomed onto the methods whose
        final value is within 10% of the tuned FedAvg's (diverging methods would otherwise flatten the rest)."""
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        reference = self._mean_curve(self.reference, "global_curve")[-1]
        finals = {m: self._mean_curve(m, "global_curve")[-1] for m in self.summaries}
        close = [m for m, final in finals.items() if abs(final - reference) <= 0.1 * abs(reference)]
        palette = plt.get_cmap("tab20").colors
        for index, method in enumerate(self.summaries):
            line = {
                "linestyle": "-" if method.startswith("fcmoe") or method == self.reference else ":",
                "color": palette[(2 * index) % 20 + (index // 10) % 2],  # one colour per method in every panel
                "marker": ".",
                "label": method,
            }
            for column, attribute in enumerate(("global_curve", "local_curve")):
                mean = self._mean_curve(method, attribute)
                axes[0, column].plot(range(len(mean)), mean, **line)
                if method in close:
                    half = len(mean) // 2
                    axes[1, column].plot(range(half, len(mean)), mean[half:], **line)
        for row, zoom in enumerate(("", ", second half, zoomed")):
            for column, title in enumerate(("global (union eval)", "personalized (mean over clients)")):
                ax = axes[row, column]
                ax.set_title(f"{self.label}: {title}{zoom}", fontsize=10)
                ax.set_xlabel("round")
                ax.grid(alpha=0.3)
            axes[row, 0].set_ylabel(self.metric.global_key.replace("global_", ""))
        axes[0, 1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _routing_table(routing: dict) -> str:
    lines = [
        "| where | mean normalised entropy (1 = uniform) | JS divergence between domains, mean (bits) | max pair |",
        "|---|---|---|---|",
    ]
    for name, summary in routing.items():
        lines.append(
            f"| {name} | {_f(summary['mean_entropy'], 3)} | {_f(summary['js_mean'], 3)} | {_f(summary['js_max'], 3)} |"
        )
    return "\n".join(lines)


def _truncation_note(config: FederatedMoEConfig, results: Results) -> list[str]:
    """A sentence when classification prompts had to be shortened to fit max_length (else nothing)."""
    counts = [max((row.get("truncated_prompts", 0) for row in rows), default=0) for rows in results.values()]
    if not any(counts):
        return []
    return [
        f"**Prompts shortened**: classification prompts longer than max_length={config.max_length} had their input "
        f"text cut so the label word stays in (up to {max(counts)} rows per run, in {sum(c > 0 for c in counts)} of "
        f"{len(counts)} runs); raise max_length to train on the full texts."
    ]


def write_bench_report(
    bench: BenchConfig,
    config: FederatedMoEConfig,
    results: Results,
    routing: dict[str, dict],
    partitions: dict[float, dict[str, dict[str, int]]],
    seconds: float,
    command: str | None = None,
) -> Path:
    """Write ``report.md`` (+ plots/) in the benchmark folder; returns its path."""
    from hf_fcmoe.data.partition_report import mean_max_label_share, plot_partition
    from hf_fcmoe.reporting.conflicts import plot_conflict_heatmap

    root = Path(bench.output_dir)
    metric = metric_for_task(config.task)
    direction = "higher" if metric.higher_is_better else "lower"
    steps = (
        f"{config.max_steps} steps"
        if config.max_steps and config.max_steps > 0
        else f"{config.num_train_epochs} epoch(s)"
    )
    sections = [
        "# Benchmark report",
        f"Command: `{command or 'hf-fcmoe bench --config <recipe>'}` (this invocation: {seconds / 60:.1f} min; runs "
        "already finished under the same config are read back, not retrained).",
        f"Base `{config.model_name_or_path}`; data `{config.dataset_name}`"
        + (f" ({config.dataset_config})" if config.dataset_config else "")
        + f", {config.num_clients} clients ({config.sampled_per_round} per round), {partition_text(config)}; "
        f"{config.num_rounds} rounds x {steps} of batch {config.per_device_train_batch_size}, "
        f"lr {config.learning_rate}; LoRA r={config.lora_r} on {', '.join(config.lora_targets)}. "
        f"Seeds {bench.seeds}: a seed fixes the partition, the adapter initialisation and client sampling, "
        "identical for every method.",
        f"Metric: `{metric.global_key}` ({direction} is better) of the global adapter on the union of "
        "client eval splits, "
        f"and `{metric.local_key}` of each client's personalized adapter on its own split (mean over clients; "
        "methods without personalization use the global adapter). Paired gain = per-seed difference to the tuned "
        "FedAvg, positive when the method is better, mean ± sd over seeds (sd only with several seeds) and on how "
        "many seeds it won. Rounds to "
        "target: first round whose global metric reaches the tuned FedAvg's mean final value (median over seeds). "
        "AUC: mean global metric over rounds 1..R. MB sent: adapter bytes up + down over the run.",
        *_truncation_note(config, results),
        "## Routing specialisation of the base",
        "Per-domain expert usage (top-k routed tokens per layer), normalised entropy and Jensen-Shannon divergence "
        "between domains, averaged over layers.",
        _routing_table(routing),
    ]
    plots = root / "plots"
    for alpha in bench.alphas:
        label = f"alpha={alpha:g}" if config.partition in ("dirichlet", "quantity") else config.partition
        section = AlphaSection(bench, results, alpha, metric, label)
        tag = f"alpha_{alpha:g}"
        section.plot_curves(plots / f"curves_{tag}.png")
        grid = ", ".join(
            f"{m[len(FEDAVG_GRID_PREFIX) :]}: {_pm(list(section.values(m, 'final_global').values()))}"
            for m in section.summaries
            if m.startswith(FEDAVG_GRID_PREFIX)
        )
        sections += [
            f"## {section_title(config, alpha)}",
            f"Tuned FedAvg: `{section.reference}` (server step grid, final global metric: {grid}). "
            f"Target: {_f(section.target)}.",
            section.table(),
            *([note] if (note := section.code_note()) else []),
            f"![curves](plots/curves_{tag}.png)",
        ]
        if alpha in partitions:
            plot_partition(partitions[alpha], plots / f"partition_{tag}.png", title=f"{label}, seed {bench.seeds[0]}")
            share = mean_max_label_share(partitions[alpha])
            sections.append(f"Partition (seed {bench.seeds[0]}): mean share of a client's top label {share:.2f}.")
            sections.append(f"![partition](plots/partition_{tag}.png)")
        conflict_rows = [row for row in section.rows.get("fcmoe", {}).get(bench.seeds[0], []) if "conflicts" in row]
        if conflict_rows:
            plot_conflict_heatmap(conflict_rows, plots / f"conflicts_{tag}.png")
            sections.append(f"![conflicts](plots/conflicts_{tag}.png)")
    path = root / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path
