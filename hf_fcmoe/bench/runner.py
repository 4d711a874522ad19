"""Execute a benchmark grid: one `run_simulation` per (method, alpha, seed), reusing finished runs.

A run whose directory already holds every round under the same resolved config is read back instead
of retrained, so an interrupted benchmark continues where it stopped and a re-run only recomputes
what changed. Progress bars show method, alpha, seed (outer) and rounds (inner).
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from hf_fcmoe.bench.config import BenchConfig
from hf_fcmoe.config import FederatedMoEConfig, load_config
from hf_fcmoe.data.federated import load_federated_data
from hf_fcmoe.federation.run_dir import RunDirectory
from hf_fcmoe.federation.simulation import config_changes, run_simulation


@dataclass
class RunPlan:
    """One cell of the grid and where its run lives."""

    method: str
    alpha: float
    seed: int
    output_dir: Path
    overrides: dict[str, Any]


def _merge(shared: dict[str, Any], method: dict[str, Any]) -> dict[str, Any]:
    """Method overrides on top of the shared fields; aggregation_options are merged key by key."""
    merged = {**shared, **method}
    if "aggregation_options" in shared and "aggregation_options" in method:
        merged["aggregation_options"] = {**shared["aggregation_options"], **method["aggregation_options"]}
    return merged


def plan_runs(bench: BenchConfig, model_name_or_path: str | None = None) -> list[RunPlan]:
    """Every run of the grid, alpha-major then seed then method (so early cells are complete comparisons)."""
    root = Path(bench.output_dir) / "runs"
    shared = dict(bench.run)
    if model_name_or_path is not None:
        shared["model_name_or_path"] = model_name_or_path
    plans = []
    for alpha in bench.alphas:
        for seed in bench.seeds:
            for method, overrides in bench.method_overrides().items():
                out = root / f"alpha_{alpha:g}" / f"seed_{seed}" / method
                values = _merge(shared, overrides)
                values.update(dirichlet_alpha=float(alpha), seed=int(seed), output_dir=str(out))
                plans.append(RunPlan(method, float(alpha), int(seed), out, values))
    return plans


# A bench run is one process: DDP settings cannot have changed what it computed (runs written before the config
# filled in ddp_find_unused_parameters saved null there).
SINGLE_PROCESS_IRRELEVANT = {"ddp_find_unused_parameters"}


def reuse_blockers(saved_config: Path, config: FederatedMoEConfig) -> list[str]:
    """The settings in which a finished run differs from `config` (empty: reuse it): `config_changes` (which
    takes a field the saved config lacks at its declared default as unchanged) less the DDP-only settings, and
    less the base's path when both paths hold the same base (a benchmark copied or moved with its base)."""
    changes = [key for key in config_changes(saved_config, config) if key not in SINGLE_PROCESS_IRRELEVANT]
    if "model_name_or_path" in changes:
        saved = yaml.safe_load(saved_config.read_text()).get("model_name_or_path")
        if isinstance(saved, str) and same_local_model(saved, config.model_name_or_path):
            changes.remove("model_name_or_path")
    return changes


def same_local_model(first: str, second: str) -> bool:
    """Two existing local folders holding the same model: the same config.json and the same weight files."""
    a, b = Path(first), Path(second)
    if not (a.is_dir() and b.is_dir()):  # a Hub id, or a folder that is gone: only the same name is the same
        return False
    digest = _model_digest(a.resolve())
    return digest is not None and digest == _model_digest(b.resolve())


@functools.lru_cache(maxsize=16)
def _model_digest(folder: Path) -> str | None:
    """sha256 over config.json and every *.safetensors / *.bin file (names and bytes); None without weights."""
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    if not any(p.suffix != ".json" for p in files):
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def finished_metrics(config: FederatedMoEConfig) -> list[dict] | None:
    """The metrics of a complete run of this config in its output_dir (`reuse_blockers` empty), else None."""
    run_dir = RunDirectory(config.output_dir)
    saved_config = run_dir.root / "config.yaml"
    if not (run_dir.has_completed_rounds() and saved_config.exists()):
        return None
    if int(run_dir.read_state().get("last_round", -1)) != config.num_rounds:
        return None
    return None if reuse_blockers(saved_config, config) else run_dir.read_metrics()


