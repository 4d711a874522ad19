"""The conflict heatmap draws from per-round diagnostics rows (flat or nested) and never fails on empty input."""

from hf_fcmoe.reporting import plot_conflict_heatmap


def test_heatmap_from_diagnostics_rows(tmp_path):
    rows = [{"round": r, "conflicts": [[r % 2, 0, 1], [0, 2, 0]]} for r in range(1, 4)]
    rows.append({"round": 4, "diagnostics": {"conflicts": [[1, 1, 1], [0, 0, 0]]}})
    rows.append({"round": 5, "eval_loss": 1.0})
    path = plot_conflict_heatmap(rows, tmp_path / "plots" / "conflicts.png")
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG"


def test_heatmap_without_data(tmp_path):
    assert plot_conflict_heatmap([], tmp_path / "empty.png").exists()
