"""Federation-level curves to the experiment trackers of `report_to` (trackio, tensorboard, wandb, mlflow, ...).

A federated run is one tracker run, logged through transformers' own integration callbacks
(`transformers.integrations`), exactly as a `Trainer` run is: the round is the step, global and personalized
evaluation are ``eval/...``, conflict rate, bytes and seconds per round are ``train/...``, and every client's
values are grouped under ``eval/clients/<id>/...``. Clients' local rounds log nothing themselves (one tracker
run per local round would bury the federation's curves); `ClientWorker.local_args` turns their report_to off.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# metrics-row keys -> tracker names ("eval_" prefixed names land under eval/ in every integration)
RENAMES = {
    "global_eval_loss": "eval_global_loss",
    "local_eval_loss": "eval_personalized_loss",
    "local_eval_loss_std": "eval_personalized_loss_std",
    "global_accuracy": "eval_global_accuracy",
    "local_accuracy": "eval_personalized_accuracy",
    "local_accuracy_std": "eval_personalized_accuracy_std",
    "train_loss": "local_train_loss",
    "seconds": "round_seconds",
}
SKIPPED = {"round", "failed"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def tracker_logs(row: dict) -> dict[str, float]:
    """The numbers of one metrics row under tracker names: federation-level values plus per-client groups."""
    logs: dict[str, float] = {}
    for key, value in row.items():
        if key in SKIPPED:
            continue
        number = _number(value)
        if number is not None:
            logs[RENAMES.get(key, key)] = number
        elif key.endswith("_per_client") and isinstance(value, dict):
            name = RENAMES.get(key.removesuffix("_per_client"), key.removesuffix("_per_client"))
            name = name.removeprefix("eval_")
            for client_id, client_value in value.items():
                if _number(client_value) is not None:
                    logs[f"eval_clients/{client_id}/{name}"] = float(client_value)
        elif key == "conflict_rate_per_layer" and isinstance(value, list):
            logs.update({f"conflict_rate_layer_{i}": float(v) for i, v in enumerate(value) if _number(v) is not None})
    return logs


class FederationTracker:
    """One tracker run per federation: `log_round(row)` after every round, `finish()` at the end.

    `report_to` is the run config's (a TrainingArguments field, so the integrations read their usual settings:
    run_name, project, logging directories, environment variables). Only the main process logs.
    """

    def __init__(self, config, is_main_process: bool = True):
        from transformers import TrainerControl, TrainerState
        from transformers.integrations import get_reporting_integration_callbacks

        self.config = config
        self.callbacks = [cls() for cls in get_reporting_integration_callbacks(config.report_to)]
        if not is_main_process:
            self.callbacks = []
        self.state = TrainerState(is_world_process_zero=True, is_local_process_zero=True)
        self.control = TrainerControl()
        self.started = False

    def _call(self, event: str, **kwargs) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self.config, self.state, self.control, **kwargs)

    def log_round(self, row: dict) -> None:
        if not self.callbacks:
            return
        if not self.started:
            self.started = True
            self.state.max_steps = self.config.num_rounds
            self._call("on_train_begin")
        self.state.global_step = int(row["round"])
        self.state.epoch = float(row["round"])
        self._call("on_log", logs=tracker_logs(row))

    def finish(self) -> None:
        if self.started:
            self._call("on_train_end")
            self.started = False
