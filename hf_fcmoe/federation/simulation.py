"""The in-process federation engine (the embedded default): every client trains in this process.

Round loop: sample clients (seeded per round), train each from the global adapter (plus its
retained residual under FC-MoE), aggregate through the hub, evaluate global and personalized
adapters, checkpoint the round atomically, append a metrics row. `resume=True` continues from
the last completed round and reproduces the uninterrupted run: every random choice is a function of
(seed, round, client), and the hub's server-optimizer state is checkpointed with each round.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from functools import partial

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from hf_fcmoe.adapters.lora import apply_expert_lora, build_lora_config, expert_layout_from_peft_model
from hf_fcmoe.aggregation import AggregationResult, ClientUpdate
from hf_fcmoe.aggregation.types import State
from hf_fcmoe.config import FederatedMoEConfig
from hf_fcmoe.data.federated import FederatedData, load_federated_data
from hf_fcmoe.federation import server_state
from hf_fcmoe.federation.client import ClientWorker, PreparedSplits, round_seed
from hf_fcmoe.federation.faults import check_accepted, collect_round, crash_point
from hf_fcmoe.federation.lambda_choice import ClientLambdas, hold_out_validation
from hf_fcmoe.federation.personalization import build_personalizer
from hf_fcmoe.federation.retention import add_scaled, hub_retention, new_residuals, scaled
from hf_fcmoe.federation.round_metrics import evaluate_round
from hf_fcmoe.federation.run_dir import RunDirectory
from hf_fcmoe.federation.safeguards import dp_metrics, enroll_clients, finish_update
from hf_fcmoe.federation.server_state import (  # noqa: F401  (re-exported: callers import them from here)
    RESUME_IGNORED_KEYS,
    SimulationResult,
    build_hub,
    check_output_dir,
    config_changes,
    sample_clients,
)
from hf_fcmoe.hub.recipe import check_publishing, publish_round, publish_run
from hf_fcmoe.models.families import get_family
from hf_fcmoe.models.loading import is_tiny, load_base_model, save_base_model
from hf_fcmoe.models.preflight import check_run
from hf_fcmoe.reporting.trackers import FederationTracker
from hf_fcmoe.training.trainer import adapter_state

logger = logging.getLogger(__name__)


def _check_data(data: FederatedData) -> None:
    for cid in data.client_ids:
        if len(data.train[cid]) == 0:
            raise ValueError(f"client {cid!r} has zero training examples; lower eval_fraction or num_clients")


class FederatedSimulation:
    """One run of the in-process engine; `run()` executes (or resumes) it."""

    def __init__(self, config: FederatedMoEConfig, resume: bool = False, progress: bool = True):
        server_state.require_engine(config, "simulation")
        self.config = config
        self.run_dir = RunDirectory(config.output_dir)
        self.resume = resume
        # Under `accelerate launch` every process runs this loop (local rounds train data-parallel, the
        # hub's math is deterministic); only the main process writes the run directory.
        self.process = PartialState()
        self.quiet = not (progress and self.process.is_main_process)  # progress bars on the main process only
        self._check_output_dir()
        check_run(config)  # launch, MoE family, LoRA targets, weights present: from configs, before data or weights
        check_publishing(config)
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
        self.fingerprint_configs = (self.model.get_base_model().config.to_dict(), self.lora_config.to_dict())
        self.hub.announce(*self.fingerprint_configs)  # every update must come from this base + adapter config
        self.worker = ClientWorker(self.model, self.tokenizer, config)
        self.personalizer = build_personalizer(config, self.worker, self.layout)  # None: the hub's retention
        self.splits: dict[str, PreparedSplits] = {}
        self.residuals: dict[str, State] = {}
        # retention_lambda_grid: each client's lambda, chosen on rows held out of its train split
        self.lambdas = ClientLambdas(config) if config.retention_lambda_grid is not None else None
        self.tracker = FederationTracker(config, is_main_process=self.process.is_main_process)

    def _check_output_dir(self) -> None:
        check_output_dir(self.config, self.resume)

    def _on_main_process(self, write: Callable[[], object]) -> None:
        """Run `write` on the main process only, then let every process continue together."""
        if self.process.is_main_process:
            write()
        self.process.wait_for_everyone()

    # --- state helpers
    def personalized_state(self, global_state: State, client_id: str) -> State:
        """The client's own adapter: global + scale * residual (FC-MoE retention; `local`: its own trained state)."""
        return add_scaled(global_state, self.residuals.get(client_id), self._own_scale(client_id, self.personal_scale))

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
        return new_residuals(result, self.keeps_own_state)

    def retained_part(self, client_id: str) -> State | None:
        """lambda * residual of a client (what its start state adds to the global), or None."""
        if self.personalizer is not None:
            return self.personalizer.retained(self.residuals.get(client_id))
        return scaled(self.residuals.get(client_id), self._own_scale(client_id, self.hub_retention))

    def _own_scale(self, client_id: str, scale: float) -> float:
        """The client's chosen lambda under retention_lambda_grid, else the run's `scale`."""
        return scale if self.lambdas is None else self.lambdas.of(client_id, scale)

    @property
    def hub_retention(self) -> float:
        return hub_retention(self.hub)

    def _restore(self) -> tuple[int, State]:
        last = server_state.last_completed_round(self.run_dir)
        self._on_main_process(lambda: self.run_dir.roll_back_to(last))
        global_state, residuals = server_state.load_round(self.run_dir, last, self.hub)
        if residuals:
            self.residuals = residuals
        if self.lambdas is not None:
            self.lambdas.restore(self.run_dir.read_metrics(), last)
        return last, global_state

    def _start(self) -> tuple[int, State]:
        self._on_main_process(self._write_fresh_run)
        return 0, adapter_state(self.model)

    def _write_fresh_run(self) -> None:
        server_state.write_fresh_run(self.run_dir, self.config)

    # --- the loop
    def run(self, on_round_end: Callable[[int, dict], None] | None = None) -> SimulationResult:
        client_ids = self.data.client_ids
        # tokenization can still refuse the data (e.g. every row truncated away): before the run writes anything
        for cid in tqdm(client_ids, desc="preparing client data", leave=False, disable=self.quiet):
            train, validation = hold_out_validation(self.config, self.data.train[cid], cid)
            self.splits[cid] = self.worker.prepare(train, self.data.eval[cid], validation)
        if self.worker.truncated_prompts and self.process.is_main_process:
            logger.warning(
                f"{self.worker.truncated_prompts} classification prompts were longer than max_length="
                f"{self.config.max_length}: their input text was shortened so the label stays in (raise max_length "
                "to keep all of it)"
            )
        last, global_state = self._restore() if self.resume else self._start()
        rows = {cid: len(split.train) for cid, split in self.splits.items()}
        enroll_clients(self.hub, self.config, rows, self.layout.top_k, self.process.num_processes)
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
            progress = tqdm(sampled, desc=f"round {round_index} clients", leave=False, disable=self.quiet)
            train = partial(self._train_client, global_state, round_index)
            updates, dropped = collect_round(progress, train, round_index, self.config)
            result = self.hub.aggregate(global_state, updates, round=round_index)
            result.diagnostics["dropped"] = dropped
            crash_point("aggregated", round_index)
            check_accepted(result.diagnostics, self.config, round_index)
            old_global, global_state = global_state, result.global_state
            self.residuals.update(self._new_residuals(result))
            if self.personalizer is not None:
                self.residuals = self.personalizer.after_round(
                    round_index, old_global, global_state, updates, self.residuals, self.splits, client_ids
                )
            if self.lambdas is not None:
                self.lambdas.choose_all(self.worker, self.splits, global_state, self.residuals)
            row = self._evaluate(round_index, global_state, result, updates, time.perf_counter() - started)
            self._checkpoint(round_index, global_state, updates, row)
            self._on_main_process(lambda t=round_index: publish_round(self.config, self.run_dir.root, t))
            rounds.set_postfix(
                global_loss=f"{row['global_eval_loss']:.4f}", local_loss=f"{row['local_eval_loss']:.4f}"
            )
            if on_round_end is not None:
                on_round_end(round_index, row)
        return self._finish(global_state)

    def _train_client(self, global_state: State, round_index: int, cid: str, callbacks: list) -> ClientUpdate:
        seed = round_seed(self.config.seed, round_index, self.data.client_ids.index(cid))
        retained = self.retained_part(cid)
        update = self.worker.train(
            cid,
            self.splits[cid],
            self.start_state(global_state, cid, retained),
            seed=seed,
            retained=retained,
            callbacks=callbacks,
        )
        return finish_update(update, global_state, self.config, *self.fingerprint_configs, round_index, seed)

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
        eval_fields = evaluate_round(self.worker, self.splits, global_state, personalized, raw_eval)
        row = server_state.metrics_row(
            eval_fields,
            round_index,
            self.config.aggregation_method,
            global_state,
            result,
            updates,
            seconds,
            exchanges_adapters=not self.keeps_own_state,
        )
        if self.lambdas is not None:
            row.update(self.lambdas.row_fields())
        if self.worker.truncated_prompts:
            row["truncated_prompts"] = self.worker.truncated_prompts
        sampled = partial(sample_clients, self.data.client_ids, self.config.sampled_per_round, self.config.seed)
        row.update(dp_metrics(self.config, sampled, round_index))  # epsilon from who took part in rounds 1..t
        return row

    def _checkpoint(self, round_index: int, global_state: State, updates: list[ClientUpdate], row: dict) -> None:
        self._on_main_process(lambda: self._write_round(round_index, global_state, updates, row))
        self.tracker.log_round(row)  # report_to: the federation's curves, one tracker run per federation

    def _write_round(self, round_index: int, global_state: State, updates: list[ClientUpdate], row: dict) -> None:
        server_state.write_round(
            self.run_dir,
            round_index,
            global_state,
            self.lora_config,
            updates,
            self.residuals,
            self.hub,
            row,
            self.config.num_rounds,
        )

    def _finish(self, global_state: State) -> SimulationResult:
        root = self.run_dir.root
        personalized_dirs = {cid: root / "personalized" / cid for cid in self.data.client_ids}
        metrics = self.run_dir.read_metrics()

        def write_final() -> None:
            server_state.write_final_outputs(
                self.run_dir,
                global_state,
                self.lora_config,
                self.tokenizer,
                metrics,
                client_ids=personalized_dirs,
                personalized_state=lambda cid: self.personalized_state(global_state, cid),
                label_counts=self.data.label_counts,
            )
            publish_run(self.config, root)

        self._on_main_process(write_final)
        self.tracker.finish()
        return SimulationResult(root, root / "global", personalized_dirs, root / "report.md", metrics)


def run_simulation(
    config: FederatedMoEConfig, resume: bool = False, progress: bool = True, **kwargs
) -> SimulationResult:
    """Run (or resume) a federated fine-tuning in this process; see `FederatedSimulation`."""
    return FederatedSimulation(config, resume=resume, progress=progress).run(**kwargs)
