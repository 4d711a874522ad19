"""Per-round evaluation: the global adapter on every client's eval split and on their union, and
each client's personalized adapter on its own split (mean and std over clients, as the paper reports)."""

from __future__ import annotations

import math

import numpy as np

from hf_fcmoe.aggregation.types import State
from hf_fcmoe.evaluation import nll_sum_and_count
from hf_fcmoe.metrics.label_scoring import evaluate_label_scoring
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


def _client_accuracies(worker, raw_eval: dict, state: State, client_ids) -> dict[str, float]:
    load_adapter_state(worker.model, state)
    return {
        cid: evaluate_label_scoring(worker.model, worker.tokenizer, raw_eval[cid], worker.config.eval_batch_size)
        for cid in client_ids
    }


def _mean_std_fields(prefix: str, per_client: dict[str, float]) -> dict:
    values = np.array(list(per_client.values()))
    return {
        prefix: float(values.mean()),
        f"{prefix}_std": float(values.std()),
        f"{prefix}_per_client": per_client,
    }


def accuracy_fields(worker, raw_eval: dict, global_state: State, personalized: dict[str, State]) -> dict:
    """Label-scoring accuracy of the global adapter (per client and on the union, weighted by split size)
    and of each client's personalized adapter on its own split."""
    client_ids = list(raw_eval)
    global_per_client = _client_accuracies(worker, raw_eval, global_state, client_ids)
    sizes = {cid: len(raw_eval[cid]) for cid in client_ids}
    local_per_client = dict(global_per_client)
    for cid, state in personalized.items():
        local_per_client.update(_client_accuracies(worker, raw_eval, state, [cid]))
    return {
        "global_accuracy": sum(global_per_client[c] * sizes[c] for c in client_ids) / sum(sizes.values()),
        "global_accuracy_per_client": global_per_client,
        **_mean_std_fields("local_accuracy", local_per_client),
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
    return {
        "global_eval_loss": total / count if count else math.nan,
        "global_eval_loss_per_client": global_per_client,
        **_mean_std_fields("local_eval_loss", local_per_client),
    }
