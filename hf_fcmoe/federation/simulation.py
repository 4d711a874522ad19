"""The in-process federation engine (the embedded default): every client trains in this process.

Round loop: sample clients (seeded per round), train each from the global adapter (plus its
retained residual under FC-MoE), aggregate through the hub, evaluate global and personalized
adapters, checkpoint the round atomically, append a metrics row. `resume=True` continues from
the last completed round and reproduces the uninterrupted run: every random choice is a function of
(seed, round, client), and the hub's server-optimizer state is checkpointed with each round.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import PartialState
from tqdm.auto import tqdm

from hf_fcmoe.adapters.layout import ExpertLayout
from hf_fcmoe.adapters.lora import apply_expert_lora, build_lora_config, expert_layout_from_peft_model
from hf_fcmoe.aggregation import AggregationHub, AggregationResult, ClientUpdate
from hf_fcmoe.aggregation.types import State
from hf_fcmoe.config import FederatedMoEConfig
from hf_fcmoe.data.federated import FederatedData, load_federated_data
from hf_fcmoe.federation.client import ClientWorker, PreparedSplits, round_seed
from hf_fcmoe.federation.personalization import build_personalizer
from hf_fcmoe.federation.round_metrics import evaluate_round, state_nbytes
from hf_fcmoe.federation.run_dir import RunDirectory, load_adapter_weights, save_adapter_folder
from hf_fcmoe.models.families import get_family
from hf_fcmoe.models.loading import is_tiny, load_base_model, save_base_model
from hf_fcmoe.training.trainer import adapter_state

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
    """Fields in which `config` differs from the run config saved at `saved_path` (what resuming must not change)."""
    saved, current = yaml.safe_load(saved_path.read_text()), config.to_yaml_dict()
    keys = (set(saved) | set(current)) - RESUME_IGNORED_KEYS
    return sorted(key for key in keys if saved.get(key) != current.get(key))


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
    return AggregationHub(layout, method=config.aggregation_method, server_lr=config.server_lr, **options)


def _check_data(data: FederatedData) -> None:
    for cid in data.client_ids:
        if len(data.train[cid]) == 0:
            raise ValueError(f"client {cid!r} has zero training examples; lower eval_fraction or num_clients")


def _add_scaled(state: State, residual: State | None, scale: float) -> State:
    if residual is None or scale == 0:
        return state
    return {key: (tensor.float() + scale * residual[key].float()).to(tensor.dtype) for key, tensor in state.items()}


class FederatedSimulation:
    """One run of the in-process engine; `run()` executes (or resumes) it."""

    def __init__(self, config: FederatedMoEConfig, resume: bool = False, progress: bool = True):
        self.config = config
        self.run_dir = RunDirectory(config.output_dir)
        self.resume = resume
        # Under `accelerate launch` every process runs this loop (local rounds train data-parallel, the
        # hub's math is deterministic); only the main process writes the run directory.
        self.process = PartialState()
        self.quiet = not (progress and self.process.is_main_process)  # progress bars on the main process only
        self._check_output_dir()
        # Everything that can fail on bad input happens here, before any training.
        self.data = load_federated_data(config.data_spec())
        _check_data(self.data)
        base_dir = self.run_dir.base_model_dir
        source = str(base_dir) if (resume and base_dir.exists()) else config.model_name_or_path
        model, self.tokenizer = load_base_model(source, seed=config.seed, num_experts=config.tiny_num_experts)
        family = get_family(model.config)
        base_reference = config.model_name_or_path
        if is_tiny(config.model_name_or_path):
            # the existence check runs on the main process only: every process must reach the barrier
            self._on_main_process(lambda: base_dir.exists() or save_base_model(model, self.tokenizer, base_dir))
            base_reference = str(base_dir.resolve())
        self.lora_config = build_lora_config(
            family, config.lora_r, config.lora_alpha, config.lora_targets, base_model_name_or_path=base_reference
        )
        torch.manual_seed(config.seed)
        self.model = apply_expert_lora(model, self.lora_config)
        self.layout = expert_layout_from_peft_model(self.model)
        self.hub = build_hub(config, self.layout)
        self.worker = ClientWorker(self.model, self.tokenizer, config)
        self.personalizer = build_personalizer(config, self.worker, self.layout)  # None: the hub's retention
        self.splits: dict[str, PreparedSplits] = {}
        self.residuals: dict[str, State] = {}

    def _check_output_dir(self) -> None:
        root = self.run_dir.root
        if self.resume:
            if not self.run_dir.has_completed_rounds():
                raise FileNotFoundError(f"--resume: no completed round to resume from in {root}")
            changed = config_changes(root / "config.yaml", self.config)
            if changed:
                raise ValueError(f"--resume: config differs from the run being resumed in {changed}")
        elif self.run_dir.has_completed_rounds() and not self.config.overwrite_output_dir:
            raise FileExistsError(
                f"{root} already holds a run; pass --resume to continue it or --overwrite_output_dir true"
            )

    def _on_main_process(self, write: Callable[[], object]) -> None:
        """Run `write` on the main process only, then let every process continue together."""
        if self.process.is_main_process:
            write()
        self.process.wait_for_everyone()

    # --- state helpers
    def personalized_state(self, global_state: State, client_id: str) -> State:
        """The client's own adapter: global + scale * residual (FC-MoE retention; `local`: its own trained state)."""
        return _add_scaled(global_state, self.residuals.get(client_id), self.personal_scale)

    def start_state(self, global_state: State, client_id: str, retained: State | None) -> State:
        """Where a client's round starts: its personalized state, or with a personalizer global + retained."""
        if self.personalizer is not None:
            return self.personalizer.start_state(global_state, retained)
        return self.personalized_state(global_state, client_id)

    @property
    def keeps_own_state(self) -> bool:
        """`local`: each client keeps training its own adapter; it is stored as the residual own - global."""
        return self.config.aggregation_method == "local"

    @property
    def personal_scale(self) -> float:
        if self.personalizer is not None:  # residuals are personal - global
            return 1.0
        return 1.0 if self.keeps_own_state else self.hub_retention

    def _new_residuals(self, result: AggregationResult) -> dict[str, State]:
        if not self.keeps_own_state:
            return result.residuals
        return {
            cid: {key: state[key].float() - result.global_state[key].float() for key in state}
            for cid, state in result.personalized.items()
        }

    def retained_part(self, client_id: str) -> State | None:
        """lambda * residual of a client (what its start state adds to the global), or None."""
        residual = self.residuals.get(client_id)
        if self.personalizer is not None:
            return self.personalizer.retained(residual)
        if residual is None or self.hub_retention == 0:
            return None
        return {key: self.hub_retention * tensor.float() for key, tensor in residual.items()}

    @property
    def hub_retention(self) -> float:
        return float(getattr(self.hub, "retention_lambda", 0.0)) if getattr(self.hub, "uses_retention", False) else 0.0

    def _restore(self) -> tuple[int, State]:
        state = self.run_dir.read_state()
        last = int(state["last_round"])
        self._on_main_process(lambda: self.run_dir.roll_back_to(last))
        round_dir = self.run_dir.round_dir(last)
        global_state = load_adapter_weights(round_dir / "global")
        residual_dir = round_dir / "residuals"
        if residual_dir.exists():
            self.residuals = {p.stem: self.run_dir.load_tensors(p) for p in sorted(residual_dir.glob("*.safetensors"))}
        hub_state = round_dir / "hub_state.pt"
        if hub_state.exists():
            self.hub.load_state_dict(torch.load(hub_state, weights_only=True))
        return last, global_state

    def _start(self) -> tuple[int, State]:
        self._on_main_process(self._write_fresh_run)
        return 0, adapter_state(self.model)

    def _write_fresh_run(self) -> None:
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        (self.run_dir.root / "config.yaml").write_text(yaml.safe_dump(self.config.to_yaml_dict(), sort_keys=True))
        self.run_dir.discard_uncommitted(-1)
        self.run_dir.metrics_file.unlink(missing_ok=True)

    # --- the loop
    def run(self, on_round_end: Callable[[int, dict], None] | None = None) -> SimulationResult:
        last, global_state = self._restore() if self.resume else self._start()
        client_ids = self.data.client_ids
        for cid in tqdm(client_ids, desc="preparing client data", leave=False, disable=self.quiet):
            self.splits[cid] = self.worker.prepare(self.data.train[cid], self.data.eval[cid])
        # Trainer.train() ends every local round with accelerate's free_memory(), a full gc.collect(); with the
        # model, datasets and tokenizer in memory that walk took ~0.16 s per client round (a quarter of a tiny
        # run). Objects alive now live for the whole run: freeze them out of the collector's generations.
        gc.collect()
        gc.freeze()
        try:
            return self._run_rounds(last, global_state, on_round_end)
        finally:
            gc.unfreeze()  # a process that runs many simulations (a benchmark) must not keep them all

    def _run_rounds(
        self, last: int, global_state: State, on_round_end: Callable[[int, dict], None] | None
    ) -> SimulationResult:
        client_ids = self.data.client_ids
        if last == 0 and not self.resume:
            row = self._evaluate(0, global_state, AggregationResult(global_state), [], 0.0)
            self._checkpoint(0, global_state, [], row)
        rounds = tqdm(
            range(last + 1, self.config.num_rounds + 1),
            desc="rounds",
            initial=last,
            total=self.config.num_rounds,
            disable=self.quiet,
        )
        for round_index in rounds:
            started = time.perf_counter()
            sampled = sample_clients(client_ids, self.config.sampled_per_round, self.config.seed, round_index)
            updates = []
            for cid in tqdm(sampled, desc=f"round {round_index} clients", leave=False, disable=self.quiet):
                retained = self.retained_part(cid)
                updates.append(
                    self.worker.train(
                        cid,
                        self.splits[cid],
                        self.start_state(global_state, cid, retained),
                        seed=round_seed(self.config.seed, round_index, client_ids.index(cid)),
                        retained=retained,
                    )
                )
            result = self.hub.aggregate(global_state, updates, round=round_index)
            old_global, global_state = global_state, result.global_state
            self.residuals.update(self._new_residuals(result))
            if self.personalizer is not None:
                self.residuals = self.personalizer.after_round(
                    round_index, old_global, global_state, updates, self.residuals, self.splits, client_ids
                )
            row = self._evaluate(round_index, global_state, result, updates, time.perf_counter() - started)
            self._checkpoint(round_index, global_state, updates, row)
            rounds.set_postfix(
                global_loss=f"{row['global_eval_loss']:.4f}", local_loss=f"{row['local_eval_loss']:.4f}"
            )
            if on_round_end is not None:
                on_round_end(round_index, row)
        return self._finish(global_state)

    def _evaluate(
        self,
        round_index: int,
        global_state: State,
        result: AggregationResult,
        updates: list[ClientUpdate],
        seconds: float,
    ) -> dict:
        personalized = {cid: self.personalized_state(global_state, cid) for cid in self.residuals}
        raw_eval = self.data.eval if self.config.task == "classification" else None
        row = evaluate_round(self.worker, self.splits, global_state, personalized, raw_eval)
        row.update(
            round=round_index,
            method=self.config.aggregation_method,
            clients=[u.client_id for u in updates],
            train_loss=float(np.mean([u.train_loss for u in updates])) if updates else None,
            # `local` never exchanges adapters: its clients train alone
            bytes_up=0 if self.keeps_own_state else sum(state_nbytes(u.state) for u in updates),
            bytes_down=0 if self.keeps_own_state else state_nbytes(global_state) * len(updates),
            seconds=round(seconds, 3),
            failed=result.failed,
        )
        diagnostics = result.diagnostics or {}
        for key in ("conflict_rate", "conflict_rate_per_layer", "conflicts", "rejected"):
            if key in diagnostics:
                row[key] = diagnostics[key]
        return row

    def _checkpoint(self, round_index: int, global_state: State, updates: list[ClientUpdate], row: dict) -> None:
        self._on_main_process(lambda: self._write_round(round_index, global_state, updates, row))

    def _write_round(self, round_index: int, global_state: State, updates: list[ClientUpdate], row: dict) -> None:
        """Stage the round's files, rename them into place, then record metrics and the resume point."""
        staging = self.run_dir.staging_dir(round_index)
        save_adapter_folder(staging / "global", global_state, self.lora_config)
        for update in updates:
            client_dir = staging / "clients" / update.client_id
            client_dir.mkdir(parents=True)
            self.run_dir.save_tensors(client_dir / "adapter_model.safetensors", update.state)
            stats = {
                "num_examples": update.num_examples,
                "train_loss": update.train_loss,
                **update.metrics,
                "expert_counts": update.expert_counts.tolist() if update.expert_counts is not None else None,
            }
            (client_dir / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
        if self.residuals:
            (staging / "residuals").mkdir()
            for cid, residual in self.residuals.items():
                self.run_dir.save_tensors(staging / "residuals" / f"{cid}.safetensors", residual)
        hub_state = self.hub.state_dict()
        if hub_state:
            torch.save(hub_state, staging / "hub_state.pt")
        self.run_dir.commit_round(round_index, staging)
        self.run_dir.append_metrics(row)
        self.run_dir.write_state({"last_round": round_index, "num_rounds": self.config.num_rounds})

    def _finish(self, global_state: State) -> SimulationResult:
        from hf_fcmoe.reporting.run_report import write_run_report

        root = self.run_dir.root
        personalized_dirs = {cid: root / "personalized" / cid for cid in self.data.client_ids}
        metrics = self.run_dir.read_metrics()

        def write_final() -> None:
            save_adapter_folder(root / "global", global_state, self.lora_config, self.tokenizer)
            for cid, path in personalized_dirs.items():
                save_adapter_folder(path, self.personalized_state(global_state, cid), self.lora_config, self.tokenizer)
            write_run_report(root, metrics, self.data.label_counts)

        self._on_main_process(write_final)
        return SimulationResult(root, root / "global", personalized_dirs, root / "report.md", metrics)


def run_simulation(
    config: FederatedMoEConfig, resume: bool = False, progress: bool = True, **kwargs
) -> SimulationResult:
    """Run (or resume) a federated fine-tuning in this process; see `FederatedSimulation`."""
    return FederatedSimulation(config, resume=resume, progress=progress).run(**kwargs)
