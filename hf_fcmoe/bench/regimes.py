"""A regime sweep: several whole benchmarks (scenario, routing, experts, local steps, alpha) and one summary.

Each regime is a `BenchConfig` of its own (`BenchConfig.regime_benches`) run by `run_bench` into
``<output_dir>/<regime>/`` (its full report included), so finished runs are reused exactly as in a single
benchmark. The summary compares, per regime and alpha, every method with the two references that matter:
the tuned FedAvg on the global metric and local training on the personalized one (plus FedAvg followed by
local fine-tuning, when the grid has it), paired per seed, with the conflict rate FC-MoE measured there.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from hf_fcmoe.bench.analysis import PairedDifference, paired_difference
from hf_fcmoe.bench.config import FEDAVG_GRID_PREFIX, BenchConfig
from hf_fcmoe.federation.lambda_choice import PER_CLIENT_FIELD
from hf_fcmoe.federation.run_dir import RunDirectory

LOCAL = "local"
FINETUNE = "fedavg-ft"
TWIN_REFERENCE = f"{FEDAVG_GRID_PREFIX}1"


# fields that change how fedavg@1's global adapter is computed numerically, or what is trained beside it, but not
# the algorithm: a method that differs from fedavg@1 only in these trains the same global adapter
_SAME_GLOBAL_FIELDS = {"aggregation_method", "personalization", "personalization_mu", "expert_lora_forward"}


def trains_fedavg_global(overrides: dict) -> bool:
    """Methods whose global adapter is fedavg@1's by construction: FedAvg at server step 1 with a personalization
    that trains beside the global (fine-tuning after the last round, Ditto's personal rounds) or with the other
    expert-LoRA forward (the same math, rounded differently)."""
    return (
        overrides.get("aggregation_method") == "fedavg"
        and overrides.get("personalization") in (None, "finetune", "ditto")
        and set(overrides) <= _SAME_GLOBAL_FIELDS
        and set(overrides) != {"aggregation_method"}
    )


def _collect(bench: BenchConfig, base: str | None) -> tuple[dict[tuple[str, float, int], list[dict]], int]:
    """Metric rows of every finished run of one regime under exactly its planned config, and how many it plans."""
    from hf_fcmoe.bench.runner import finished_metrics, plan_runs
    from hf_fcmoe.config import load_config

    plans = plan_runs(bench, base)
    results = {}
    for plan in plans:
        if not RunDirectory(plan.output_dir).metrics_file.exists():
            continue
        rows = finished_metrics(load_config(overrides={**plan.overrides, "overwrite_output_dir": True}))
        if rows:
            results[(plan.method, plan.alpha, plan.seed)] = rows
    return results, len(plans)


def existing_base(bench: BenchConfig) -> str | None:
    """The folder `prepare_base` would return, without pretraining anything (None: no pretrain, or not built)."""
    if bench.pretrain is None:
        return None
    folder = Path(bench.pretrain.get("output_dir") or Path(bench.output_dir) / "base")
    return str(folder.resolve()) if (folder / "config.json").exists() else None


def _gain(diff: PairedDifference | None, spread: bool = True) -> str:
    if diff is None or diff.seeds == 0:
        return "-"
    return f"{diff.mean:+.4f}{f' ± {diff.std:.4f}' if spread else ''} ({diff.wins}/{diff.seeds})"


def _wins_all(diff: PairedDifference | None) -> bool:
    return diff is not None and diff.seeds > 0 and diff.wins == diff.seeds


class RegimeCell:
    """One (regime, alpha): summaries, the references and every method's paired gains."""

    def __init__(self, name: str, bench: BenchConfig, results: dict, alpha: float):
        from hf_fcmoe.bench.analysis import metric_for_task
        from hf_fcmoe.bench.report import AlphaSection

        self.name, self.alpha = name, alpha
        self.metric = metric_for_task(str(bench.run.get("task", "lm")))
        self.section = AlphaSection(bench, results, alpha, self.metric)
        self.seconds = sum(
            sum(float(row.get("seconds") or 0.0) for row in rows) for (_, a, _), rows in results.items() if a == alpha
        )
        self.runs = sum(1 for (_, a, _) in results if a == alpha)
        self.overrides = bench.method_overrides()

    def diff(self, method: str, attribute: str, reference: str) -> PairedDifference | None:
        summaries = self.section.summaries
        if method not in summaries or reference not in summaries or method == reference:
            return None
        return paired_difference(
            self.section.values(method, attribute), self.section.values(reference, attribute), self.metric
        )

    def meets_goal(self, method: str) -> bool:
        """Better than the tuned FedAvg globally and than local training personalized, on every seed."""
        return _wins_all(self.diff(method, "final_global", self.section.reference)) and _wins_all(
            self.diff(method, "final_local", LOCAL)
        )

    def lambda_note(self) -> str | None:
        """Methods with retention_lambda_grid: the lambdas the clients chose in the final round, over clients and
        seeds (what the per-client choice actually picked in this regime)."""
        parts = []
        for method, per_seed in self.section.rows.items():
            chosen = [v for rows in per_seed.values() for v in (rows[-1].get(PER_CLIENT_FIELD) or {}).values()]
            if chosen:
                counts = {value: chosen.count(value) for value in sorted(set(chosen))}
                spread = ", ".join(f"{value:g}: {count}" for value, count in counts.items())
                parts.append(f"`{method}` mean {statistics.fmean(chosen):.2f} ({spread})")
        if not parts:
            return None
        return "Retention lambda chosen per client (final round, all clients and seeds): " + "; ".join(parts) + "."

    def twins_note(self) -> str | None:
        """The cell's built-in control: methods that train fedavg@1's global adapter must score exactly what it
        scores; what they miss by is drift between the runs (code versions, nondeterminism), a floor under what a
        paired difference in this cell can resolve."""
        summaries = self.section.summaries
        if TWIN_REFERENCE not in summaries:
            return None
        reference = self.section.values(TWIN_REFERENCE, "final_global")
        largest = {}
        for method, overrides in self.overrides.items():
            if method in summaries and trains_fedavg_global(overrides):
                values = self.section.values(method, "final_global")
                gaps = [abs(values[seed] - reference[seed]) for seed in values if seed in reference]
                if gaps:
                    largest[method] = max(gaps)
        if not largest:
            return None
        names = ", ".join(f"`{method}`" for method in largest)
        parts = [f"`{method}` {gap:.4f}" for method, gap in largest.items()]
        return (
            f"Control: {names} train `{TWIN_REFERENCE}`'s global adapter by the "
            "same algorithm (personal training beside it, or the other expert-LoRA forward), so their final global "
            f"loss would equal its own in exact arithmetic; largest difference over seeds: {'; '.join(parts)}. "
            "Anything above 0 is drift between the runs (fp32 rounding that top-k routing amplifies, different code "
            "versions, nondeterminism): global differences of that size in this cell are not resolved."
        )

    def table(self) -> str:
        lines = [
            "| method | global final | gain vs tuned FedAvg: global (± sd, wins) | personalized final | gain vs "
            "local: personalized (± sd, wins) | gain vs FedAvg+fine-tune: personalized (± sd, wins) | conflict rate "
            "| goal met |",
            "|---" * 8 + "|",
        ]
        section = self.section
        for method, per_seed in section.summaries.items():
            conflicts = [s.conflict_rate for s in per_seed.values() if s.conflict_rate is not None]
            name = f"**{method}** (tuned FedAvg)" if method == section.reference else method
            cells = [
                name,
                f"{statistics.fmean(section.values(method, 'final_global').values()):.4f}",
                "reference"
                if method == section.reference
                else _gain(self.diff(method, "final_global", section.reference)),
                f"{statistics.fmean(section.values(method, 'final_local').values()):.4f}",
                "reference" if method == LOCAL else _gain(self.diff(method, "final_local", LOCAL)),
                "reference" if method == FINETUNE else _gain(self.diff(method, "final_local", FINETUNE)),
                f"{statistics.fmean(conflicts):.3f}" if conflicts else "-",
                "yes" if self.meets_goal(method) else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def across_cells(cells: list[RegimeCell]) -> list[str]:
    """Two method x cell tables of paired gains (wins): global vs the tuned FedAvg, personalized vs local training,
    with the references' own values in the first row ('-': the method did not run in that cell)."""
    names = [cell.name for cell in cells]
    heads = [name if names.count(name) == 1 else f"{name} a{cell.alpha:g}" for name, cell in zip(names, cells)]
    methods = list(dict.fromkeys(method for cell in cells for method in cell.section.summaries))
    out = []
    for title, attribute, reference_of in (
        ("Global: gain vs the tuned FedAvg", "final_global", lambda cell: cell.section.reference),
        ("Personalized: gain vs local training", "final_local", lambda cell: LOCAL),
    ):
        rows = ["| method | " + " | ".join(heads) + " |", "|---" * (len(cells) + 1) + "|"]
        references = []
        for cell in cells:
            reference = reference_of(cell)
            if reference in cell.section.summaries:
                value = statistics.fmean(cell.section.values(reference, attribute).values())
                references.append(f"`{reference}` {value:.4f}")
            else:
                references.append("-")
        rows.append("| reference | " + " | ".join(references) + " |")
        for method in methods:
            cells_text = [
                "reference"
                if method == reference_of(cell)
                else _gain(cell.diff(method, attribute, reference_of(cell)), spread=False)
                for cell in cells
            ]
            rows.append(f"| {method} | " + " | ".join(cells_text) + " |")
        out += [f"### {title} (wins of the seeds)", "\n".join(rows)]
    return out


def goal_check(goal: dict[str, list[bool]], cells: int) -> list[str]:
    """The verdict and the per-method table; `goal`: method -> met or not, per cell it ran in. A method that ran in
    fewer cells than the sweep has cannot meet the goal in every cell, however it did where it ran."""
    met = [method for method, flags in goal.items() if len(flags) == cells and all(flags)]
    verdict = (
        f"Configurations that meet the goal in every cell: {', '.join(f'`{m}`' for m in met)}."
        if met
        else "No configuration meets the goal (better than the tuned FedAvg globally and than local training "
        "personalized, every seed) in every cell."
    )
    rows = ["| method | cells where the goal is met |", "|---|---|"]
    for method, flags in goal.items():
        ran = "" if len(flags) == cells else f" (ran in {len(flags)} of {cells} cells)"
        rows.append(f"| {method} | {sum(flags)}/{len(flags)}{ran} |")
    return [verdict, "\n".join(rows)]


def write_regime_summary(
    bench: BenchConfig,
    cells: list[RegimeCell],
    seconds: float,
    command: str | None,
    incomplete: dict[str, tuple[int, int]] | None = None,
) -> Path:
    """``<output_dir>/report.md``: one table per (regime, alpha), the goal check over all of them, and the regimes
    left out because some of their runs are not finished (`incomplete`: name -> (finished, planned))."""
    sections = [
        "# Regime sweep",
        f"Command: `{command or 'hf-fcmoe bench --config <recipe>'}` (this invocation: {seconds / 60:.1f} min; "
        "finished runs are read back, not retrained). Every regime's full report (curves, partitions, routing of "
        "its base) is `<regime>/report.md`.",
        "Per cell: final global eval loss of the global adapter (union of client eval splits) and final "
        "personalized eval loss (each client's own adapter on its own split, mean over clients; methods without "
        "personalization use the global adapter). Gains are paired per seed (positive = better): their mean, "
        "± the standard deviation over seeds, and (in brackets) the seeds on which the method was better. "
        "References: the tuned FedAvg (best server step of the grid by mean final global loss) for the global "
        "metric; local training and FedAvg followed by one round of local fine-tuning (`fedavg-ft`) for the "
        "personalized one. Conflict rate: share of active (client, expert) updates FC-MoE flagged, mean over "
        "rounds. Goal met: better than the tuned FedAvg globally AND better than local training personalized, on "
        "every seed.",
    ]
    goal: dict[str, list[bool]] = {}
    for cell in cells:
        sections += [
            f"## {cell.name}, alpha = {cell.alpha:g}",
            f"{cell.runs} runs, {cell.seconds / 60:.1f} min of training and aggregation (sum over runs, rounds only).",
            cell.table(),
            *(note for note in (cell.lambda_note(), cell.twins_note(), cell.section.code_note()) if note),
        ]
        for method in cell.section.summaries:
            goal.setdefault(method, []).append(cell.meets_goal(method))
    if cells:
        sections += ["## Across cells", *across_cells(cells)]
    sections += ["## Goal check over every cell", *goal_check(goal, len(cells))]
    if incomplete:
        sections += [
            "## Regimes not in this summary (not every run finished)",
            "\n".join(
                ["| regime | finished runs | run it with |", "|---|---|---|"]
                + [
                    f"| {name} | {done}/{planned} | `--regimes_only {name}` |"
                    for name, (done, planned) in incomplete.items()
                ]
            ),
        ]
    path = Path(bench.output_dir) / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(sections) + "\n")
    return path


def run_regimes(bench: BenchConfig, progress: bool = True, command: str | None = None) -> Path:
    """Run the selected regimes' benchmarks in turn (`regimes_only`, default all), then write the summary over
    every regime whose runs are all finished (`summary_only`: run none); returns its path."""
    from hf_fcmoe.bench.runner import plan_runs, prepare_base, run_bench

    started = time.perf_counter()
    selected = set() if bench.summary_only else set(bench.selected_regimes())
    cells, incomplete = [], {}
    for name, sub in bench.regime_benches().items():
        if name in selected:
            run_bench(sub, progress=progress, command=command)
            base = prepare_base(sub)
        else:  # read back what an earlier invocation finished; never pretrain or train here
            base = existing_base(sub)
        if base is None and sub.pretrain is not None:  # its base was never built: none of its runs exist
            results, planned = {}, len(plan_runs(sub))
        else:
            results, planned = _collect(sub, base)
        if len(results) < planned:
            incomplete[name] = (len(results), planned)
            continue
        cells += [RegimeCell(name, sub, results, alpha) for alpha in sub.alphas]
    return write_regime_summary(bench, cells, time.perf_counter() - started, command, incomplete)
