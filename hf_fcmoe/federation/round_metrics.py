"""Per-round evaluation: the global adapter on every client's eval split and on their union, and
each client's personalized adapter on its own split (mean and std over clients, as the paper reports)."""

from __future__ import annotations

import math

import numpy as np

from hf_fcmoe.aggregation.types import State
from hf_fcmoe.evaluation import nll_sum_and_count
from hf_fcmoe.trainer import load_adapter_state


def state_nbytes(state: State) -> int:
    """Bytes of an adapter state on the wire (raw tensor payload)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def _client_losses(worker, splits, state: State, client_ids) -> dict[str, tuple[float, int]]:
    load_adapter_state(worker.model, state)
    return {
        cid: nll_sum_and_count(worker.model, splits[cid].eval, worker.collator, worker.config.eval_batch_size)
        for cid in client_ids
    }


def evaluate_round(worker, splits: dict, global_state: State, personalized: dict[str, State]) -> dict:
    """Metric fields of one round. Clients without a personalized state are evaluated with the global one.

    The union loss is token-weighted over all client eval splits (the global eval set is their union),
    computed from the same passes as the per-client numbers.
    """
    client_ids = list(splits)
    global_sums = _client_losses(worker, splits, global_state, client_ids)
    total = sum(s for s, _ in global_sums.values())
    count = sum(c for _, c in global_sums.values())
    global_per_client = {cid: s / c if c else math.nan for cid, (s, c) in global_sums.items()}
    local_per_client = dict(global_per_client)
    for cid, state in personalized.items():
        ((loss_sum, loss_count),) = _client_losses(worker, splits, state, [cid]).values()
        local_per_client[cid] = loss_sum / loss_count if loss_count else math.nan
    local = np.array(list(local_per_client.values()))
    return {
        "global_eval_loss": total / count if count else math.nan,
        "global_eval_loss_per_client": global_per_client,
        "local_eval_loss": float(local.mean()),
        "local_eval_loss_std": float(local.std()),
        "local_eval_loss_per_client": local_per_client,
    }