def prepare_base(bench: BenchConfig) -> str | None:
    """Pretrain (or reuse) the benchmark's base when it has a ``pretrain`` section; its folder, else None."""
    if bench.pretrain is None:
        return None
    from hf_fcmoe.models.pretrain import PretrainConfig, pretrain_base

    values = {"output_dir": str(Path(bench.output_dir) / "base"), **bench.pretrain}
    return str(pretrain_base(PretrainConfig(**values)).resolve())


def _run_one(overrides: dict[str, Any], threads: int | None = None) -> list[dict]:
    """One run of the grid (read back when already finished); in a worker process, with `threads` threads."""
    if threads is not None:
        torch.set_num_threads(threads)
    config = load_config(overrides={**overrides, "overwrite_output_dir": True})
    rows = finished_metrics(config)
    # in worker processes only the parent's bar is shown (interleaved bars from several processes are noise)
    return rows if rows is not None else run_simulation(config, progress=threads is None).metrics


def _execute(plans: list[RunPlan], workers: int, progress: bool) -> dict[tuple[str, float, int], list[dict]]:
    """Run every plan, in this process (workers=1) or in `workers` spawned processes sharing the CPU threads."""
    results: dict[tuple[str, float, int], list[dict]] = {}
    bar = tqdm(total=len(plans), desc="bench", disable=not progress)
    if workers <= 1:
        for plan in plans:
            bar.set_description(f"{plan.method} alpha={plan.alpha:g} seed={plan.seed}")
            results[(plan.method, plan.alpha, plan.seed)] = _run_one(plan.overrides)
            bar.update()
        return results
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(_run_one, plan.overrides, threads): plan for plan in plans}
        for future in as_completed(futures):
            plan = futures[future]
            results[(plan.method, plan.alpha, plan.seed)] = future.result()
            bar.set_description(f"done {plan.method} alpha={plan.alpha:g} seed={plan.seed}")
            bar.update()
    return results


def run_bench(bench: BenchConfig, progress: bool = True, command: str | None = None) -> Path:
    """Run (or continue) the whole grid and write ``report.md``; returns the report path."""
    from hf_fcmoe.bench.report import write_bench_report

    if bench.regimes:
        from hf_fcmoe.bench.regimes import run_regimes

        return run_regimes(bench, progress, command)
    started = time.perf_counter()
    base = prepare_base(bench)
    plans = plan_runs(bench, base)
    results = _execute(plans, bench.workers, progress)
    first = load_config(overrides=plans[0].overrides)
    routing = {"benchmark domains, base used": base_routing(first)}
    if base is not None:
        pretrained = json.loads((Path(base) / "routing.json").read_text())
        for stage in ("before", "after"):
            for where, summary in pretrained[f"routing_{stage}"].items():
                routing[f"{where.replace('_', ' ')}, {stage} pretraining"] = summary
    partitions = {}
    for alpha in bench.alphas:
        cell = next(p for p in plans if p.alpha == alpha and p.seed == bench.seeds[0])
        partitions[alpha] = load_federated_data(load_config(overrides=cell.overrides).data_spec()).label_counts
    seconds = time.perf_counter() - started
    return write_bench_report(bench, first, results, routing, partitions, seconds, command)


def base_routing(config: FederatedMoEConfig, per_domain: int = 100) -> dict:
    """Routing specialisation of the run's base model on the benchmark's own domains (its label column)."""
    from hf_fcmoe.data.federated import resolve_text_column
    from hf_fcmoe.data.sources import load_source
    from hf_fcmoe.metrics.routing_probe import routing_specialisation, texts_by_domain
    from hf_fcmoe.models.loading import load_base_model

    raw = load_source(config.dataset_name, config.dataset_config, config.dataset_split, config.num_examples, 0)
    text_column = resolve_text_column(raw, config.dataset_name, config.text_column)
    texts = texts_by_domain(raw[text_column], raw[config.label_column], per_domain)
    model, tokenizer = load_base_model(
        config.model_name_or_path, seed=config.seed, num_experts=config.tiny_num_experts
    )
    return routing_specialisation(model, tokenizer, texts, max_length=config.max_length or 128)
