"""`hf-fcmoe bench`: the offline recipe's smoke version end to end, reuse of finished runs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_fcmoe.bench import load_bench_config, run_bench
from hf_fcmoe.bench.runner import plan_runs
from hf_fcmoe.federation.provenance import code_version

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "bench" / "offline.yaml"

# The same recipe, shrunk to a CI smoke run: tiny base, 1 alpha x 2 seeds, 2 rounds of 2 steps.
SMOKE = {
    "alphas": [0.5],
    "seeds": [0, 1],
    "fedavg_server_lrs": [1.0, 2.0],
    "methods": {"fcmoe": {"aggregation_method": "fcmoe"}, "fedmoe": {"aggregation_method": "fedmoe"}},
    "pretrain.hidden_size": 64,
    "pretrain.intermediate_size": 64,
    "pretrain.num_hidden_layers": 2,
    "pretrain.num_experts": 4,
    "pretrain.max_steps": 20,
    "pretrain.examples_per_corpus": 120,
    "pretrain.max_length": 48,
    "run.num_examples": 320,
    "run.num_clients": 4,
    "run.min_partition_size": 16,
    "run.num_rounds": 2,
    "run.max_steps": 2,
}


@pytest.fixture(scope="module")
def smoke_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "offline-smoke"
    bench = load_bench_config(RECIPE, {**SMOKE, "output_dir": str(out)})
    report = run_bench(bench, progress=False, command="pytest smoke")
    return bench, report


def test_recipe_is_the_full_grid():
    bench = load_bench_config(RECIPE)
    assert bench.alphas == [0.1, 1.0] and len(bench.seeds) >= 3 and bench.run["num_clients"] >= 8
    required = {"fcmoe", "fcmoe-importance-only", "fedprox", "ties", "fedgh", "fedmoe", "local"}
    assert required <= set(bench.methods) and len(bench.fedavg_server_lrs) >= 2
    plans = plan_runs(bench)
    assert len(plans) == len(bench.alphas) * len(bench.seeds) * len(bench.method_overrides())
    cell = [p for p in plans if p.alpha == 0.1 and p.seed == 1]
    # paired: within a cell only the method fields differ
    assert {p.overrides["seed"] for p in cell} == {1} and {p.overrides["dirichlet_alpha"] for p in cell} == {0.1}
    fcmoe = next(p for p in cell if p.method == "fcmoe-importance-only")
    assert fcmoe.overrides["aggregation_options"] == {"projection": False, "retention": False}


def test_smoke_report_has_every_method_and_paired_gains(smoke_bench):
    bench, report = smoke_bench
    text = report.read_text()
    for method in ("fedavg@1", "fedavg@2", "fcmoe", "fedmoe"):
        assert f"| {method}" in text or f"**{method}**" in text
    assert "(tuned FedAvg)" in text and "reference" in text
    assert "/2)" in text  # wins out of 2 seeds
    assert "Routing specialisation of the base" in text and "before pretraining" in text
    plots = report.parent / "plots"
    for name in ("curves_alpha_0.5.png", "partition_alpha_0.5.png", "conflicts_alpha_0.5.png"):
        assert (plots / name).stat().st_size > 0
    routing = json.loads((report.parent / "base" / "routing.json").read_text())
    assert {"routing_before", "routing_after", "held_out_loss"} <= set(routing)
    # every run of the grid is a normal run directory with the DESIGN contract
    run = report.parent / "runs" / "alpha_0.5" / "seed_1" / "fcmoe"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and (run / "global" / "adapter_config.json").exists()
    assert {row["code"] for row in rows} == {code_version()}  # which code trained it, in every row
    assert f"Code: every run trained by `{code_version()}`." in text


def test_rerun_reuses_finished_runs(smoke_bench):
    bench, report = smoke_bench
    metrics = sorted(Path(bench.output_dir).glob("runs/*/*/*/metrics.jsonl"))
    assert len(metrics) == 8
    stamps = [m.stat().st_mtime_ns for m in metrics]
    base_stamp = (Path(bench.output_dir) / "base" / "model.safetensors").stat().st_mtime_ns
    run_bench(bench, progress=False)
    assert [m.stat().st_mtime_ns for m in metrics] == stamps
    assert (Path(bench.output_dir) / "base" / "model.safetensors").stat().st_mtime_ns == base_stamp


def test_runs_older_than_a_field_at_its_default_are_still_reused(smoke_bench, tmp_path):
    """A field added to the library after a run was written (absent from its config.yaml) blocks reuse only when
    the bench sets it to something else than its default; DDP settings never matter for a one-process run."""
    import yaml

    from hf_fcmoe.bench.runner import finished_metrics, reuse_blockers
    from hf_fcmoe.config import load_config

    bench, _ = smoke_bench
    plan = next(p for p in plan_runs(bench) if p.method == "fcmoe")
    saved = yaml.safe_load((plan.output_dir / "config.yaml").read_text())
    config = load_config(overrides={**plan.overrides, "model_name_or_path": saved["model_name_or_path"]})
    assert finished_metrics(config) is not None
    older = {k: v for k, v in saved.items() if k not in ("retention_lambda_grid", "dp_clip_norm")}
    older["ddp_find_unused_parameters"] = None
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(older))
    assert reuse_blockers(path, config) == []
    changed = load_config(overrides={**config.to_yaml_dict(), "dp_clip_norm": 2.0, "learning_rate": 1e-3})
    assert reuse_blockers(path, changed) == ["dp_clip_norm", "learning_rate"]


def test_a_benchmark_moved_with_its_base_is_still_reused(smoke_bench, tmp_path):
    """Runs record their base by absolute path: a copy of the same base elsewhere (the benchmark folder copied or
    moved) does not block reuse, a base with other weights does."""
    import shutil

    import yaml
    from safetensors.torch import load_file, save_file

    from hf_fcmoe.bench.runner import reuse_blockers
    from hf_fcmoe.config import load_config

    bench, _ = smoke_bench
    plan = next(p for p in plan_runs(bench) if p.method == "fcmoe")
    saved = yaml.safe_load((plan.output_dir / "config.yaml").read_text())
    moved = tmp_path / "moved-base"
    shutil.copytree(saved["model_name_or_path"], moved)
    config = load_config(overrides={**plan.overrides, "model_name_or_path": str(moved)})
    assert reuse_blockers(plan.output_dir / "config.yaml", config) == []
    weights = moved / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    other = tmp_path / "other-base"
    shutil.copytree(moved, other)
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    retrained = load_config(overrides={**plan.overrides, "model_name_or_path": str(other)})
    assert reuse_blockers(plan.output_dir / "config.yaml", retrained) == ["model_name_or_path"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alphas": [0.0]}, "alpha"),
        ({"fedavg_server_lrs": []}, "fedavg_server_lrs"),
        ({"methods": {"fedavg@3": {}}}, "fedavg@"),
        ({"unknown_key": 1}, "unknown_key"),
    ],
)
def test_bad_bench_config_names_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_bench_config(RECIPE, overrides)


def test_bench_cli_runs_in_worker_processes(tmp_path, capsys):
    from hf_fcmoe.cli import main

    overrides = [f"--{key}={json.dumps(value)}" for key, value in SMOKE.items()]
    overrides = [o for o in overrides if not o.startswith(("--seeds", "--fedavg_server_lrs", "--methods"))]
    code = main(
        ["bench", "--config", str(RECIPE), "--output_dir", str(tmp_path / "b"), "--seeds", "[0]"]
        + ["--fedavg_server_lrs", "[1.0]", "--methods", "{local: {aggregation_method: local}}", "--workers", "2"]
        + overrides
    )
    assert code == 0
    text = (tmp_path / "b" / "report.md").read_text()
    assert "| local |" in text and "**fedavg@1** (tuned FedAvg)" in text and "report:" in capsys.readouterr().out
