"""`BenchConfig`: one YAML is one benchmark (the grid, the shared run fields, the base to pretrain).

Every run of the grid is a `FederatedMoEConfig` built from ``run`` (fields shared by all runs) plus
the method's overrides plus the cell's ``dirichlet_alpha`` and ``seed``. The seed fixes the
partition, the LoRA initialisation and client sampling, so all methods of one (alpha, seed) cell
start from the same data split and the same adapter: differences between them are paired.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hf_fcmoe.config import load_yaml_dataclass

FEDAVG_GRID_PREFIX = "fedavg@"

DEFAULT_METHODS: dict[str, dict[str, Any]] = {
    "fcmoe": {"aggregation_method": "fcmoe"},
    "fcmoe-importance-only": {
        "aggregation_method": "fcmoe",
        "aggregation_options": {"projection": False, "retention": False},
    },
    "fcmoe-no-retention": {"aggregation_method": "fcmoe", "aggregation_options": {"retention": False}},
    "fedprox": {"aggregation_method": "fedprox", "proximal_mu": 0.01},
    "ties": {"aggregation_method": "ties"},
    "fedgh": {"aggregation_method": "fedgh"},
    "fedmoe": {"aggregation_method": "fedmoe"},
    "local": {"aggregation_method": "local"},
}


@dataclass
class BenchConfig:
    """A benchmark grid: methods x dirichlet alphas x seeds, with a tuned-FedAvg reference."""

    output_dir: str = field(metadata={"help": "Folder of the benchmark: runs/<alpha>/<seed>/<method>, report.md."})
    run: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "FederatedMoEConfig fields shared by every run of the grid."}
    )
    methods: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {name: dict(overrides) for name, overrides in DEFAULT_METHODS.items()},
        metadata={"help": "Method name -> FederatedMoEConfig overrides (aggregation_method, options, ...)."},
    )
    fedavg_server_lrs: list[float] = field(
        default_factory=lambda: [1.0, 1.5, 2.0],
        metadata={
            "help": "Server steps eta of the FedAvg grid (runs 'fedavg@<eta>'); the best per alpha, by mean final "
            "global metric over seeds, is the reference every method is compared with."
        },
    )
    alphas: list[float] = field(default_factory=lambda: [0.1, 1.0], metadata={"help": "Dirichlet alphas."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds (paired across methods)."})
    target: float | None = field(
        default=None,
        metadata={
            "help": "Rounds-to-target threshold of the global metric; default: the tuned FedAvg's mean final value "
            "at that alpha (how many rounds a method needs to reach what FedAvg reaches in the whole run)."
        },
    )
    workers: int = field(
        default=1,
        metadata={
            "help": "Runs executed at once in separate processes, sharing the CPU threads (tiny models use cores "
            "better this way than with more threads per run); 1 = one run at a time in this process."
        },
    )
    pretrain: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "PretrainConfig fields of a tiny base trained first (and reused); None: run.model_name."},
    )
    # --- regime sweep (bench/regimes.py)
    regimes: dict[str, dict[str, Any]] | None = field(
        default=None,
        metadata={
            "help": "Regime name -> overrides of this benchmark (dotted keys: run.max_steps, pretrain.top_k, "
            "alphas, ...): every regime is a whole benchmark in <output_dir>/<name>, and one summary report "
            "compares them (conflict rate, paired gains vs the tuned FedAvg and vs local training)."
        },
    )
    regimes_only: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated regime names to run now (e.g. --regimes_only labelskew-e16-top1-s10-a0.1); the "
            "summary still includes every other regime whose runs are all finished (read back, never retrained)."
        },
    )

    summary_only: bool = field(
        default=False,
        metadata={
            "help": "Regime sweeps: rewrite <output_dir>/report.md from the finished runs of every regime and train "
            "nothing (after a sweep run in pieces, or to apply a newer report to old runs)."
        },
    )

    def method_overrides(self) -> dict[str, dict[str, Any]]:
        """Every method of the grid, the FedAvg server-step grid included, with its run overrides."""
        grid = {
            f"{FEDAVG_GRID_PREFIX}{eta:g}": {"aggregation_method": "fedavg", "server_lr": float(eta)}
            for eta in self.fedavg_server_lrs
        }
        return {**grid, **self.methods}

    def regime_benches(self) -> dict[str, BenchConfig]:
        """One `BenchConfig` per regime: this one with the regime's overrides, in its own folder."""
        sweep_only = ("regimes", "regimes_only", "summary_only")
        shared = {
            f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.init and f.name not in sweep_only
        }
        benches = {}
        for name, overrides in (self.regimes or {}).items():
            values = _apply_overrides(shared, overrides or {})
            values["output_dir"] = str(Path(self.output_dir) / name)
            benches[name] = BenchConfig(**values)
        return benches

    def selected_regimes(self) -> list[str]:
        """The regimes this invocation runs: `regimes_only`, or every regime."""
        if self.regimes_only is None:
            return list(self.regimes or {})
        return [name.strip() for name in self.regimes_only.split(",") if name.strip()]

    def __post_init__(self):
        if self.regimes_only is not None:
            unknown = [name for name in self.selected_regimes() if name not in (self.regimes or {})]
            if unknown or not self.selected_regimes():
                raise ValueError(
                    f"regimes_only names {unknown or 'no regime'}; this bench's regimes: {sorted(self.regimes or {})}"
                )
        if self.summary_only and (self.regimes is None or self.regimes_only is not None):
            raise ValueError(
                "summary_only rewrites a regime sweep's summary from every finished regime: use it on a bench with "
                "regimes and without regimes_only"
            )
        if self.regimes is not None:
            bad = sorted(name for name in self.regimes if not name or "/" in name or name.startswith("."))
            if bad or not self.regimes:
                raise ValueError(f"regimes must map folder names (no '/') to overrides, got {bad or 'none'}")
        if not self.fedavg_server_lrs:
            raise ValueError("fedavg_server_lrs must name at least one server step: FedAvg is the reference")
        if any(alpha <= 0 for alpha in self.alphas):
            raise ValueError(f"every dirichlet alpha must be > 0, got {self.alphas}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.alphas or not self.seeds:
            raise ValueError("alphas and seeds must each list at least one value")
        clash = sorted(name for name in self.methods if name.startswith(FEDAVG_GRID_PREFIX))
        if clash:
            raise ValueError(f"method names starting with {FEDAVG_GRID_PREFIX!r} are the FedAvg grid's: {clash}")


def _apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A top-level key replaces the recipe's value; a dotted key (``run.num_rounds``) sets one nested field."""
    values = dict(values)
    for key, value in overrides.items():
        head, dot, rest = key.partition(".")
        if dot:
            values[head] = {**(values.get(head) or {}), rest: value}
        else:
            values[key] = value
    return values


def load_bench_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> BenchConfig:
    """Read a bench YAML; ``overrides`` may use dotted keys (``run.num_rounds``, ``pretrain.max_steps``).

    Unknown keys fail with where they came from and the closest field, the ``run`` fields included.
    """
    from hf_fcmoe.config import FederatedMoEConfig
    from hf_fcmoe.config_fields import check_known_keys, read_yaml_mapping

    values = read_yaml_mapping(path, "BenchConfig") if path else {}
    overrides = overrides or {}
    check_known_keys(BenchConfig, values, f"recipe {path}")
    check_known_keys(FederatedMoEConfig, values.get("run") or {}, f"recipe {path} (run:)", prefix="run.")
    check_known_keys(BenchConfig, {key.partition(".")[0] for key in overrides}, "the command line", prefix="--")
    run_keys = [key.partition(".")[2] for key in overrides if key.startswith("run.")]
    check_known_keys(FederatedMoEConfig, run_keys, "the command line", prefix="--run.")
    return load_yaml_dataclass(BenchConfig, None, _apply_overrides(values, overrides))
