"""Retention lambda chosen per client: each client picks the lambda of its personalized adapter from a grid.

With ``retention_lambda_grid`` set, a client's personalized adapter (and the start of its next round) is
``global + lambda_i * residual_i`` with the ``lambda_i`` of the grid that gives the lowest loss on a
*validation slice held out from its own train split*, chosen again every round against the new global (the
global moves, the best mix moves with it). Both retention targets work the same way: the residual is the
projected-away part (``projected``) or the client's whole deviation from the global (``deviation``).

Why a held-out slice and not the client's eval split: the eval split is what the run report scores
(``local_eval_loss``); a lambda picked on it is selected on the test data and its reported personalized loss
is optimistic by construction (with a grid that includes 0, it can never be worse than the global). The
slice is taken out of the client's training rows before the first round, so the client never trains on it;
the price is that fraction of its training data.

Both engines go through these functions: the in-process simulation chooses for every client, a Flower node
for itself (its residual and its validation rows never leave it; only the chosen lambda and the validation
losses come back, as evaluate metrics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset

from hf_fcmoe.aggregation.types import State
from hf_fcmoe.federation.retention import add_scaled

DEFAULT_VALIDATION_FRACTION = 0.1
HOLD_OUT_STREAM = 16  # the hold-out's own random stream: independent of the eval split's draw of the same rows
PER_CLIENT_FIELD = "retention_lambda_per_client"
LOSSES_FIELD = "retention_lambda_validation_loss"
_LOSS_METRIC = "validation_loss_lambda_"  # + f"{lambda:g}": one evaluate metric per grid value (Flower)


def lambda_key(value: float) -> str:
    """How a grid value is written in metrics rows and Flower metric names ('0.5', '1')."""
    return f"{value:g}"


def check_lambda_grid(config) -> None:
    """One-line errors for a grid that cannot work (called when the config is built)."""
    grid, fraction = config.retention_lambda_grid, config.retention_validation_fraction
    if grid is None:
        if fraction is not None:
            raise ValueError(
                "retention_validation_fraction is the slice that chooses lambda per client: set "
                "retention_lambda_grid to use it"
            )
        return
    if not grid or any(not math.isfinite(value) or value < 0 for value in grid):
        raise ValueError(f"retention_lambda_grid must list lambdas >= 0, got {grid}")
    if fraction is not None and not 0 < fraction < 1:
        raise ValueError(f"retention_validation_fraction must be in (0, 1), got {fraction}")
    options = config.aggregation_options or {}
    hub_lambda = options.get("retention_lambda", config.retention_lambda)
    if config.aggregation_method != "fcmoe" or not options.get("retention", True) or not hub_lambda > 0:
        raise ValueError(
            "retention_lambda_grid chooses FC-MoE's retention lambda per client: it needs aggregation_method "
            f"'fcmoe' with retention on and retention_lambda > 0 (got {config.aggregation_method!r}, "
            f"retention={options.get('retention', True)}, retention_lambda={hub_lambda})"
        )
    if config.personalization is not None:
        raise ValueError(f"retention_lambda_grid is FC-MoE retention's; personalization is {config.personalization!r}")


def hold_out_validation(config, train: Dataset, client_id: str) -> tuple[Dataset, Dataset | None]:
    """(rows to train on, validation rows) of one client; (train, None) without a grid.

    A seeded draw over the client's own rows, in their order, so the in-process engine and a Flower node
    holding the same rows hold out the same ones.
    """
    if config.retention_lambda_grid is None:
        return train, None
    fraction = config.retention_validation_fraction or DEFAULT_VALIDATION_FRACTION
    num_rows = len(train)
    num_validation = max(1, int(round(num_rows * fraction)))
    if num_validation >= num_rows:
        raise ValueError(
            f"client {client_id!r} has {num_rows} training rows: too few to hold out a validation slice for "
            "retention_lambda_grid; lower retention_validation_fraction or give it more rows"
        )
    order = np.random.default_rng([config.seed, HOLD_OUT_STREAM]).permutation(num_rows)
    keep, held = sorted(order[num_validation:].tolist()), sorted(order[:num_validation].tolist())
    return train.select(keep), train.select(held)


@dataclass
class LambdaChoice:
    """The chosen lambda and the validation loss of every grid value."""

    value: float
    losses: dict[float, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flower evaluate metrics: the choice and one loss per grid value (nothing else leaves the node)."""
        losses = {_LOSS_METRIC + lambda_key(value): loss for value, loss in self.losses.items()}
        return {"retention_lambda": self.value, **losses}

    @classmethod
    def from_metrics(cls, metrics: Mapping) -> LambdaChoice | None:
        if "retention_lambda" not in metrics:
            return None
        losses = {float(k[len(_LOSS_METRIC) :]): float(v) for k, v in metrics.items() if k.startswith(_LOSS_METRIC)}
        return cls(float(metrics["retention_lambda"]), dict(sorted(losses.items())))


