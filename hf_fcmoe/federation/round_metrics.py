"""Per-round evaluation: the global adapter on every client's eval split and on their union, and
each client's personalized adapter on its own split (mean and std over clients, as the paper reports)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from datasets import Dataset

from hf_fcmoe.aggregation.types import State
from hf_fcmoe.metrics.label_scoring import evaluate_label_scoring
from hf_fcmoe.metrics.loss import nll_sum_and_count
from hf_fcmoe.training.trainer import load_adapter_state


def state_nbytes(state: State) -> int:
    """Bytes of an adapter state on the wire (raw tensor payload)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


@dataclass
class ClientScore:
    """One adapter state on one client's eval split."""

    nll_sum: float
    tokens: int
    accuracy: float | None = None

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan


def score_state(worker, splits: dict, state: State, client_ids, raw_eval: dict[str, Dataset] | None):
    """Load `state` once and score it on each client's split (loss; accuracy when `raw_eval` is given)."""
    load_adapter_state(worker.model, state)
    batch_size = worker.config.eval_batch_size
    scores = {}
    for cid in client_ids:
        nll_sum, tokens = nll_sum_and_count(worker.model, splits[cid].eval, worker.collator, batch_size)
        accuracy = None
        if raw_eval is not None:
            accuracy = evaluate_label_scoring(worker.model, worker.tokenizer, raw_eval[cid], batch_size)
        scores[cid] = ClientScore(nll_sum, tokens, accuracy)
    return scores


def _mean_std_fields(prefix: str, per_client: dict[str, float]) -> dict:
    values = np.array(list(per_client.values()))
    return {
        prefix: float(values.mean()),
        f"{prefix}_std": float(values.std()),
        f"{prefix}_per_client": per_client,
    }


def evaluate_round(
    worker,
    splits: dict,
    global_state: State,
    personalized: dict[str, State],
    raw_eval: dict[str, Dataset] | None = None,
) -> dict:
    """Metric fields of one round. Clients without a personalized state are evaluated with the global one.

    The union loss is token-weighted over all client eval splits (the global eval set is their union),
    computed from the same passes as the per-client numbers. With `raw_eval` (classification splits) the
    label-scoring accuracy is added: global per client and on the union (weighted by split size), and each
    client's personalized adapter on its own split.
    """
    client_ids = list(splits)
    global_scores = score_state(worker, splits, global_state, client_ids, raw_eval)
    local_scores = dict(global_scores)
    for cid, state in personalized.items():
        local_scores.update(score_state(worker, splits, state, [cid], raw_eval))
    sizes = {cid: len(raw_eval[cid]) for cid in client_ids} if raw_eval is not None else None
    return combine_scores(global_scores, local_scores, sizes)


def combine_scores(
    global_scores: dict[str, ClientScore], local_scores: dict[str, ClientScore], sizes: dict[str, int] | None = None
) -> dict:
    """The round's metric fields from per-client scores (`sizes`: classification eval split sizes, or None)."""
    client_ids = list(global_scores)
    tokens = sum(score.tokens for score in global_scores.values())
    row = {
        "global_eval_loss": sum(score.nll_sum for score in global_scores.values()) / tokens if tokens else math.nan,
        "global_eval_loss_per_client": {cid: score.loss for cid, score in global_scores.items()},
        **_mean_std_fields("local_eval_loss", {cid: score.loss for cid, score in local_scores.items()}),
    }
    if sizes is not None:
        global_accuracy = {cid: score.accuracy for cid, score in global_scores.items()}
        row.update(
            global_accuracy=sum(global_accuracy[c] * sizes[c] for c in client_ids) / sum(sizes.values()),
            global_accuracy_per_client=global_accuracy,
            **_mean_std_fields("local_accuracy", {cid: score.accuracy for cid, score in local_scores.items()}),
        )
    return row
