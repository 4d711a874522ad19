"""The server side of a run, independent of the engine: the run directory's writes and reads.

Both engines (the in-process simulation and the Flower ServerApp) call these, so a run directory looks the
same whichever engine wrote it (DESIGN.md section 3): a fresh start or a checked resume, one atomic
checkpoint per round, one metrics row per round, and the final adapters and report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields
from enum import Enum
from pathlib import Path

import numpy as np
import yaml
from peft import LoraConfig

from hf_fcmoe.adapters.layout import ExpertLayout
from hf_fcmoe.aggregation import AggregationHub, AggregationResult, ClientUpdate
from hf_fcmoe.aggregation.types import State
from hf_fcmoe.config import FederatedMoEConfig
from hf_fcmoe.federation import checkpoint_io
from hf_fcmoe.federation.faults import crash_point
from hf_fcmoe.federation.provenance import CODE_FIELD, code_version
from hf_fcmoe.federation.round_metrics import state_nbytes
from hf_fcmoe.federation.run_dir import RunDirectory, load_adapter_weights, save_adapter_folder

RESUME_IGNORED_KEYS = {"output_dir", "num_rounds", "overwrite_output_dir"}


@dataclass
class SimulationResult:
    """Where a finished run put its outputs, and its metric rows."""

    output_dir: Path
    global_dir: Path
    personalized_dirs: dict[str, Path]
    report_path: Path
    metrics: list[dict]


def config_changes(saved_path: Path, config: FederatedMoEConfig) -> list[str]:
    """Fields in which `config` differs from the run config saved at `saved_path` (what resuming must not change).

    A field the saved config lacks (the run was written before the field existed) is unchanged when `config` holds
    its declared default: a new field's default keeps the old behaviour, so a finished run stays reusable.
    """
    saved, current = yaml.safe_load(saved_path.read_text()), config.to_yaml_dict()
    keys = (set(saved) | set(current)) - RESUME_IGNORED_KEYS
    return sorted(key for key in keys if saved.get(key, _declared_default(config, key)) != current.get(key))


def _declared_default(config: FederatedMoEConfig, name: str) -> object:
    """The dataclass default of field `name` as `to_yaml_dict` writes it; a sentinel when it has none."""
    for f in fields(config):
        if f.name == name:
            value = f.default if f.default is not MISSING else MISSING
            if value is MISSING and f.default_factory is not MISSING:
                value = f.default_factory()
            return value.value if isinstance(value, Enum) else value
    return MISSING


def sample_clients(client_ids: list[str], per_round: int, seed: int, round_index: int) -> list[str]:
    """The clients of one round: a seeded draw that depends only on (seed, round)."""
    rng = np.random.default_rng([seed, round_index])
    chosen = rng.choice(len(client_ids), size=per_round, replace=False)
    return [client_ids[i] for i in sorted(chosen.tolist())]


def build_hub(config: FederatedMoEConfig, layout: ExpertLayout) -> AggregationHub:
    options = dict(config.aggregation_options)
    if config.aggregation_method == "fcmoe":
        options.setdefault("retention_lambda", config.retention_lambda)
    if config.aggregation_method == "fedprox" and config.proximal_mu <= 0:
        raise ValueError(f"aggregation_method 'fedprox' needs proximal_mu > 0, got {config.proximal_mu}")
    return AggregationHub(
        layout,
        method=config.aggregation_method,
        server_lr=config.server_lr,
        max_num_examples=config.max_client_examples,
        **options,
    )


def require_engine(config: FederatedMoEConfig, engine: str) -> None:
    """Refuse a config meant for another engine (a Flower recipe never silently runs in-process)."""
    if config.engine == engine:
        return
    if config.engine == "flower":
        raise ValueError(
            "engine 'flower' runs on a Flower deployment, not in this process: start flower-superlink and one "
            "flower-supernode per client, then `flwr run recipes/flower <federation>` (recipes/flower/README.md); "
            "or set engine: simulation"
        )
    raise ValueError(f"this is the {engine!r} engine, but the config asks for engine {config.engine!r}")


def check_output_dir(config: FederatedMoEConfig, resume: bool) -> None:
    """Refuse to resume what is not there or differs, and to overwrite a run unless asked to.

    Needs no process group: `hf-fcmoe` checks it before `accelerate launch` starts any process.
    """
    run_dir = RunDirectory(config.output_dir)
    root = run_dir.root
    if resume:
        if not run_dir.has_completed_rounds():
            raise FileNotFoundError(f"--resume: no completed round to resume from in {root}")
        changed = config_changes(root / "config.yaml", config)
        if changed:
            raise ValueError(f"--resume: config differs from the run being resumed in {changed}")
    elif run_dir.has_completed_rounds() and not config.overwrite_output_dir:
        raise FileExistsError(
            f"{root} already holds a run; pass --resume to continue it or --overwrite_output_dir true"
        )


def write_fresh_run(run_dir: RunDirectory, config: FederatedMoEConfig) -> None:
    """Start a run directory: the resolved config, and nothing left of an earlier run's rounds or metrics."""
    run_dir.root.mkdir(parents=True, exist_ok=True)
    (run_dir.root / "config.yaml").write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=True))
    run_dir.discard_uncommitted(-1)
    run_dir.metrics_file.unlink(missing_ok=True)


