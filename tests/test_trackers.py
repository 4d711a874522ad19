"""report_to: the federation's curves reach a tracker through transformers' integrations (tensorboard here)."""

from __future__ import annotations

import pytest

from hf_fcmoe.reporting.trackers import tracker_logs


def test_rows_become_federation_and_per_client_tracker_values():
    row = {
        "round": 2,
        "method": "fcmoe",
        "failed": False,
        "global_eval_loss": 1.5,
        "local_eval_loss": 1.25,
        "local_eval_loss_per_client": {"a": 1.0, "b": 1.5},
        "global_eval_loss_per_client": {"a": 1.4, "b": 1.6},
        "conflict_rate": 0.25,
        "conflict_rate_per_layer": [0.5, 0.0],
        "bytes_up": 10,
        "clients": ["a", "b"],
    }
    assert tracker_logs(row) == {
        "eval_global_loss": 1.5,
        "eval_personalized_loss": 1.25,
        "eval_clients/a/personalized_loss": 1.0,
        "eval_clients/b/personalized_loss": 1.5,
        "eval_clients/a/global_loss": 1.4,
        "eval_clients/b/global_loss": 1.6,
        "conflict_rate": 0.25,
        "conflict_rate_layer_0": 0.5,
        "conflict_rate_layer_1": 0.0,
        "bytes_up": 10.0,
    }


def test_report_to_tensorboard_logs_one_run_of_round_curves(tiny_run_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_run_config("tb", aggregation_method="fcmoe", report_to="tensorboard", num_rounds=2, max_steps=2)
    from hf_fcmoe.federation.simulation import run_simulation

    result = run_simulation(config, progress=False)
    event_files = sorted(result.output_dir.rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files  # one tracker run for the federation, none per local round
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("eval/global_loss", "eval/personalized_loss", "train/conflict_rate", "train/bytes_up"):
        assert tag in tags, sorted(tags)
    assert "eval/clients/client_000/personalized_loss" in tags
    steps = [event.step for event in events.Scalars("eval/global_loss")]
    assert steps == [0, 1, 2]
    logged = [event.value for event in events.Scalars("eval/global_loss")]
    assert logged == pytest.approx([row["global_eval_loss"] for row in result.metrics])
