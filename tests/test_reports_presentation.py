"""What the reports show a user: integer round ticks, "no conflicts" said plainly, no spread for one seed,
the partition actually used, paths relative to the run, and whether personalization changed anything."""

from __future__ import annotations

from pathlib import Path

import matplotlib.figure
import pytest

from hf_fcmoe.reporting.conflicts import plot_conflict_heatmap
from hf_fcmoe.reporting.run_report import loss_figure, personalization_note, write_run_report

CLIENTS = ("client_000", "client_001")


def _rows(method: str = "fcmoe", conflicts: int = 0, personal_gap: float = 0.0, rounds: int = 3) -> list[dict]:
    rows = []
    for r in range(rounds + 1):
        global_loss = 3.0 - 0.1 * r
        row = {
            "round": r,
            "method": method,
            "global_eval_loss": global_loss,
            "global_eval_loss_per_client": dict.fromkeys(CLIENTS, global_loss),
            "local_eval_loss": global_loss - personal_gap,
            "local_eval_loss_per_client": dict.fromkeys(CLIENTS, global_loss - personal_gap),
            "local_eval_loss_std": 0.0,
            "bytes_up": 1000 * r,
            "bytes_down": 1000 * r,
            "seconds": 1.0,
            "train_loss": None if r == 0 else global_loss,
        }
        if r and method == "fcmoe":
            row["conflicts"] = [[conflicts, 0], [0, 0]]
            row["conflict_rate"] = conflicts / 8
        rows.append(row)
    return rows


def test_loss_plot_has_integer_round_ticks():
    fig = loss_figure(_rows(rounds=3))
    fig.canvas.draw()
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks


def _texts_of_saved_figure(monkeypatch, draw) -> list[str]:
    seen: list[str] = []
    original = matplotlib.figure.Figure.savefig

    def capture(fig, *args, **kwargs):
        seen.extend(text.get_text() for ax in fig.axes for text in ax.texts)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    draw()
    return seen


def test_conflict_heatmap_without_any_conflict_says_so(tmp_path, monkeypatch):
    rows = [row for row in _rows(conflicts=0) if "conflicts" in row]
    texts = _texts_of_saved_figure(monkeypatch, lambda: plot_conflict_heatmap(rows, tmp_path / "c.png"))
    assert texts == ["no conflicts in this run"]
    rows = [row for row in _rows(conflicts=1) if "conflicts" in row]
    assert _texts_of_saved_figure(monkeypatch, lambda: plot_conflict_heatmap(rows, tmp_path / "d.png")) == []


def test_run_report_paths_are_relative_and_personalization_is_explained(tmp_path):
    root = tmp_path / "run"
    report = write_run_report(root, _rows(conflicts=0)).read_text()
    assert str(tmp_path) not in report
    assert "`global/`" in report and "`personalized/<client>/`" in report
    assert "Personalized adapters equal the global adapter in this run" in report
    assert "no conflict fired" in report and "No conflicts in this run" in report


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (_rows("fedavg"), "`fedavg` keeps no per-client state"),
        (_rows("fcmoe", conflicts=0), "no conflict fired in any round"),
        (_rows("fcmoe", conflicts=2, personal_gap=0.05), "+0.0500 nats/token better on average"),
    ],
)
def test_personalization_note(rows, expected):
    assert expected in personalization_note(rows)


def _bench_report(tmp_path: Path, partition: str, seeds: list[int], truncated: int = 0) -> str:
    from hf_fcmoe.bench.config import BenchConfig
    from hf_fcmoe.bench.report import write_bench_report
    from hf_fcmoe.config import load_config

    methods = {"fcmoe": {"aggregation_method": "fcmoe"}}
    bench = BenchConfig(
        output_dir=str(tmp_path / "bench"), methods=methods, alphas=[1.0], seeds=seeds, fedavg_server_lrs=[1.0]
    )
    config = load_config(overrides={"partition": partition, "partition_column": "label", "output_dir": str(tmp_path)})
    results = {}
    for seed in seeds:
        results[("fedavg@1", 1.0, seed)] = _rows("fedavg")
        results[("fcmoe", 1.0, seed)] = _rows("fcmoe", conflicts=1, personal_gap=0.01 * (seed + 1))
        for rows in (results[("fedavg@1", 1.0, seed)], results[("fcmoe", 1.0, seed)]):
            for row in rows:
                row.update({"truncated_prompts": truncated} if truncated else {})
    return write_bench_report(bench, config, results, {}, {}, 1.0).read_text()


def test_one_seed_bench_report_shows_no_spread(tmp_path):
    report = _bench_report(tmp_path, "dirichlet", [0])
    assert "± 0.0000" not in report
    assert "± " in _bench_report(tmp_path / "two", "dirichlet", [0, 1])


def test_bench_over_a_natural_partition_describes_it(tmp_path):
    report = _bench_report(tmp_path, "natural", [0])
    assert "Dirichlet" not in report and "alpha = 1" not in report
    assert "natural partition (one value of `label` per client)" in report


def test_bench_report_states_when_prompts_were_shortened(tmp_path):
    assert "Prompts shortened" not in _bench_report(tmp_path, "dirichlet", [0])
    report = _bench_report(tmp_path / "cut", "dirichlet", [0], truncated=7)
    assert "**Prompts shortened**" in report and "up to 7 rows per run, in 2 of 2 runs" in report
