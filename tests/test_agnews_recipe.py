"""The paper's AG News bench recipe runs end to end on a local fixture with the same schema (2 clients, 1 round)."""

from __future__ import annotations

import json
from pathlib import Path

from hf_fcmoe.bench import load_bench_config, run_bench
from hf_fcmoe.bench.config import DEFAULT_METHODS

FIXTURE = Path(__file__).parent / "fixtures" / "ag_news_tiny.jsonl"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "bench" / "paper_agnews.yaml"


def test_agnews_recipe_is_the_papers_protocol():
    bench = load_bench_config(RECIPE)
    assert bench.alphas == [0.1, 0.5, 1.0] and bench.methods == DEFAULT_METHODS
    run = bench.run
    assert (run["num_clients"], run["num_rounds"], run["num_train_epochs"]) == (10, 25, 1)
    assert run["learning_rate"] == 1e-4 and run["retention_lambda"] == 0.5 and run["task"] == "classification"


def test_agnews_recipe_on_local_fixture(tmp_path):
    shrink = {
        "dataset_name": str(FIXTURE),
        "num_examples": None,
        "model_name_or_path": "tiny:mixtral",
        "num_clients": 2,
        "clients_per_round": 2,
        "num_rounds": 1,
        "eval_fraction": 0.25,
        "max_length": 320,
        "bf16": False,
        "activation_checkpointing": False,
        "per_device_train_batch_size": 4,
    }
    bench = load_bench_config(
        RECIPE,
        {
            "output_dir": str(tmp_path / "agnews"),
            "alphas": [1.0],
            "seeds": [0],
            "fedavg_server_lrs": [1.0],
            "methods": {"fcmoe": {"aggregation_method": "fcmoe"}},
            **{f"run.{key}": value for key, value in shrink.items()},
        },
    )
    report = run_bench(bench, progress=False).read_text()
    assert "`global_accuracy` (higher is better)" in report and "| fcmoe |" in report
    rows = (tmp_path / "agnews" / "runs" / "alpha_1" / "seed_0" / "fcmoe" / "metrics.jsonl").read_text()
    last = json.loads(rows.splitlines()[-1])
    assert last["round"] == 1
    for field in ("global_accuracy", "local_accuracy", "local_accuracy_std", "global_accuracy_per_client"):
        assert field in last, field
    assert 0.0 <= last["global_accuracy"] <= 1.0
    assert sorted(last["global_accuracy_per_client"]) == ["client_000", "client_001"]