def last_completed_round(run_dir: RunDirectory) -> int:
    """The newest round whose manifest verifies: a corrupt or partial newest round is redone, never loaded."""
    last, problems = checkpoint_io.last_intact_round(run_dir.root / "rounds", int(run_dir.read_state()["last_round"]))
    if last is None:
        raise FileNotFoundError(f"--resume: no intact round in {run_dir.root} ({problems[0]})")
    return last


def load_round(run_dir: RunDirectory, round_index: int, hub: AggregationHub) -> tuple[State, dict[str, State]]:
    """The global state and the residuals checkpointed with a round; restores the hub's server state in place."""
    round_dir = run_dir.round_dir(round_index)
    global_state = load_adapter_weights(round_dir / "global")
    residuals = {}
    residual_dir = round_dir / "residuals"
    if residual_dir.exists():
        residuals = {p.stem: run_dir.load_tensors(p) for p in sorted(residual_dir.glob("*.safetensors"))}
    hub_state = checkpoint_io.load_hub_state(round_dir)  # safetensors + JSON, never pickle
    if hub_state is not None:
        hub.load_state_dict(hub_state)
    return global_state, residuals


def metrics_row(
    eval_fields: dict,
    round_index: int,
    method: str,
    global_state: State,
    result: AggregationResult,
    updates: list[ClientUpdate],
    seconds: float,
    exchanges_adapters: bool = True,
) -> dict:
    """One metrics.jsonl row: the evaluation fields plus the round's bookkeeping and diagnostics."""
    row = dict(eval_fields)
    row.update(
        round=round_index,
        method=method,
        clients=[u.client_id for u in updates],
        train_loss=float(np.mean([u.train_loss for u in updates])) if updates else None,
        # `local` never exchanges adapters: its clients train alone
        bytes_up=sum(state_nbytes(u.state) for u in updates) if exchanges_adapters else 0,
        bytes_down=state_nbytes(global_state) * len(updates) if exchanges_adapters else 0,
        seconds=round(seconds, 3),
        failed=result.failed,
    )
    diagnostics = result.diagnostics or {}
    for key in ("conflict_rate", "conflict_rate_per_layer", "conflicts", "rejected", "dropped", "clipped"):
        if key in diagnostics:
            row[key] = diagnostics[key]
    return row


def write_round(
    run_dir: RunDirectory,
    round_index: int,
    global_state: State,
    lora_config: LoraConfig,
    updates: list[ClientUpdate],
    residuals: dict[str, State],
    hub: AggregationHub,
    row: dict,
    num_rounds: int,
) -> None:
    """Stage the round's files, rename them into place, then record metrics and the resume point."""
    staging = run_dir.staging_dir(round_index)
    save_adapter_folder(staging / "global", global_state, lora_config)
    crash_point("writing_round", round_index)
    for update in updates:
        client_dir = staging / "clients" / update.client_id
        client_dir.mkdir(parents=True)
        run_dir.save_tensors(client_dir / "adapter_model.safetensors", update.state)
        stats = {
            "num_examples": update.num_examples,
            "train_loss": update.train_loss,
            **update.metrics,
            "expert_counts": update.expert_counts.tolist() if update.expert_counts is not None else None,
        }
        (client_dir / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
    if residuals:
        (staging / "residuals").mkdir()
        for cid, residual in residuals.items():
            run_dir.save_tensors(staging / "residuals" / f"{cid}.safetensors", residual)
    hub_state = hub.state_dict()
    if hub_state:
        checkpoint_io.save_hub_state(staging, hub_state)
    checkpoint_io.write_manifest(staging)  # last: a round without a verifying manifest is never loaded
    run_dir.commit_round(round_index, staging)
    crash_point("committed", round_index)
    row.setdefault(CODE_FIELD, code_version())
    run_dir.append_metrics(row)
    run_dir.write_state({"last_round": round_index, "num_rounds": num_rounds})


def write_final_outputs(
    run_dir: RunDirectory,
    global_state: State,
    lora_config: LoraConfig,
    tokenizer,
    metrics: list[dict],
    client_ids: Iterable[str] = (),
    personalized_state: Callable[[str], State] | None = None,
    label_counts: dict | None = None,
) -> None:
    """The final global adapter, each listed client's personalized adapter, and the report."""
    from hf_fcmoe.reporting.run_report import write_run_report

    root = run_dir.root
    save_adapter_folder(root / "global", global_state, lora_config, tokenizer)
    for cid in client_ids:
        save_adapter_folder(root / "personalized" / cid, personalized_state(cid), lora_config, tokenizer)
    write_run_report(root, metrics, label_counts)
