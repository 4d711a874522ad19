"""The regime sweep (bench `regimes`) and the disagreement scenario it runs on (issue 16)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from hf_fcmoe.bench import load_bench_config, run_bench
from hf_fcmoe.data.disagreement import synthetic_disagreement

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "bench" / "regimes.yaml"

SMOKE = {
    "seeds": [0],
    "workers": 1,
    "fedavg_server_lrs": [1.0],
    "methods": {
        "fcmoe": {"aggregation_method": "fcmoe"},
        "fedavg-ft": {"aggregation_method": "fedavg", "personalization": "finetune"},
        "local": {"aggregation_method": "local"},
    },
    "pretrain.hidden_size": 64,
    "pretrain.intermediate_size": 64,
    "pretrain.num_hidden_layers": 2,
    "pretrain.num_experts": 4,
    "pretrain.max_steps": 10,
    "pretrain.examples_per_corpus": 60,
    "pretrain.max_length": 48,
    "run.num_examples": 160,
    "run.num_clients": 2,
    "run.min_partition_size": 16,
    "run.num_rounds": 1,
    "run.max_steps": 1,
}


def test_disagreement_rows_contradict_on_map_and_agree_on_shared_skills():
    data = synthetic_disagreement(2000, seed=0)
    answers = defaultdict(set)
    for text, label, kind in zip(data["text"], data["label"], data["kind"]):
        prompt, answer = text.rsplit(" = ", 1)
        answers[(kind, prompt)].add((label, answer))
    contradicted = [v for (kind, _), v in answers.items() if kind == "conflicting" and len({a for _, a in v}) > 1]
    assert len(contradicted) > 50  # the same prompt, different correct answers in different groups
    shared = [v for (kind, _), v in answers.items() if kind == "shared" and len({g for g, _ in v}) > 1]
    assert shared and all(len({a for _, a in v}) == 1 for v in shared)  # shared skills: one answer everywhere
    assert set(data["label"]) == {"sort", "reverse", "upper", "vowels"}
    with pytest.raises(ValueError, match="nope"):
        synthetic_disagreement(10, config="sort,nope")
    with pytest.raises(ValueError, match="at least 2"):
        synthetic_disagreement(10, config="sort")


def test_regimes_recipe_covers_both_scenarios_and_every_baseline():
    bench = load_bench_config(RECIPE)
    regimes = bench.regime_benches()
    assert {b.run["dataset_name"] for b in regimes.values()} == {"synthetic_domains", "synthetic_disagreement"}
    assert {b.pretrain["top_k"] for b in regimes.values()} == {1, 2}
    assert {b.pretrain["num_experts"] for b in regimes.values()} == {8, 16}
    assert {b.run["max_steps"] for b in regimes.values()} == {10, 50}
    assert {a for b in regimes.values() for a in b.alphas} == {0.1, 1.0}
    assert all(len(b.seeds) >= 3 for b in regimes.values())
    required = {"fcmoe", "fcmoe-factor-space", "fcmoe-importance-only", "fedavg-ft", "ditto", "personal-router"}
    required |= {"fcmoe-module", "fcmoe-no-retention", "fcmoe-lambda-auto", "fcmoe-deviation-lambda-auto"}
    assert required | {"local"} <= set(bench.methods)
    for name, sub in regimes.items():
        assert sub.output_dir == str(Path(bench.output_dir) / name) and not sub.regimes
    with pytest.raises(ValueError, match="regimes"):
        load_bench_config(RECIPE, {"regimes": {"a/b": {}}})


@pytest.mark.slow  # ~1 min on a quiet 2-core machine (a tiny pretraining and 8 tiny runs)
def test_regime_sweep_runs_one_regime_at_a_time_and_merges_finished_ones(tmp_path):
    overrides = {
        **SMOKE,
        "output_dir": str(tmp_path / "sweep"),
        "pretrain.output_dir": str(tmp_path / "base"),
        "regimes": {
            "labelskew": {},
            "disagreement": {"run.dataset_name": "synthetic_disagreement", "run.dataset_config": None},
        },
    }
    first = run_bench(load_bench_config(RECIPE, {**overrides, "regimes_only": "labelskew"}), progress=False)
    text = first.read_text()
    assert "## labelskew, alpha = 0.1" in text and "## disagreement" not in text
    assert "| disagreement | 0/4 | `--regimes_only disagreement` |" in text
    assert not (tmp_path / "sweep" / "disagreement").exists()  # not run, not even started
    labelskew_runs = sorted((tmp_path / "sweep" / "labelskew").glob("runs/*/*/*/metrics.jsonl"))
    stamps = [path.stat().st_mtime_ns for path in labelskew_runs]
    report = run_bench(load_bench_config(RECIPE, {**overrides, "regimes_only": "disagreement"}), progress=False)
    assert [path.stat().st_mtime_ns for path in labelskew_runs] == stamps  # read back, not retrained
    text = report.read_text()
    assert "## labelskew, alpha = 0.1" in text and "## disagreement, alpha = 0.1" in text
    assert "gain vs local: personalized" in text and "## Goal check over every cell" in text
    assert "Regimes not in this summary" not in text
    rows = [line for line in text.splitlines() if line.startswith("| fcmoe |") and "±" in line]
    assert len(rows) == 2  # one per cell, then one per metric across the cells:
    across = text.split("## Across cells", 1)[1].split("## Goal check", 1)[0]
    assert "| method | labelskew | disagreement |" in across and across.count("| fcmoe | ") == 2
    assert "| local | reference | reference |" in across
    for line in rows:
        assert line.count("(") >= 3  # paired gains vs FedAvg, local and FedAvg+fine-tune, with wins
    for regime in ("labelskew", "disagreement"):
        assert (tmp_path / "sweep" / regime / "report.md").exists()
    assert "largest difference over seeds: `fedavg-ft` 0.0000" in text  # the built-in control holds
    again = run_bench(load_bench_config(RECIPE, {**overrides, "summary_only": True}), progress=False).read_text()
    assert [path.stat().st_mtime_ns for path in labelskew_runs] == stamps
    assert again.split("## labelskew", 1)[1] == text.split("## labelskew", 1)[1]  # same cells, nothing trained


def test_regimes_only_must_name_regimes_of_the_bench():
    bench = load_bench_config(RECIPE, {"regimes_only": "labelskew-e8-top2-s10-a0.1, labelskew-e8-top2-s10-a1"})
    assert bench.selected_regimes() == ["labelskew-e8-top2-s10-a0.1", "labelskew-e8-top2-s10-a1"]
    with pytest.raises(ValueError, match="nope"):
        load_bench_config(RECIPE, {"regimes_only": "labelskew-e8-top2-s10-a0.1,nope"})
    with pytest.raises(ValueError, match="no regime"):
        load_bench_config(RECIPE, {"regimes_only": " , "})


def test_goal_check_counts_only_methods_that_ran_in_every_cell():
    from hf_fcmoe.bench.regimes import goal_check

    verdict, table = goal_check(
        {"everywhere": [True, True, True], "two-cells": [True, True], "a": [True, False, True]}, 3
    )
    assert verdict == "Configurations that meet the goal in every cell: `everywhere`."
    assert "| two-cells | 2/2 (ran in 2 of 3 cells) |" in table and "| a | 2/3 |" in table
    verdict, _ = goal_check({"two-cells": [True, True]}, 3)
    assert verdict.startswith("No configuration meets the goal")


def test_summary_only_trains_nothing_and_lists_what_is_missing(tmp_path):
    bench = load_bench_config(RECIPE, {"output_dir": str(tmp_path / "sweep"), "summary_only": True})
    text = run_bench(bench, progress=False).read_text()
    assert "| labelskew-e16-top1-s10-a0.1 | 0/" in text and "## Goal check over every cell" in text
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["report.md"]  # no base, no run folder
    with pytest.raises(ValueError, match="summary_only"):
        load_bench_config(RECIPE, {"summary_only": True, "regimes_only": "labelskew-e8-top2-s10-a0.1"})


def test_only_fedavg_with_a_side_personalization_or_another_forward_counts_as_fedavg_at_step_one():
    from hf_fcmoe.bench.regimes import trains_fedavg_global

    assert trains_fedavg_global({"aggregation_method": "fedavg", "personalization": "ditto"})
    assert trains_fedavg_global({"aggregation_method": "fedavg", "personalization": "finetune"})
    assert trains_fedavg_global({"aggregation_method": "fedavg", "expert_lora_forward": "peft"})
    assert not trains_fedavg_global({"aggregation_method": "fedavg"})  # that is fedavg@1 itself
    assert not trains_fedavg_global({"aggregation_method": "fedavg", "personalization": "personal_router"})
    assert not trains_fedavg_global({"aggregation_method": "fedavg", "personalization": "ditto", "server_lr": 1.5})
    assert not trains_fedavg_global({"aggregation_method": "fcmoe", "personalization": "finetune"})
