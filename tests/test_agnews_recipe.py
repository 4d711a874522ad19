"""The paper's AG News recipe runs end to end on a local fixture with the same schema (2 clients, 1 round)."""

from __future__ import annotations

from pathlib import Path

from hf_fcmoe.config import load_config
from hf_fcmoe.federation.simulation import run_simulation

FIXTURE = Path(__file__).parent / "fixtures" / "ag_news_tiny.jsonl"


def test_agnews_recipe_on_local_fixture(tmp_path):
    config = load_config(
        "recipes/bench/paper_agnews.yaml",
        {
            "output_dir": str(tmp_path / "agnews"),
            "dataset_name": str(FIXTURE),
            "num_examples": None,
            "model_name_or_path": "tiny:mixtral",
            "num_clients": 2,
            "clients_per_round": 2,
            "num_rounds": 1,
            "dirichlet_alpha": 1.0,
            "eval_fraction": 0.25,
            "max_length": 320,
            "bf16": False,
            "gradient_checkpointing": False,
            "aggregation_method": "fedavg",
            "per_device_train_batch_size": 4,
        },
    )
    result = run_simulation(config)
    last = result.metrics[-1]
    assert last["round"] == 1
    for field in ("global_accuracy", "local_accuracy", "local_accuracy_std", "global_accuracy_per_client"):
        assert field in last, field
    assert 0.0 <= last["global_accuracy"] <= 1.0
    assert sorted(last["global_accuracy_per_client"]) == ["client_000", "client_001"]