def choose_lambda(
    loss_of: Callable[[State], float], global_state: State, residual: State, grid: list[float]
) -> LambdaChoice:
    """The grid value whose ``global + lambda * residual`` has the lowest ``loss_of``; ties go to the smaller lambda
    (closer to the global), so a zero residual reports the smallest. A NaN loss never wins."""
    values = sorted({float(value) for value in grid})
    if not any(bool(tensor.any()) for tensor in residual.values()):  # no residual: every lambda is the global
        loss = float(loss_of(global_state))
        return LambdaChoice(values[0], dict.fromkeys(values, loss))
    losses = {value: float(loss_of(add_scaled(global_state, residual, value))) for value in values}
    finite = {value: loss for value, loss in losses.items() if not math.isnan(loss)}
    best = min(finite, key=lambda value: (finite[value], value)) if finite else min(losses)
    return LambdaChoice(best, losses)


def choose_on_validation(worker, validation: Dataset, global_state: State, residual: State, grid) -> LambdaChoice:
    """`choose_lambda` with the worker's loss on a client's prepared validation rows."""
    return choose_lambda(lambda state: worker.evaluate(state, validation), global_state, residual, list(grid))


def row_fields(choices: Mapping[str, LambdaChoice]) -> dict:
    """The metrics-row fields of a round's choices (the same in both engines)."""
    return {
        PER_CLIENT_FIELD: {cid: choice.value for cid, choice in choices.items()},
        LOSSES_FIELD: {
            cid: {lambda_key(value): loss for value, loss in choice.losses.items()} for cid, choice in choices.items()
        },
    }


class ClientLambdas:
    """The in-process engine's per-client choices: chosen after every aggregation, restored on resume."""

    def __init__(self, config):
        self.grid = sorted({float(v) for v in config.retention_lambda_grid})
        self.choices: dict[str, LambdaChoice] = {}

    def of(self, client_id: str, default: float) -> float:
        """The client's chosen lambda (`default` before its first choice: it has no residual then)."""
        choice = self.choices.get(client_id)
        return default if choice is None else choice.value

    def choose_all(self, worker, splits: Mapping, global_state: State, residuals: Mapping[str, State]) -> None:
        """Every client holding a residual chooses against the new global on its own validation rows."""
        for cid, residual in residuals.items():
            self.choices[cid] = choose_on_validation(worker, splits[cid].validation, global_state, residual, self.grid)

    def row_fields(self) -> dict:
        """The round's fields; none before any client holds a residual (as a Flower round 0 row)."""
        return row_fields(self.choices) if self.choices else {}

    def restore(self, rows: list[dict], round_index: int) -> None:
        """The choices of a checkpointed round, from its metrics row (resume continues with them)."""
        row = next((r for r in rows if r.get("round") == round_index), {})
        losses = row.get(LOSSES_FIELD, {})
        self.choices = {
            cid: LambdaChoice(float(value), {float(k): float(v) for k, v in losses.get(cid, {}).items()})
            for cid, value in row.get(PER_CLIENT_FIELD, {}).items()
        }
